from __future__ import annotations

import random

from agent.backoff import Backoff


def test_delays_stay_within_a_doubling_ceiling_up_to_the_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=4.0, rng=random.Random(7))
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for ceiling in ceilings:
        assert 0.0 <= backoff.next_delay() <= ceiling


def test_full_jitter_spreads_a_crowd_over_the_window() -> None:
    delays = [
        Backoff(base_s=1.0, cap_s=8.0, rng=random.Random(seed), attempt=3).next_delay()
        for seed in range(500)
    ]
    # Uniform over [0, 8): every eighth of the window gets some agents.
    buckets = {int(delay) for delay in delays}
    assert buckets == set(range(8))


def test_reset_starts_over_from_the_base() -> None:
    backoff = Backoff(base_s=0.5, cap_s=30.0, rng=random.Random(1))
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 0.5
