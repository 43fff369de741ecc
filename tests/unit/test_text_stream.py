from __future__ import annotations

import itertools
from collections.abc import Iterable

from hypothesis import given
from hypothesis import strategies as st

from agent.runtime.text_stream import TextStream


def _run(pieces: Iterable[bytes], stop: Iterable[str] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(stop)
    emitted = [stream.push(piece) for piece in pieces]
    emitted.append(stream.finish())
    return emitted, stream


def test_plain_text_passes_through_token_by_token() -> None:
    emitted, stream = _run([b"Hel", b"lo", b" world"])
    assert emitted == ["Hel", "lo", " world", ""]
    assert not stream.stopped


def test_utf8_split_across_tokens_is_held_until_complete() -> None:
    euro = "€".encode()  # three bytes
    emitted, _ = _run([b"a" + euro[:1], euro[1:2], euro[2:] + b"b"])
    assert emitted == ["a", "", "€b", ""]


def test_incomplete_utf8_at_the_end_becomes_a_replacement_character() -> None:
    emitted, _ = _run([b"ok", "€".encode()[:2]])
    assert emitted == ["ok", "", "\ufffd"]


def test_stop_sequence_inside_one_token_cuts_it() -> None:
    emitted, stream = _run([b"Hello", b" wor##ld", b"never"], stop=["##"])
    assert emitted == ["Hello", " wor", "", ""]
    assert stream.stopped


def test_stop_sequence_across_tokens_is_not_emitted() -> None:
    emitted, stream = _run([b"one\n", b"\nUser", b":", b" more"], stop=["\nUser:"])
    assert "".join(emitted) == "one\n"
    assert emitted[0] == "one"  # the newline could start the stop, so it waits
    assert stream.stopped


def test_held_prefix_is_released_when_it_stops_matching() -> None:
    emitted, stream = _run([b"a\nU", b"x"], stop=["\nUser:"])
    assert emitted == ["a", "\nUx", ""]
    assert not stream.stopped


def test_held_prefix_is_flushed_at_the_end() -> None:
    emitted, stream = _run([b"done", b"\nUs"], stop=["\nUser:"])
    assert emitted == ["done", "", "\nUs"]
    assert not stream.stopped


def test_earliest_of_several_stops_wins() -> None:
    emitted, _ = _run([b"abcXYZdef"], stop=["def", "XYZ"])
    assert "".join(emitted) == "abc"


def test_nothing_is_emitted_after_a_stop() -> None:
    stream = TextStream(["!"])
    assert stream.push(b"hi! there") == "hi"
    assert stream.push(b"more") == ""
    assert stream.finish() == ""


def test_stop_made_of_a_multibyte_character() -> None:
    euro = "€".encode()
    emitted, stream = _run([b"price 5", euro[:2], euro[2:], b" only"], stop=["€"])
    assert "".join(emitted) == "price 5"
    assert stream.stopped


def test_empty_stop_strings_are_ignored() -> None:
    emitted, stream = _run([b"abc"], stop=[""])
    assert "".join(emitted) == "abc"
    assert not stream.stopped


@given(
    text=st.text(alphabet="ab€\n", max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=10),
    stop=st.text(alphabet="ab€\n", min_size=1, max_size=4),
)
def test_any_split_gives_the_text_before_the_first_stop(
    text: str, cuts: list[int], stop: str
) -> None:
    data = text.encode()
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    emitted, stream = _run(pieces, stop=[stop])
    index = text.find(stop)
    assert "".join(emitted) == (text if index < 0 else text[:index])
    assert stream.stopped == (index >= 0)
