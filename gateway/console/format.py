"""How the console shows the platform's values: credits, times, enum names, and the
charts and fleet summaries built from them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import contribution_service_pb2 as contribution_pb
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import usage_service_pb2 as usage_pb
from resultity.network.v1 import node_admin_service_pb2 as admin_pb

from gateway.console.charts import Bar, bar_chart

MICRO = 1_000_000


def credits(micro: int) -> str:
    """Micro-credits as credits: 12.5 -> "12.50", 0.000123 -> "0.000123"."""
    whole = f"{micro / MICRO:,.6f}".rstrip("0")
    return whole + "0" * max(0, 2 - len(whole.partition(".")[2]))


def when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "—"
    return stamp.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def enum_name(enum: object, value: int, prefix: str) -> str:
    """ "NODE_STATE_READY" -> "ready"."""
    name: str = enum.Name(value)  # type: ignore[attr-defined]
    return name.removeprefix(prefix).lower().replace("_", " ")


def node_state(value: int) -> str:
    return enum_name(admin_pb.NodeState, value, "NODE_STATE_")


def hold_status(value: int) -> str:
    if value == ledger_pb.HOLD_STATUS_SETTLED:
        return "charged"
    return enum_name(ledger_pb.HoldStatus, value, "HOLD_STATUS_")


def payout_status(value: int) -> str:
    return enum_name(ledger_pb.PayoutStatus, value, "PAYOUT_STATUS_")


def scopes(key: keys_pb.ApiKey) -> str:
    return ", ".join(enum_name(keys_pb.ApiKeyScope, s, "API_KEY_SCOPE_") for s in key.scopes)


def usage_chart(history: usage_pb.GetUsageHistoryResponse) -> str:
    hourly = history.interval != usage_pb.USAGE_INTERVAL_DAY
    bars = []
    for bucket in history.buckets:
        start = bucket.start.ToDatetime(UTC)
        label = start.strftime("%H:00" if hourly else "%b %d")
        bars.append(
            Bar(
                label,
                bucket.charged_micro_credits / MICRO,
                f"{start:%Y-%m-%d %H:%M} UTC: {bucket.requests} requests, "
                f"{bucket.tokens} tokens, {credits(bucket.charged_micro_credits)} credits",
            )
        )
    period = "hour" if hourly else "day"
    return bar_chart(bars, title=f"Credits spent per {period}", unit="credits")


def earnings_chart(
    epochs: Sequence[contribution_pb.ContributionTotal],
    epoch_seconds: int,
    count: int,
    now: datetime | None = None,
) -> str:
    """The last ``count`` epochs up to the current one, those without work as zeros."""
    current = int((now or datetime.now(UTC)).timestamp()) // epoch_seconds
    earned = {epoch.epoch: epoch for epoch in epochs}
    bars = []
    for index in range(current - count + 1, current + 1):
        epoch = earned.get(index, contribution_pb.ContributionTotal(epoch=index))
        start = datetime.fromtimestamp(index * epoch_seconds, UTC)
        label = f"{start:%b %d}" if epoch_seconds >= 86_400 else f"{start:%H:%M}"
        bars.append(
            Bar(
                label,
                epoch.amount_micro_credits / MICRO,
                f"epoch {index} ({start:%Y-%m-%d %H:%M} UTC): {epoch.jobs} jobs, "
                f"{epoch.tokens} tokens, {credits(epoch.amount_micro_credits)} credits",
            )
        )
    return bar_chart(bars, title="Credits earned per epoch", unit="credits")


def fleet(nodes: Sequence[admin_pb.Node]) -> dict[str, list[tuple[str, int]]]:
    """Node counts by state, region and model, largest first."""
    return {
        "state": Counter(node_state(n.state) for n in nodes).most_common(),
        "region": Counter(n.region or "undeclared" for n in nodes).most_common(),
        "model": Counter(m for n in nodes for m in n.models).most_common(),
    }


def config_versions(nodes: Sequence[admin_pb.Node]) -> list[tuple[int, int]]:
    """How many nodes run each configuration version, newest first."""
    return sorted(Counter(n.config_version for n in nodes).items(), reverse=True)
