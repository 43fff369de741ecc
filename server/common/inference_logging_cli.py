"""The inference logging options of `resultity account set-inference-logging` and
`resultity subclouds set-inference-logging`."""

from __future__ import annotations

import argparse

from resultity.common.v1 import inference_logging_pb2 as pb

from server.common.inference_logging import DEFAULT_RETENTION_DAYS, MAX_RETENTION_DAYS


def logging_options(parser: argparse.ArgumentParser) -> None:
    state = parser.add_mutually_exclusive_group(required=True)
    state.add_argument("--on", dest="logging", action="store_true", help="log requests")
    state.add_argument("--off", dest="logging", action="store_false", help="stop logging")
    parser.add_argument(
        "--retention-days",
        type=int,
        default=0,
        help=f"days a log is kept, 1-{MAX_RETENTION_DAYS} (default {DEFAULT_RETENTION_DAYS})",
    )


def logging_from_args(args: argparse.Namespace) -> pb.InferenceLogging:
    return pb.InferenceLogging(enabled=args.logging, retention_days=args.retention_days)
