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
from resultity.cloud.v1 import job_service_pb2 as jobs_pb
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


def job_status(value: int) -> str:
    return enum_name(jobs_pb.JobOutcome, value, "JOB_OUTCOME_")


def elapsed(start: Timestamp, end: Timestamp) -> str:
    """The time from ``start`` to ``end`` ("—" when it has not happened): "240 ms",
    "3.2 s"."""
    if not end.seconds and not end.nanos:
        return "—"
    milliseconds = (end.ToNanoseconds() - start.ToNanoseconds()) / 1e6
    return f"{milliseconds:.0f} ms" if milliseconds < 1000 else f"{milliseconds / 1000:.1f} s"


def running_for(start: Timestamp, now: datetime | None = None) -> str:
    """How long since ``start``: "8 s", "3 min"."""
    seconds = max(0.0, ((now or datetime.now(UTC)) - start.ToDatetime(UTC)).total_seconds())
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def job_nodes(job: jobs_pb.Job, names: dict[str, str] | None = None) -> str:
    """The nodes a job ran on, in order, by name where ``names`` knows them."""
    known = names or {}
    return " → ".join(known.get(node.node_id, node.node_id[:12]) for node in job.nodes) or "—"


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
