"""`resultity subclouds <command>`: the subcloud API from a terminal.

Authenticates like the other operator commands (RESULTITY_API_KEY with the
management or admin scope, else the service token) and prints responses as
JSON. Prices are integer micro-credits per token: `--model ID=PROMPT,COMPLETION`.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from resultity.cloud.v1 import subcloud_service_pb2 as pb
from resultity.cloud.v1 import subcloud_service_pb2_grpc as pb_grpc
from resultity.common.v1 import inference_pb2 as common_pb

from core import channels
from core.metadata import bearer_metadata
from server.addresses import grpc_target
from server.common.inference_logging_cli import logging_from_args, logging_options
from server.secrets import cli_credential

_ROLES = {"member": pb.SUBCLOUD_ROLE_MEMBER, "admin": pb.SUBCLOUD_ROLE_ADMIN}


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `resultity subclouds ...` to the top-level commands."""
    subclouds = commands.add_parser("subclouds", help="create and manage subclouds")
    subclouds.add_argument(
        "--cloud",
        help="HOST:PORT of cloud (default: the one `resultity up` wrote in --data-dir, "
        "else 127.0.0.1:50051)",
    )
    subclouds.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".resultity"),
        help="where the service token is read from unless RESULTITY_API_KEY or "
        "RESULTITY_SERVICE_TOKEN is set",
    )
    actions = subclouds.add_subparsers(dest="subclouds_command", required=True, metavar="COMMAND")

    create = actions.add_parser("create", help="create a subcloud")
    create.add_argument("name")
    create.add_argument("--owner", default="", help="owner account (admins; default: yours)")
    _model_option(create)
    _rule_options(create)

    actions.add_parser("list", help="your subclouds").add_argument("--page-token", default="")
    for name, text in (
        ("get", "show a subcloud"),
        ("archive", "archive a subcloud (its keys stop working)"),
        ("members", "list a subcloud's members"),
    ):
        actions.add_parser(name, help=text).add_argument("subcloud_id")

    rename = actions.add_parser("rename", help="rename a subcloud")
    rename.add_argument("subcloud_id")
    rename.add_argument("name")
    models = actions.add_parser("set-models", help="replace the models offered")
    models.add_argument("subcloud_id")
    _model_option(models)
    rules = actions.add_parser("set-rules", help="replace the node-eligibility rules")
    rules.add_argument("subcloud_id")
    _rule_options(rules)
    logging = actions.add_parser(
        "set-inference-logging",
        help="log the requests of the subcloud's keys (of members who opted in too), or stop",
    )
    logging.add_argument("subcloud_id")
    logging_options(logging)

    add = actions.add_parser("add-member", help="add a member or change its role")
    add.add_argument("subcloud_id")
    add.add_argument("account_id")
    add.add_argument("--role", choices=sorted(_ROLES), default="member")
    remove = actions.add_parser("remove-member", help="remove a member")
    remove.add_argument("subcloud_id")
    remove.add_argument("account_id")

    key = actions.add_parser("create-key", help="issue a key bound to the subcloud (shown once)")
    key.add_argument("subcloud_id")
    key.add_argument("--account", default="", help="member account (default: yours)")
    key.add_argument("--name", default="")
    key.add_argument("--model", action="append", default=[], help="allow only this model")
    key.add_argument("--expires-days", type=float)


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        type=_offer,
        metavar="ID[=PROMPT,COMPLETION]",
        help="offer this model, at these micro-credits per token (default: catalog price)",
    )


def _rule_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--operator", action="append", default=[], help="operator account")
    parser.add_argument("--region", action="append", default=[])
    parser.add_argument("--min-reputation", type=float, default=0.0)
    parser.add_argument("--verified-only", action="store_true")


def _offer(value: str) -> pb.SubcloudModel:
    model, _, prices = value.partition("=")
    if not prices:
        return pb.SubcloudModel(model=model)
    try:
        prompt, completion = (int(part) for part in prices.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("prices are PROMPT,COMPLETION integers") from None
    return pb.SubcloudModel(
        model=model,
        price=common_pb.ModelPrice(
            prompt_micro_credits_per_token=prompt, completion_micro_credits_per_token=completion
        ),
    )


def _rules(args: argparse.Namespace) -> pb.NodeRules:
    return pb.NodeRules(
        operator_account_ids=args.operator,
        regions=args.region,
        min_reputation=args.min_reputation,
        verified_only=args.verified_only,
    )


def _update(args: argparse.Namespace, field: str, **values: Any) -> pb.UpdateSubcloudRequest:
    return pb.UpdateSubcloudRequest(
        subcloud=pb.Subcloud(subcloud_id=args.subcloud_id, **values),
        update_mask=FieldMask(paths=[field]),
    )


def _key_request(args: argparse.Namespace) -> pb.CreateSubcloudApiKeyRequest:
    request = pb.CreateSubcloudApiKeyRequest(
        subcloud_id=args.subcloud_id,
        account_id=args.account,
        name=args.name,
        allowed_models=args.model,
    )
    if args.expires_days is not None:
        request.expires.FromDatetime(datetime.now(UTC) + timedelta(days=args.expires_days))
    return request


async def run_command(args: argparse.Namespace) -> None:
    metadata = bearer_metadata(cli_credential(args.data_dir))
    async with channels.insecure_channel(grpc_target(args.data_dir, args.cloud)) as channel:
        stub = pb_grpc.SubcloudServiceStub(channel)
        calls: dict[str, Callable[[], Awaitable[Message]]] = {
            "create": lambda: stub.CreateSubcloud(
                pb.CreateSubcloudRequest(
                    name=args.name,
                    owner_account_id=args.owner,
                    rules=_rules(args),
                    models=args.models,
                ),
                metadata=metadata,
            ),
            "list": lambda: stub.ListSubclouds(
                pb.ListSubcloudsRequest(page_token=args.page_token), metadata=metadata
            ),
            "get": lambda: stub.GetSubcloud(
                pb.GetSubcloudRequest(subcloud_id=args.subcloud_id), metadata=metadata
            ),
            "archive": lambda: stub.ArchiveSubcloud(
                pb.ArchiveSubcloudRequest(subcloud_id=args.subcloud_id), metadata=metadata
            ),
            "members": lambda: stub.ListSubcloudMembers(
                pb.ListSubcloudMembersRequest(subcloud_id=args.subcloud_id), metadata=metadata
            ),
            "rename": lambda: stub.UpdateSubcloud(
                _update(args, "name", name=args.name), metadata=metadata
            ),
            "set-models": lambda: stub.UpdateSubcloud(
                _update(args, "models", models=args.models), metadata=metadata
            ),
            "set-rules": lambda: stub.UpdateSubcloud(
                _update(args, "rules", rules=_rules(args)), metadata=metadata
            ),
            "set-inference-logging": lambda: stub.UpdateSubcloud(
                _update(args, "inference_logging", inference_logging=logging_from_args(args)),
                metadata=metadata,
            ),
            "add-member": lambda: stub.PutSubcloudMember(
                pb.PutSubcloudMemberRequest(
                    subcloud_id=args.subcloud_id,
                    account_id=args.account_id,
                    role=_ROLES[args.role],
                ),
                metadata=metadata,
            ),
            "remove-member": lambda: stub.RemoveSubcloudMember(
                pb.RemoveSubcloudMemberRequest(
                    subcloud_id=args.subcloud_id, account_id=args.account_id
                ),
                metadata=metadata,
            ),
            "create-key": lambda: stub.CreateSubcloudApiKey(_key_request(args), metadata=metadata),
        }
        response: Any = await calls[args.subclouds_command]()
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
