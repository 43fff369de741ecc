"""Canary comparison, benchmark figures, reputation and quarantine (pure rules)."""

from __future__ import annotations

import pytest

from server.network.catalog import Catalog
from server.network.validation import (
    CanaryTolerance,
    benchmark_figures,
    benchmark_passes,
    canary_passes,
    next_reputation,
    should_quarantine,
)

EXPECTED = "The quick brown fox is a classic example of a lazy, unmotivated,"


def test_exact_output_passes() -> None:
    assert canary_passes(EXPECTED, EXPECTED)


def test_whitespace_differences_do_not_matter() -> None:
    assert canary_passes("The capital of France\nis Paris.", " The capital  of France is Paris. ")


def test_late_divergence_passes_on_the_exact_prefix() -> None:
    # Another backend took another branch at a near-tie after the first words.
    assert canary_passes(EXPECTED, "The quick brown fox is often used to show every letter.")


def test_early_small_divergence_passes_on_similarity() -> None:
    assert canary_passes(EXPECTED, "A quick brown fox is a classic example of a lazy, unmotivated,")


@pytest.mark.parametrize(
    "actual",
    [
        "",
        "I would rather not say",
        "one two three four five six seven eight nine ten",
        "Paris is the capital of France.",
    ],
)
def test_other_outputs_fail(actual: str) -> None:
    assert not canary_passes("The capital of France is Paris.", actual)


def test_tolerance_is_configurable() -> None:
    strict = CanaryTolerance(exact_prefix_words=20, min_similarity=1.0)
    assert not canary_passes(EXPECTED, EXPECTED[:-1] + ".", strict)
    assert canary_passes(EXPECTED, EXPECTED, strict)


def test_short_reference_needs_all_its_words() -> None:
    assert canary_passes("Paris.", "Paris.")
    assert not canary_passes("Paris.", "London.")


def test_benchmark_figures() -> None:
    figures = benchmark_figures(assigned_at=10.0, first_token_at=10.25, done_at=11.25, tokens=11)
    assert figures.time_to_first_token_ms == pytest.approx(250.0)
    assert figures.tokens_per_second == pytest.approx(10.0)


def test_benchmark_of_one_token_uses_the_whole_job() -> None:
    figures = benchmark_figures(assigned_at=0.0, first_token_at=0.5, done_at=0.5, tokens=1)
    assert figures.tokens_per_second == pytest.approx(2.0)


def test_benchmark_needs_output_and_the_minimum_speed() -> None:
    figures = benchmark_figures(assigned_at=0.0, first_token_at=0.1, done_at=1.1, tokens=11)
    assert benchmark_passes(figures, 11)
    assert benchmark_passes(figures, 11, min_tokens_per_second=10.0)
    assert not benchmark_passes(figures, 11, min_tokens_per_second=20.0)
    empty = benchmark_figures(assigned_at=0.0, first_token_at=0.1, done_at=0.1, tokens=0)
    assert not benchmark_passes(empty, 0)


def test_reputation_is_an_ewma_in_unit_range() -> None:
    assert next_reputation(1.0, True, 0.3) == 1.0
    assert next_reputation(1.0, False, 0.3) == pytest.approx(0.7)
    assert next_reputation(0.7, False, 0.3) == pytest.approx(0.49)
    assert next_reputation(0.49, True, 0.3) == pytest.approx(0.643)
    assert next_reputation(0.0, False, 1.5) == 0.0


def test_two_failures_from_a_clean_record_quarantine_with_the_defaults() -> None:
    reputation = 1.0
    verdicts = []
    for _ in range(2):
        reputation = next_reputation(reputation, False, 0.3)
        verdicts.append(should_quarantine(reputation, 0.5))
    assert verdicts == [False, True]


def test_recorded_canaries_pass_their_own_reference() -> None:
    canaries = Catalog(()).canaries("smollm2-135m-instruct")
    assert canaries
    for canary in canaries:
        assert 0 < canary.max_tokens <= 16
        assert canary_passes(canary.expected, canary.expected)
    assert Catalog(()).canaries("no-such-model") == ()
