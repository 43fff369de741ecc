"""The console's pure parts: sessions (expiry, sealing, CSRF), money formatting and
the SVG charts."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from resultity.account.v1 import contribution_service_pb2 as contribution_pb

from gateway.console import format as fmt
from gateway.console.charts import Bar, bar_chart
from gateway.console.sessions import (
    IDLE_TIMEOUT_S,
    MAX_AGE_S,
    Identity,
    MemorySessions,
    SessionStore,
    csrf_matches,
)

IDENTITY = Identity("acct", "Ada", admin=False, key_prefix="rsk_abc")
KEY = "rsk_" + "k" * 40


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_session_keeps_the_key_sealed_and_ends_when_idle_or_old() -> None:
    clock = Clock()
    backend = MemorySessions(clock)
    store = SessionStore(backend, clock)
    session_id = await store.create(IDENTITY, KEY)
    # What the store holds does not contain the key, nor the session id.
    held = pickle.dumps(backend._items)
    assert KEY.encode() not in held
    assert session_id.encode() not in held
    session = await store.get(session_id)
    assert session is not None
    assert (session.identity, session.api_key) == (IDENTITY, KEY)
    assert KEY not in repr(session)
    assert csrf_matches(session, session.csrf_token)
    assert not csrf_matches(session, "forged")
    # Touched on every request: idle time restarts.
    clock.now += IDLE_TIMEOUT_S - 1
    assert await store.get(session_id) is not None
    clock.now += IDLE_TIMEOUT_S + 1
    assert await store.get(session_id) is None

    old = await store.create(IDENTITY, KEY)
    for _ in range(MAX_AGE_S // (IDLE_TIMEOUT_S // 2)):
        clock.now += IDLE_TIMEOUT_S // 2
        await store.get(old)
    assert await store.get(old) is None


async def test_forged_ids_find_nothing_and_a_new_secret_is_shown_once() -> None:
    store = SessionStore()
    session_id = await store.create(IDENTITY, KEY)
    for forged in ("", "x", session_id[:-2] + "AA", "!" * 43):
        assert await store.get(forged) is None
    session = await store.get(session_id)
    assert session is not None
    await store.show_once(session_id, session, "rsk_new")
    session = await store.get(session_id)
    assert session is not None
    assert await store.take_new_secret(session_id, session) == "rsk_new"
    session = await store.get(session_id)
    assert session is not None
    assert await store.take_new_secret(session_id, session) == ""
    await store.end(session_id)
    assert await store.get(session_id) is None


def test_credits_show_micro_credits_exactly() -> None:
    assert fmt.credits(0) == "0.00"
    assert fmt.credits(12_500_000) == "12.50"
    assert fmt.credits(123) == "0.000123"
    assert fmt.credits(1_234_567_890_000) == "1,234,567.89"
    assert fmt.credits(-100_000_000) == "-100.00"


def test_charts_escape_their_text_and_scale_to_the_largest_bar() -> None:
    svg = bar_chart(
        [Bar("<b>", 1.0, "a & b"), Bar("x", 4.0, "four")], title="t<script>", unit="credits"
    )
    assert "<script>" not in svg
    assert "&lt;b&gt;" in svg
    assert "a &amp; b" in svg
    heights = [float(part.split('"')[0]) for part in svg.split('height="')[1:]]
    assert heights[1] == 4 * heights[0]
    assert bar_chart([], title="empty", unit="credits").startswith("<svg")


def test_earnings_fill_the_epochs_without_work_with_zeros() -> None:
    now = datetime(2026, 3, 10, 12, tzinfo=UTC)
    day = 86_400
    current = int(now.timestamp()) // day
    svg = fmt.earnings_chart(
        [contribution_pb.ContributionTotal(epoch=current - 1, jobs=3, amount_micro_credits=7)],
        day,
        14,
        now,
    )
    assert svg.count('class="bar"') == 14
    assert "3 jobs" in svg
    assert "Mar 10" in svg


def test_job_timings_read_as_milliseconds_seconds_or_minutes() -> None:
    start, later = Timestamp(seconds=1_000), Timestamp(seconds=1_000, nanos=240_000_000)
    assert fmt.elapsed(start, later) == "240 ms"
    assert fmt.elapsed(start, Timestamp(seconds=1_003, nanos=200_000_000)) == "3.2 s"
    assert fmt.elapsed(start, Timestamp()) == "—"  # not yet
    at = datetime.fromtimestamp(1_008, UTC)
    assert fmt.running_for(start, at) == "8 s"
    assert fmt.running_for(start, at + timedelta(minutes=5)) == "5 min"
