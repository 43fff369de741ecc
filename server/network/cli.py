"""`resultity nodes list|get|drain|quarantine|release|acks`: the node admin API from a
terminal.

Talks to a network server's NodeAdminService (--network HOST:PORT) with the
platform's service token (RESULTITY_SERVICE_TOKEN, or the one in --data-dir)
and prints a table (list, acks) or the node's details with its per-model
validation.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp
from resultity.network.v1 import node_admin_service_pb2 as pb
from resultity.network.v1 import node_admin_service_pb2_grpc as pb_grpc

from core import channels
from core.metadata import bearer_metadata
from server.addresses import grpc_target
from server.secrets import service_token

_STATES = {
    pb.NODE_STATE_READY: "ready",
    pb.NODE_STATE_SUSPECT: "suspect",
    pb.NODE_STATE_DRAINING: "draining",
    pb.NODE_STATE_QUARANTINED: "quarantined",
    pb.NODE_STATE_VALIDATING: "validating",
}
_VALIDATIONS = {
    pb.MODEL_VALIDATION_PENDING: "pending",
    pb.MODEL_VALIDATION_PASSED: "passed",
    pb.MODEL_VALIDATION_FAILED: "failed",
}
_COLUMNS = ("NODE", "NAME", "REGION", "STATE", "JOBS", "REPUTATION", "MODELS", "SEEN")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `resultity nodes ...` to the top-level commands."""
    nodes = commands.add_parser("nodes", help="list and manage the nodes of a network server")
    nodes.add_argument(
        "--network",
        help="HOST:PORT of the network server (default: the one `resultity up` wrote in "
        "--data-dir, else 127.0.0.1:50051)",
    )
    nodes.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".resultity"),
        help="where the service token is read from unless RESULTITY_SERVICE_TOKEN is set",
    )
    actions = nodes.add_subparsers(dest="nodes_command", required=True, metavar="COMMAND")
    actions.add_parser("list", help="connected nodes, one a line")
    for name, text in (("get", "show a node"), ("drain", "send a node no new jobs")):
        actions.add_parser(name, help=text).add_argument("node_id")
    quarantine = actions.add_parser("quarantine", help="take a node out of service")
    quarantine.add_argument("node_id")
    quarantine.add_argument("--reason", default="", help="shown to operators")
    release = actions.add_parser(
        "release", help="return a quarantined node to service (now, or when it joins again)"
    )
    release.add_argument("node_id")
    acks = actions.add_parser(
        "acks", help="which nodes acknowledged a configuration version (on every replica)"
    )
    acks.add_argument("--version", type=int, default=0, help="default: the current version")


async def run_command(args: argparse.Namespace) -> None:
    token = service_token(args.data_dir)
    metadata = bearer_metadata(token)
    target = grpc_target(args.data_dir, args.network)
    async with channels.insecure_channel(target) as channel:
        stub = pb_grpc.NodeAdminServiceStub(channel)
        command = args.nodes_command
        if command == "list":
            listed = await stub.ListNodes(pb.ListNodesRequest(), metadata=metadata)
            print(node_table(listed.nodes, now=time.time()))
            return
        if command == "acks":
            print(await _acks_table(stub, args.version, metadata))
            return
        if command == "get":
            request = pb.GetNodeRequest(node_id=args.node_id)
            node = (await stub.GetNode(request, metadata=metadata)).node
        elif command == "release":
            released = await stub.ReleaseNode(
                pb.ReleaseNodeRequest(node_id=args.node_id), metadata=metadata
            )
            if not released.HasField("node"):
                print(f"{args.node_id} released; it may join again")
                return
            node = released.node
        elif command == "drain":
            drain = pb.DrainNodeRequest(node_id=args.node_id)
            node = (await stub.DrainNode(drain, metadata=metadata)).node
        else:
            quarantine = pb.QuarantineNodeRequest(node_id=args.node_id, reason=args.reason)
            node = (await stub.QuarantineNode(quarantine, metadata=metadata)).node
        print(node_details(node, now=time.time()))


async def _acks_table(
    stub: pb_grpc.NodeAdminServiceAsyncStub, version: int, metadata: tuple[tuple[str, str], ...]
) -> str:
    """Every page of the version's acknowledgements, one node a line."""
    rows = [("NODE", "ACKED AT")]
    token = ""
    while True:
        page = await stub.ListConfigAcks(
            pb.ListConfigAcksRequest(version=version, page_token=token), metadata=metadata
        )
        version = page.version
        rows += [(ack.node_id, ack.acked_at.ToDatetime().isoformat()) for ack in page.acks]
        token = page.next_page_token
        if not token:
            break
    width = max(len(node) for node, _ in rows)
    lines = [f"version {version}: {len(rows) - 1} nodes acknowledged"]
    lines += [f"{node.ljust(width)}  {acked}" for node, acked in rows]
    return "\n".join(lines)


def _ago(stamp: Timestamp, now: float) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return f"{max(0.0, now - stamp.ToNanoseconds() / 1e9):.0f}s ago"


def _state(node: pb.Node) -> str:
    return _STATES.get(node.state, "unknown")


def _models(node: pb.Node) -> str:
    if not node.model_status:
        return ",".join(node.models)
    return ",".join(
        f"{s.model}({_VALIDATIONS.get(s.validation, 'unchecked')})" for s in node.model_status
    )


def node_table(nodes: Sequence[pb.Node], *, now: float) -> str:
    rows = [_COLUMNS] + [
        (
            node.node_id,
            node.node_name,
            node.region or "-",
            _state(node),
            f"{node.active_jobs}/{node.max_concurrent_jobs}",
            f"{node.reputation:.2f}",
            _models(node),
            _ago(node.last_heartbeat_at, now),
        )
        for node in nodes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def node_details(node: pb.Node, *, now: float) -> str:
    lines = [
        f"node:          {node.node_id}",
        f"name:          {node.node_name}",
        f"state:         {_state(node)}",
    ]
    if node.quarantine_reason:
        lines.append(f"quarantined:   {node.quarantine_reason}")
    lines += [
        f"agent:         {node.agent_version}",
        f"operator:      {node.operator_account_id or '-'}",
        f"region:        {node.region or '-'}",
        f"verified:      {'yes' if node.verified else 'no'}",
        f"jobs:          {node.active_jobs}/{node.max_concurrent_jobs}",
        f"reputation:    {node.reputation:.2f}",
        f"config:        v{node.config_version}",
        f"connected:     {_ago(node.connected_at, now)}",
        f"last seen:     {_ago(node.last_heartbeat_at, now)}",
        "models:",
    ]
    for status in node.model_status:
        lines.append(
            f"  {status.model}: {_VALIDATIONS.get(status.validation, 'unchecked')}, "
            f"TTFT {status.time_to_first_token_ms:.0f} ms, "
            f"{status.tokens_per_second:.1f} tokens/s"
        )
    return "\n".join(lines)
