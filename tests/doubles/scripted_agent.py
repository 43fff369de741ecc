"""An agent process with the scripted runtime, for tests that signal real processes.

    python -m tests.doubles.scripted_agent --network HOST:PORT --name NAME
        [--script TEXT] [--token-delay S] [--drain-grace S] [--slots N] [--region R]
        [--data-dir DIR] [--answer-canaries]

The same session and signal handling as `resultity agent` (SIGTERM drains), and
its tracing (OTEL_EXPORTER_OTLP_ENDPOINT), without loading a model; its node
token comes from RESULTITY_NODE_TOKEN, as `resultity agent`'s does by default,
and with --data-dir its key is kept there (the same node when started again),
else it is a new node.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from agent.identity import NodeIdentity
from agent.main import serve
from agent.session import SessionSettings
from core import tracing
from core.logging import configure_logging
from tests.doubles.scripted_runtime import DEFAULT_SCRIPT, ScriptedRuntime, canary_answers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--network", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--script", default=DEFAULT_SCRIPT)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--drain-grace", type=float, default=30.0)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--region", default="")
    parser.add_argument("--data-dir", type=Path)
    # Passes a validating network's join checks and in-service canaries.
    parser.add_argument("--answer-canaries", action="store_true")
    args = parser.parse_args()
    configure_logging("info")
    tracing.configure_tracing("agent")
    settings = SessionSettings(
        network=args.network,
        node_name=args.name,
        drain_grace_s=args.drain_grace,
        node_token=os.environ.get("RESULTITY_NODE_TOKEN", ""),
        region=args.region,
        identity=(
            NodeIdentity.generate()
            if args.data_dir is None
            else NodeIdentity.load_or_create(args.data_dir)
        ),
    )
    runtime = ScriptedRuntime(
        script=args.script,
        token_delay_s=args.token_delay,
        slot_count=args.slots,
        answers=canary_answers() if args.answer_canaries else {},
    )
    try:
        asyncio.run(serve(settings, runtime))
    finally:
        tracing.shutdown_tracing()


if __name__ == "__main__":
    main()
