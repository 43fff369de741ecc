"""Consumer usage: a projection of the ledger's ``usage.settled`` events into one
record per settled request and hourly totals per account, and reading them.

Like the operator earnings projection (earnings.py) it is a consumer of the
ledger's events and lags the ledger by the relay's delay; a record is keyed by
its hold, so a redelivered event changes nothing. The ledger's transfers stay
the system of record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol
from uuid import UUID

import structlog

from core.errors import InvalidArgument
from core.ids import parse_id
from server.account.authz import Principal
from server.account.ledger import HoldStatus
from server.account.ledger_events import USAGE_SETTLED, LedgerEvent
from server.common.paging import decode_cursor, encode_cursor, page_size

log = structlog.get_logger(__name__)

# The durable name of the projection's subscription (its queue on RabbitMQ is
# ``AmqpNames.ledger_queue`` of it).
CONSUMER = "consumer-usage"

DEFAULT_INTERVALS = 24
MAX_INTERVALS = 366


class Interval(StrEnum):
    HOUR = "hour"
    DAY = "day"

    @property
    def length(self) -> timedelta:
        return timedelta(hours=1) if self is Interval.HOUR else timedelta(days=1)

    def start_of(self, moment: datetime) -> datetime:
        """The UTC interval ``moment`` falls in."""
        moment = moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        return moment if self is Interval.HOUR else moment.replace(hour=0)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    hold_id: UUID
    account_id: UUID
    status: HoldStatus
    held: int
    charged: int
    tokens: int
    settled_at: datetime


@dataclass(frozen=True, slots=True)
class UsageBucket:
    start: datetime
    requests: int = 0
    tokens: int = 0
    charged: int = 0


class UsageStore(Protocol):
    async def add(self, record: UsageRecord) -> bool:
        """Stores the record and adds it to its account's hour unless its hold was
        recorded before; whether it counted now."""
        ...

    async def records(
        self, account_id: UUID, limit: int, before: tuple[datetime, UUID] | None
    ) -> list[UsageRecord]: ...

    async def totals(
        self, account_id: UUID, interval: Interval, since: datetime
    ) -> list[UsageBucket]:
        """Sums per interval from ``since`` on; intervals without requests left out."""
        ...


class ConsumerUsage:
    def __init__(
        self, store: UsageStore, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._store = store
        self._clock = clock

    async def project(self, event: LedgerEvent) -> None:
        """Records a ``usage.settled`` event; a malformed one is refused."""
        if event.kind != USAGE_SETTLED:
            raise InvalidArgument(f"not a usage event: {event.kind}")
        payload = event.payload
        try:
            record = UsageRecord(
                hold_id=UUID(str(payload["hold_id"])),
                account_id=UUID(str(payload["account_id"])),
                status=HoldStatus(str(payload["status"])),
                held=_integer(payload["held"]),
                charged=_integer(payload["captured"]),
                tokens=_integer(payload["total_tokens"]),
                settled_at=datetime.fromisoformat(str(payload["settled_at"])),
            )
        except (KeyError, ValueError) as error:
            raise InvalidArgument(f"malformed usage event {event.event_id}: {error}") from None
        if not await self._store.add(record):
            log.debug("usage event seen before", event_id=str(event.event_id))

    async def records(
        self, caller: Principal, account_id: str, requested_size: int, page_token: str
    ) -> tuple[list[UsageRecord], str]:
        """The account's records, newest first, and the next page's token."""
        owner = _access(caller, account_id)
        limit = page_size(requested_size)
        found = await self._store.records(owner, limit, decode_cursor(page_token))
        last = found[-1] if len(found) == limit else None
        return found, "" if last is None else encode_cursor(last.settled_at, last.hold_id)

    async def history(
        self, caller: Principal, account_id: str, interval: Interval, intervals: int
    ) -> list[UsageBucket]:
        """Totals of the last ``intervals`` intervals, oldest first, zeros included."""
        owner = _access(caller, account_id)
        if not 0 <= intervals <= MAX_INTERVALS:
            raise InvalidArgument(f"intervals must be 0 to {MAX_INTERVALS}", field="intervals")
        count = intervals or DEFAULT_INTERVALS
        current = interval.start_of(self._clock())
        starts = [current - interval.length * back for back in range(count - 1, -1, -1)]
        found = {
            bucket.start: bucket for bucket in await self._store.totals(owner, interval, starts[0])
        }
        return [found.get(start, UsageBucket(start)) for start in starts]


def _access(caller: Principal, account_id: str) -> UUID:
    owner = parse_id(account_id, field="account_id")
    caller.require_access(owner)
    return owner


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value
