from __future__ import annotations

from agent.batching import TokenBatcher
from agent.runtime.base import TokenText
from core.inference import TokenLogprob


def _token(text: str, token_id: int) -> TokenText:
    return TokenText(text, 1, (token_id,), (TokenLogprob(text, text.encode(), -0.5),))


def test_first_text_goes_out_at_once() -> None:
    batcher = TokenBatcher(max_tokens=8, max_delay_s=0.025)
    assert batcher.add(_token("Hi", 1), now=0.0) == _token("Hi", 1)


def test_fast_tokens_are_merged_until_the_delay_passes() -> None:
    batcher = TokenBatcher(max_tokens=8, max_delay_s=0.025)
    batcher.add(_token("a", 1), now=0.0)
    assert batcher.add(_token("b", 2), now=0.010) is None
    assert batcher.add(_token("c", 3), now=0.020) is None
    merged = batcher.add(_token("d", 4), now=0.030)
    assert merged is not None
    assert (merged.text, merged.token_count, merged.token_ids) == ("bcd", 3, (2, 3, 4))
    assert [lp.token_bytes for lp in merged.logprobs] == [b"b", b"c", b"d"]


def test_a_full_batch_goes_out_without_waiting() -> None:
    batcher = TokenBatcher(max_tokens=3, max_delay_s=10.0)
    batcher.add(_token("a", 1), now=0.0)
    assert batcher.add(_token("b", 2), now=0.001) is None
    assert batcher.add(_token("c", 3), now=0.002) is None
    merged = batcher.add(_token("d", 4), now=0.003)
    assert merged is not None
    assert merged.token_count == 3


def test_slow_tokens_are_never_held() -> None:
    batcher = TokenBatcher(max_tokens=8, max_delay_s=0.025)
    for step in range(5):
        assert batcher.add(_token("x", step), now=step * 0.1) is not None


def test_flush_returns_what_is_left_and_then_nothing() -> None:
    batcher = TokenBatcher(max_tokens=8, max_delay_s=0.025)
    batcher.add(_token("a", 1), now=0.0)
    batcher.add(_token("b", 2), now=0.001)
    rest = batcher.flush(now=0.002)
    assert rest is not None
    assert rest.text == "b"
    assert batcher.flush(now=0.003) is None
