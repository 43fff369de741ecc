"""Prefix affinity through the platform: does a chat's next turn land on the node
that caches the conversation, and how much sooner does it start?

`resultity up` with its local llama.cpp agent plus one more agent joining as an
operator's would (bench/platform_process.py), both serving SmolLM2-135M with one
slot and one llama.cpp thread. A round is two conversations:

1. **turn 1** of both at once, each a long system prompt (distinct per
   conversation) and a question, cold on every node: the router puts them on
   different nodes (its load score), so each node holds one conversation;
2. after ``--think-time`` seconds (a person reading the answer), the
   **follow-ups** (the opening, the answer and a new question), one after the
   other, each alone: a choice between two idle nodes of which one holds it.
   Without the prefix scorer, speed and then the least recently assigned node
   would decide, neither of which knows where a conversation is: about 50 %;
3. the **cold follow-ups**, alone too: the same shape, cached nowhere (the
   follow-up's messages under a system prompt whose first word differs, so as
   long but sharing no cached tokens): what a follow-up costs on a node without
   its prefix, i.e. when it lands elsewhere.

Every request is a streamed, greedy chat completion through the OpenAI HTTP
gateway; its node comes from the jobs API (`GET /v1/jobs?request_id=...`). The
report gives the share of follow-ups that landed on turn 1's node, TTFT of each
turn and the follow-up/cold ratio taken within each round, with the machine's
load per round (bench/machine_load.py). See bench/README.md, "Prefix affinity
through the platform".
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.runtime.loader import RuntimeSettings
from bench.clients import REQUEST_TIMEOUT_S, BenchError, Sample, run_platform
from bench.cpu_usage import wait_until_idle
from bench.machine_load import MARKS, LoadSample, MachineLoad, cell
from bench.platform_process import RunningPlatform, running_platform
from bench.processes import ProcessError

# Facts the system prompts are drawn from: plain words, about 12 tokens a fact.
_NAMES = ("Ada", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas")
_THINGS = ("lamp", "bicycle", "kettle", "atlas", "violin", "compass", "garden", "clock", "boat")
_PLACES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Tartu", "Quito", "Porto", "Hanoi")
_COLOURS = ("red", "green", "blue", "yellow", "grey", "white", "black", "orange", "purple")
FIRST_QUESTION = "Who keeps the violin, and where? Answer in one sentence."
FOLLOW_UP_QUESTION = "And which colour is it? Answer briefly."
JOB_RECORD_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Turn:
    sample: Sample
    node_id: str
    # The job record's time from the job's start on the node to its first token.
    node_ttft_ms: float | None


@dataclass(frozen=True)
class Round:
    first: Turn
    follow_up: Turn
    cold: Turn
    load: LoadSample

    @property
    def landed(self) -> bool:
        return self.follow_up.node_id == self.first.node_id


def system_prompt(conversation: int, facts: int, marker: str) -> str:
    """About 12 tokens a fact; ``marker`` opens it, so that two prompts differing
    only in it share no cached tokens past the chat template's first few."""
    pick = random.Random(conversation)
    lines = [
        f"{marker} {conversation}. You are the archivist of a small museum. "
        "Answer from these records only:"
    ]
    for number in range(1, facts + 1):
        lines.append(
            f"Record {number}: {pick.choice(_NAMES)} keeps a {pick.choice(_COLOURS)} "
            f"{pick.choice(_THINGS)} in {pick.choice(_PLACES)}."
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__)
    parser.add_argument(
        "--rounds", type=int, default=3, help="measured rounds, two conversations each"
    )
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds")
    parser.add_argument("--facts", type=int, default=40, help="records in each system prompt")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--think-time", type=float, default=1.0, help="seconds between turn 1 and its follow-up"
    )
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per agent")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--platform-log", type=Path, help="keep the platform's log here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    model = RuntimeSettings().model_id
    log("starting the platform (resultity up) and a second agent")
    began = time.monotonic()
    try:
        with (
            running_platform(
                model,
                start_timeout_s=args.start_timeout,
                agent_slots=1,
                log_path=args.platform_log,
                agent_threads=args.threads,
                extra_agents=1,
            ) as running,
            httpx.Client(timeout=REQUEST_TIMEOUT_S) as http,
        ):
            log(f"two nodes serving after {time.monotonic() - began:.1f} s")
            load = MachineLoad(roots=set(running.process_roots))
            rounds = _run(http, running, model, args, load)
    except (ProcessError, BenchError) as error:
        raise SystemExit(f"bench: {error}") from None
    report = _report(rounds, args)
    print(_render(report))
    print(load.summary())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"JSON written to {args.json}")


def _run(
    http: httpx.Client,
    running: RunningPlatform,
    model: str,
    args: argparse.Namespace,
    load: MachineLoad,
) -> list[Round]:
    def turn(messages: list[dict[str, str]]) -> Turn:
        sample = run_platform(
            http, running.base_url, running.api_key, model, messages, args.max_tokens
        )
        return Turn(sample, *_job_node(http, running, sample))

    rounds: list[Round] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for index in range(args.warmup + args.rounds):
            warm = index < args.warmup
            label = f"warm-up {index + 1}" if warm else f"round {index - args.warmup + 1}"
            wait_until_idle(running.process_roots)
            load.wait_for_quiet()
            started = load.start()
            openings = [_opening(2 * index + side, args.facts) for side in (0, 1)]
            # Together, so that the router puts them on different nodes (load).
            firsts = list(pool.map(turn, openings))
            time.sleep(args.think_time)
            # Alone, one after the other: each a choice between two idle nodes, of
            # which one holds its conversation; the order alternates between rounds.
            order = (0, 1) if index % 2 == 0 else (1, 0)
            follow_ups = {side: turn([*openings[side], *_rest(firsts[side])]) for side in order}
            colds = {
                side: turn(
                    [_twin(2 * index + side, args.facts), openings[side][1], *_rest(firsts[side])]
                )
                for side in order
            }
            sample = load.stop(started, "" if warm else label)
            pair = [Round(firsts[s], follow_ups[s], colds[s], sample) for s in (0, 1)]
            for side, measured in enumerate(pair):
                log(
                    f"{label}{'ab'[side]}: turn 1 {_describe(measured.first)}; follow-up "
                    f"{_describe(measured.follow_up)} "
                    f"{'same node' if measured.landed else 'OTHER NODE'}; "
                    f"cold {_describe(measured.cold)}"
                )
            log(f"{label}: {sample.describe()}")
            if not warm:
                rounds += pair
    return rounds


def _opening(conversation: int, facts: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": system_prompt(conversation, facts, "Archive")},
        {"role": "user", "content": FIRST_QUESTION},
    ]


def _twin(conversation: int, facts: int) -> dict[str, str]:
    """The opening's system prompt under another first word: as long, cached nowhere."""
    return {"role": "system", "content": system_prompt(conversation, facts, "Catalogue")}


def _rest(first: Turn) -> list[dict[str, str]]:
    """What a follow-up adds to the opening: turn 1's answer and a new question."""
    return [
        {"role": "assistant", "content": first.sample.text},
        {"role": "user", "content": FOLLOW_UP_QUESTION},
    ]


def _describe(turn: Turn) -> str:
    return (
        f"{turn.sample.ttft_s * 1000:.0f} ms ({turn.sample.prompt_tokens} prompt tokens, "
        f"node {turn.node_id[:8]})"
    )


def _job_node(
    http: httpx.Client, running: RunningPlatform, sample: Sample
) -> tuple[str, float | None]:
    """The node that served the request and its TTFT, from the request's job record
    (written once the job ends, possibly a moment after the stream)."""
    deadline = time.monotonic() + JOB_RECORD_TIMEOUT_S
    headers = {"authorization": f"Bearer {running.api_key}"}
    while True:
        response = http.get(
            f"{running.base_url}/jobs", params={"request_id": sample.request_id}, headers=headers
        )
        if response.status_code != 200:
            raise BenchError(f"jobs API: HTTP {response.status_code}: {response.text[:300]}")
        jobs = [job for job in response.json()["data"] if job["status"] != "running"]
        if jobs:
            job = jobs[0]
            return str(job["nodes"][-1]["node_id"]), job["time_to_first_token_ms"]
        if time.monotonic() > deadline:
            raise BenchError(f"no finished job for request {sample.request_id}")
        time.sleep(0.2)


def _report(rounds: list[Round], args: argparse.Namespace) -> dict[str, Any]:
    loads = [r.load for r in rounds]
    landed = sum(r.landed for r in rounds)
    ms = {
        "turn 1 (cold, two at once)": [r.first.sample.ttft_s * 1000 for r in rounds],
        "follow-up": [r.follow_up.sample.ttft_s * 1000 for r in rounds],
        "cold follow-up": [r.cold.sample.ttft_s * 1000 for r in rounds],
    }
    node_ms = {
        "follow-up": [r.follow_up.node_ttft_ms or float("nan") for r in rounds],
        "cold follow-up": [r.cold.node_ttft_ms or float("nan") for r in rounds],
    }
    nodes = sorted({r.first.node_id for r in rounds} | {r.follow_up.node_id for r in rounds})
    pairs = list(zip(rounds[::2], rounds[1::2], strict=True))
    return {
        "config": {
            "rounds": len(pairs),
            "conversations": len(rounds),
            "facts": args.facts,
            "max_tokens": args.max_tokens,
            "think_time_s": args.think_time,
            "threads_per_agent": args.threads,
        },
        "landed_on_turn_1_node": f"{landed}/{len(rounds)}",
        "turn_1_per_node": {n[:8]: sum(r.first.node_id == n for r in rounds) for n in nodes},
        "rounds_split_across_nodes": sum(a.first.node_id != b.first.node_id for a, b in pairs),
        "prompt_tokens": {
            "turn 1": rounds[0].first.sample.prompt_tokens,
            "follow-up": rounds[0].follow_up.sample.prompt_tokens,
            "cold follow-up": rounds[0].cold.sample.prompt_tokens,
        },
        "ttft_ms": {name: cell(values, loads, "{:.0f}") for name, values in ms.items()},
        "node_ttft_ms": {name: cell(values, loads, "{:.0f}") for name, values in node_ms.items()},
        "follow_up_over_cold": cell(
            [f / c for f, c in zip(ms["follow-up"], ms["cold follow-up"], strict=True)],
            loads,
            "{:.2f}",
        ),
        "follow_up_over_turn_1": cell(
            [f / c for f, c in zip(ms["follow-up"], ms["turn 1 (cold, two at once)"], strict=True)],
            loads,
            "{:.2f}",
        ),
        "follow_ups_elsewhere_ms": [
            round(r.follow_up.sample.ttft_s * 1000) for r in rounds if not r.landed
        ],
        "foreign_cores": [round(a.load.foreign_cores, 2) for a, _ in pairs],
    }


def _render(report: dict[str, Any]) -> str:
    lines = [
        f"follow-ups on turn 1's node: {report['landed_on_turn_1_node']} "
        f"(turn 1 per node: {report['turn_1_per_node']}; rounds whose two turn 1s ran on "
        f"different nodes: {report['rounds_split_across_nodes']}/{report['config']['rounds']})",
        f"prompt tokens: {report['prompt_tokens']}",
        "TTFT at the client, ms:",
        *(f"  {name:22} {value}" for name, value in report["ttft_ms"].items()),
        "TTFT on the node (job record), ms:",
        *(f"  {name:22} {value}" for name, value in report["node_ttft_ms"].items()),
        f"follow-up / cold follow-up (within each round): {report['follow_up_over_cold']}",
        f"follow-up / turn 1 (within each round): {report['follow_up_over_turn_1']}",
        f"follow-ups that landed elsewhere, TTFT ms: {report['follow_ups_elsewhere_ms'] or 'none'}",
        f"foreign cores per round: {report['foreign_cores']}",
        MARKS,
    ]
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
