"""Verifying nodes: known-answer canaries, benchmark figures, reputation, quarantine.

Pure functions; the service runs the jobs and applies the verdicts.

Canary comparison. A canary is a fixed chat prompt decoded greedily
(temperature 0) with a small token budget; its expected text was produced
once by the reference runtime (llama.cpp, the bundled GGUF) and is stored as
data (canaries.json). llama.cpp is not bit-exact across CPUs, GPUs and
backends: different kernels round differently, and greedy decoding can take
another branch where two tokens are nearly tied, after which the texts
diverge. An honest node therefore matches the reference for a while and may
drift later; a node that runs another model, a broken quantization or no
model at all diverges from the start. The rule, on whitespace-normalized
text:

- the first ``exact_prefix_words`` words match the reference exactly, or
- the whole output is similar to the reference: difflib's ratio is at least
  ``min_similarity``.

Words, not tokens, so the rule does not depend on the node's tokenizer
splitting text the same way, and the reference stays plain text.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Canary:
    """A known-answer prompt for one model."""

    model: str
    prompt: str
    expected: str
    max_tokens: int = 16


@dataclass(frozen=True, slots=True)
class CanaryTolerance:
    exact_prefix_words: int = 4
    min_similarity: float = 0.85


def _words(text: str) -> list[str]:
    return text.split()


def canary_passes(
    expected: str, actual: str, tolerance: CanaryTolerance = CanaryTolerance()
) -> bool:
    """Whether ``actual`` is the reference output within ``tolerance`` (see above)."""
    want, got = _words(expected), _words(actual)
    if not got:
        return not want
    prefix = min(tolerance.exact_prefix_words, len(want))
    if got[:prefix] == want[:prefix]:
        return True
    ratio = difflib.SequenceMatcher(None, " ".join(want), " ".join(got)).ratio()
    return ratio >= tolerance.min_similarity


@dataclass(frozen=True, slots=True)
class BenchmarkFigures:
    time_to_first_token_ms: float
    tokens_per_second: float


def benchmark_figures(
    *, assigned_at: float, first_token_at: float, done_at: float, tokens: int
) -> BenchmarkFigures:
    """TTFT from assignment (includes the round trip, as a customer sees it) and the
    decode rate after the first token (over the whole job when it had one token)."""
    ttft_s = max(0.0, first_token_at - assigned_at)
    decode_s = done_at - first_token_at
    if tokens > 1 and decode_s > 0:
        rate = (tokens - 1) / decode_s
    else:
        total = done_at - assigned_at
        rate = tokens / total if total > 0 else 0.0
    return BenchmarkFigures(ttft_s * 1000.0, rate)


def benchmark_passes(
    figures: BenchmarkFigures, tokens: int, min_tokens_per_second: float = 0.0
) -> bool:
    """The node generated something, at least as fast as required."""
    return tokens > 0 and figures.tokens_per_second >= min_tokens_per_second


def next_reputation(current: float, passed: bool, alpha: float) -> float:
    """EWMA of canary results (1 pass, 0 fail); stays in [0, 1]."""
    value = (1.0 - alpha) * current + alpha * (1.0 if passed else 0.0)
    return min(1.0, max(0.0, value))


def should_quarantine(reputation: float, threshold: float) -> bool:
    return reputation < threshold
