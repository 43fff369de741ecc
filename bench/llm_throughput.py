"""LLM throughput: the whole platform against llama.cpp called directly, and
against llama-cpp-python's own OpenAI server (the peer; `--no-peer` skips it).

Every side streams the same greedy chat completion of SmolLM2-135M-Instruct
from the same GGUF with the same llama.cpp settings, under the same cache
conditions: every side keeps its KV cache between requests, and each round's
prompt either starts a new conversation (``--cache cold``, the default: only
the chat template's opening can be reused) or repeats the previous one
(``--cache warm``: all of it can). Rounds alternate (direct, platform, peer,
direct, ...) after one warm-up each, so that all see the same machine; each
records the machine's load (bench/machine_load.py), and the report gives
medians over the rounds without foreign load and the platform/direct and
platform/peer ratios of medians.
See bench/README.md for the method and the latest numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import string
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from agent.runtime.llama_cpp import _load_llama
from agent.runtime.loader import RuntimeSettings
from agent.runtime.models import smollm2_gguf_path
from bench.clients import (
    REQUEST_TIMEOUT_S,
    BenchError,
    Sample,
    direct_prompt_tokens,
    greedy_kwargs,
    run_direct,
    run_platform,
)
from bench.cpu_usage import measured, wait_until_idle
from bench.llm_report import Rounds, build_report, render
from bench.machine_load import LoadSample, MachineLoad
from bench.peer_process import running_peer
from bench.platform_process import running_platform
from bench.processes import ProcessError

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
# What each round's prompt shares with what every side ran before (round_messages).
COLD, WARM = "cold", "warm"
CACHE_CONDITIONS = {
    COLD: "every side keeps its KV cache; each round's prompt starts a new conversation "
    "(a nonce of the round), so only the chat template's opening can be reused",
    WARM: "every side keeps its KV cache; the same prompt every round, reused but for "
    "its last token",
}
# Logged by the network for each disguised canary it sent a node (2% of jobs by default).
CANARY_LOG_EVENT = "canary checked"
# LlamaCppRuntime's default, which the agent uses: repacked CPU buffers (AMX) off.
CPU_REPACK = False
# The peer server runs without --api_key and ignores the bearer token.
PEER_KEY = "none"
Messages = list[dict[str, str]]
Measure = Callable[[Messages], tuple[Sample, dict[str, float]]]


def round_messages(sequence: int, cache: str) -> Messages:
    """The chat of the ``sequence``-th round (warm-ups first), the same on every side.

    Cold: the user message starts with the round's nonce, two letters, the one
    that changes every round first: it differs at its first token from the 25
    rounds before (more than any side keeps: the agent 16 idle conversations,
    the others one), so every side can reuse only the chat template's opening
    before it; it is as many tokens every round. Warm: the first round's chat
    every time, which every side can reuse but for its last token (evaluated
    again for its logits)."""
    number = sequence if cache == COLD else 0
    letters = string.ascii_uppercase
    nonce = f"Request {letters[number % 26]} {letters[number // 26 % 26]}: "
    return [{"role": "user", "content": nonce + PROMPT}]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds per side")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds per side")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--cache",
        choices=(COLD, WARM),
        default=COLD,
        help="cold: each round's prompt starts a new conversation, no side can reuse more "
        "than the chat template's opening; warm: the same prompt every round, every side "
        "reuses it (needs a warm-up round)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--start-timeout", type=float, default=180.0, help="seconds")
    parser.add_argument(
        "--budget", type=float, default=300.0, help="seconds; no new round starts past it"
    )
    parser.add_argument("--platform-log", type=Path, help="keep the platform's log here")
    parser.add_argument(
        "--no-peer",
        action="store_true",
        help="skip the peer side (llama-cpp-python's OpenAI server, `python -m llama_cpp.server`)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="llama.cpp threads on both sides (platform: `resultity up --agent-threads N`); "
        "default: every core, as `resultity up` runs its agent",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    try:
        _main(_parser().parse_args(argv))
    except KeyboardInterrupt:
        log("interrupted; the platform was stopped")
        raise SystemExit(130) from None
    except (BenchError, ProcessError, httpx.HTTPError) as error:
        log(f"failed: {error}")
        raise SystemExit(1) from None


def _main(args: argparse.Namespace) -> None:
    if args.rounds < 1 or args.warmup < 0 or args.max_tokens < 1:
        raise SystemExit("--rounds and --max-tokens must be positive, --warmup not negative")
    if args.cache == WARM and args.warmup < 1:
        raise SystemExit("--cache warm needs a warm-up round: it fills every side's cache")
    began = time.monotonic()
    settings = RuntimeSettings(threads=args.threads)
    model_path = settings.model_path or smollm2_gguf_path()

    # Same loader, path, context and threads as the agent's LlamaCppRuntime.
    llama = _load_llama(model_path, settings.context_length, settings.threads, CPU_REPACK)
    try:
        config: dict[str, Any] = {
            "model_id": settings.model_id,
            "model_file": model_path.name,
            "prompt": PROMPT,
            "cache": args.cache,
            "cache_conditions": CACHE_CONDITIONS[args.cache],
            "first_message": round_messages(0, args.cache)[0]["content"],
            # Every round's prompt is as long (round_messages); the checks hold the
            # platform's count of each to this.
            "prompt_tokens_direct": direct_prompt_tokens(llama, round_messages(0, args.cache)),
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "n_ctx": llama.n_ctx(),
            "n_threads": llama.n_threads,
            "n_threads_batch": llama.n_threads_batch,
            "cpu_repack": CPU_REPACK,
            "agent_threads_option": settings.threads,
            "slots": 1,
        }
        log(f"model {model_path.name}: threads {llama.n_threads}, batch {llama.n_threads_batch}")
        log("starting the platform (resultity up)")
        start = time.monotonic()
        with (
            contextlib.ExitStack() as peer_stack,
            running_platform(
                settings.model_id,
                start_timeout_s=args.start_timeout,
                # One slot, as on the direct side (streams are measured one at a time).
                agent_slots=1,
                log_path=args.platform_log,
                agent_threads=args.threads,
            ) as running,
            httpx.Client(timeout=REQUEST_TIMEOUT_S) as http,
        ):
            config["platform_start_s"] = round(time.monotonic() - start, 1)
            config["platform_commands"] = list(running.commands)
            log(f"platform serving after {config['platform_start_s']} s")

            def direct(messages: Messages) -> tuple[Sample, dict[str, float]]:
                return measured(lambda: run_direct(llama, messages, args.max_tokens), ())

            def platform(messages: Messages) -> tuple[Sample, dict[str, float]]:
                return measured(
                    lambda: run_platform(
                        http, running.base_url, running.api_key, settings.model_id, messages,
                        args.max_tokens,
                    ),
                    running.process_roots,
                )  # fmt: skip

            sides: list[tuple[str, Measure]] = [("direct", direct), ("platform", platform)]
            if not args.no_peer:
                peer = peer_stack.enter_context(
                    running_peer(
                        model_path, settings.model_id, llama, start_timeout_s=args.start_timeout
                    )
                )
                config["peer_command"] = peer.command
                log("peer serving (llama_cpp.server)")

                def peer_side(messages: Messages) -> tuple[Sample, dict[str, float]]:
                    return measured(
                        lambda: run_platform(
                            http, peer.base_url, PEER_KEY, settings.model_id, messages,
                            args.max_tokens, sampler=greedy_kwargs(args.max_tokens),
                            one_token_per_chunk=True,
                        ),
                        (peer.pid,),
                    )  # fmt: skip

                sides.append(("peer", peer_side))

            def settle() -> float:
                return wait_until_idle(running.process_roots)

            # The platform's processes (and an embedded PostgreSQL) are this run's own.
            load = MachineLoad(roots=set(running.process_roots))
            rounds = _interleave(
                sides,
                settle,
                args.rounds,
                args.warmup,
                began + args.budget,
                load,
                lambda sequence: round_messages(sequence, args.cache),
            )
            config["platform_canaries"] = _count_lines(running.log_path, CANARY_LOG_EVENT)
    finally:
        llama.close()

    report = build_report(config, rounds)
    report["wall_s"] = round(time.monotonic() - began, 1)
    print(render(report))
    print(load.summary())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"JSON written to {args.json}")


def _interleave(
    sides: list[tuple[str, Measure]],
    settle: Callable[[], float],
    rounds: int,
    warmup: int,
    deadline: float,
    load: MachineLoad,
    messages: Callable[[int], Messages],
) -> Rounds:
    """direct, platform, peer, direct, ...; never two at once, each from an idle
    platform (``settle`` waits for that and returns the seconds it took), each with
    the machine's load; stored in the ``Rounds`` fields named after the side. Every
    side of a round sends ``messages`` of the round's number (warm-ups first)."""
    result = Rounds()
    for index in range(warmup):
        chat = messages(index)
        for name, run in sides:
            result.idle_waits_s.append(settle())
            result.warmup[f"{name}_{index}"] = run(chat)[0]
    for index in range(rounds):
        pair_began = time.monotonic()
        chat = messages(warmup + index)
        for name, run in sides:
            samples: list[Sample] = getattr(result, name)
            cpu: list[dict[str, float]] = getattr(result, f"{name}_cpu")
            loads: list[LoadSample] = getattr(result, f"{name}_load")
            waited = settle()
            result.idle_waits_s.append(waited)
            if waited > 1.0:
                log(f"waited {waited:.1f} s for the platform to become idle")
            load.wait_for_quiet()
            began = load.start()
            sample, used = run(chat)
            loads.append(load.stop(began, f"{name} r{index + 1}"))
            samples.append(sample)
            cpu.append(used)
            log(
                f"round {index + 1}/{rounds} {name:8}: TTFT {sample.ttft_s * 1000:7.1f} ms, "
                f"{sample.decode_tokens_per_s:6.1f} tok/s decode, "
                f"{sample.end_to_end_tokens_per_s:6.1f} tok/s end-to-end, "
                f"{sample.completion_tokens} tokens; {loads[-1].describe()}"
            )
        if index + 1 < rounds and time.monotonic() + (time.monotonic() - pair_began) > deadline:
            log(f"time budget spent: stopping after {index + 1} of {rounds} rounds")
            break
    return result


def _count_lines(path: Path, needle: str) -> int:
    try:
        return sum(needle in line for line in path.read_text(errors="replace").splitlines())
    except OSError:
        return -1


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
