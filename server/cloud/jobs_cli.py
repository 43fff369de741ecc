"""`resultity jobs list|get`: the jobs API from a terminal.

Authenticates like the other operator commands (RESULTITY_API_KEY with the
management scope reads its account's jobs, the admin scope or the service token
everyone's) and prints a table (list) or the job's details (get, with its request's
log if asked); --json prints the API's response instead.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from resultity.cloud.v1 import job_service_pb2 as pb
from resultity.cloud.v1 import job_service_pb2_grpc as pb_grpc

from core import channels
from core.metadata import bearer_metadata
from server.addresses import grpc_target
from server.secrets import cli_credential

_OUTCOMES = {
    "running": pb.JOB_OUTCOME_RUNNING,
    "finished": pb.JOB_OUTCOME_FINISHED,
    "failed": pb.JOB_OUTCOME_FAILED,
    "cancelled": pb.JOB_OUTCOME_CANCELLED,
}
_OUTCOME_NAMES = {value: name for name, value in _OUTCOMES.items()}
_COLUMNS = (
    "JOB",
    "CREATED",
    "ACCOUNT",
    "MODEL",
    "NODE",
    "TOKENS",
    "COST",
    "TTFT",
    "TIME",
    "OUTCOME",
)
_AGO = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `resultity jobs ...` to the top-level commands."""
    jobs = commands.add_parser("jobs", help="the jobs that ran inference requests")
    jobs.add_argument(
        "--cloud",
        help="HOST:PORT of cloud (default: the one `resultity up` wrote in --data-dir, "
        "else 127.0.0.1:50051)",
    )
    jobs.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".resultity"),
        help="where the service token is read from unless RESULTITY_API_KEY or "
        "RESULTITY_SERVICE_TOKEN is set",
    )
    actions = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")

    listing = actions.add_parser("list", help="jobs, newest first, one a line")
    listing.add_argument(
        "--account",
        default="",
        help="only this account's (default: all for admins, your own otherwise)",
    )
    listing.add_argument("--model", default="")
    listing.add_argument(
        "--outcome", action="append", choices=sorted(_OUTCOMES), default=[], help="repeatable"
    )
    listing.add_argument("--request-id", default="", help="the jobs of one request")
    listing.add_argument(
        "--since",
        type=_moment,
        help="created at or after: ISO 8601 (UTC if no zone) or 30m, 2h, 7d",
    )
    listing.add_argument("--until", type=_moment, help="created before (same forms)")
    listing.add_argument("--limit", type=int, default=0, help="jobs per page, at most 100")
    listing.add_argument("--page-token", default="", help="the page after a previous one")
    listing.add_argument("--json", action="store_true", help="print the API's response")

    get = actions.add_parser("get", help="one job")
    get.add_argument("job_id")
    get.add_argument("--with-log", action="store_true", help="with its request's log, if kept")
    get.add_argument("--json", action="store_true", help="print the API's response")


def _moment(value: str) -> datetime:
    """An ISO 8601 time, or a span back from now ("90s", "30m", "2h", "7d")."""
    ago = _AGO.match(value)
    if ago:
        return datetime.now(UTC) - timedelta(**{_UNITS[ago.group(2)]: int(ago.group(1))})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither an ISO 8601 time nor a span like 30m, 2h or 7d"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _stamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def run_command(args: argparse.Namespace) -> None:
    metadata = bearer_metadata(cli_credential(args.data_dir))
    async with channels.insecure_channel(grpc_target(args.data_dir, args.cloud)) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        response: Message
        if args.jobs_command == "list":
            listed = await stub.ListJobs(
                pb.ListJobsRequest(
                    account_id=args.account,
                    model=args.model,
                    outcomes=[_OUTCOMES[name] for name in args.outcome],
                    request_id=args.request_id,
                    created_after=_stamp(args.since),
                    created_before=_stamp(args.until),
                    page_size=args.limit,
                    page_token=args.page_token,
                ),
                metadata=metadata,
            )
            response, text = listed, job_table(listed.jobs, listed.next_page_token)
        else:
            got = await stub.GetJob(
                pb.GetJobRequest(job_id=args.job_id, with_log=args.with_log), metadata=metadata
            )
            response, text = got, job_details(got, with_log=args.with_log)
    print(
        json_format.MessageToJson(response, preserving_proto_field_name=True) if args.json else text
    )


def job_table(jobs: Sequence[pb.Job], next_page_token: str = "") -> str:
    rows = [_COLUMNS] + [
        (
            job.job_id,
            _when(job.created),
            job.account_id[:8],
            job.model,
            _nodes(job),
            f"{job.usage.prompt_tokens}+{job.usage.completion_tokens}",
            _credits(job.cost_micro_credits),
            _after(job.created, job.first_token),
            _after(job.created, job.finished),
            _outcome(job),
        )
        for job in jobs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    if next_page_token:
        lines.append(f"more: --page-token {next_page_token}")
    return "\n".join(lines)


def job_details(response: pb.GetJobResponse, *, with_log: bool) -> str:
    job = response.job
    lines = [
        f"job:          {job.job_id}",
        f"request:      {job.request_id or '-'}",
        f"account:      {job.account_id}",
        f"subcloud:     {job.subcloud_id or '-'}",
        f"model:        {job.model}",
        f"outcome:      {_outcome(job)}" + (f" ({job.detail})" if job.detail else ""),
        f"tokens:       {job.usage.prompt_tokens} prompt, {job.usage.completion_tokens} completion",
        f"price:        {job.price.prompt_micro_credits_per_token} prompt, "
        f"{job.price.completion_micro_credits_per_token} completion (micro-credits per token)",
        f"cost:         {_credits(job.cost_micro_credits)} credits",
        f"created:      {_when(job.created)}",
        f"first token:  {_after(job.created, job.first_token)}",
        f"finished:     {_after(job.created, job.finished)}",
        "nodes:",
    ]
    for node in job.nodes:
        lines.append(
            f"  epoch {node.epoch}: {node.node_id} "
            f"(operator {node.operator_account_id or '-'}, from {_when(node.assigned)})"
        )
    if with_log:
        if not response.HasField("log"):
            lines.append("log:          none kept (not opted in, expired, or dropped)")
        else:
            log = response.log
            lines += [
                f"log:          kept until {_when(log.expires)}, jobs {', '.join(log.job_ids)}",
                "request:",
                _indented(json_format.MessageToDict(log.request)),
                "response:",
                _indented(json_format.MessageToDict(log.response)),
            ]
    return "\n".join(lines)


def _indented(value: object) -> str:
    return "\n".join("  " + line for line in json.dumps(value, indent=2).splitlines())


def _when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _after(start: Timestamp, stamp: Timestamp) -> str:
    """The time from ``start`` to ``stamp``; "-" when it has not happened."""
    if not stamp.seconds and not stamp.nanos:
        return "-"
    milliseconds = (stamp.ToNanoseconds() - start.ToNanoseconds()) / 1e6
    return f"{milliseconds:.0f}ms" if milliseconds < 10_000 else f"{milliseconds / 1000:.1f}s"


def _nodes(job: pb.Job) -> str:
    if not job.nodes:
        return "-"
    last = job.nodes[-1].node_id[:12]
    return last if len(job.nodes) == 1 else f"{last} (+{len(job.nodes) - 1} before)"


def _outcome(job: pb.Job) -> str:
    return _OUTCOME_NAMES.get(job.outcome, "unknown")


def _credits(micro: int) -> str:
    return f"{micro / 1_000_000:.6f}"
