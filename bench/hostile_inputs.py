"""What hostile inputs cost the platform, and how fast a node is back after a crash.

``python -m bench.hostile_inputs`` (method and last results: bench/README.md).

*Node work* is what the llama.cpp runtime spends on an input when nothing
refuses it first (the agent's own bounds bypassed): each probe runs in a fresh
child process, which reports its CPU seconds and peak memory, or dies (its
exit status is the result). *Refusal* is what cloud's validation and the
agent's bounds cost on the same input (``server.cloud.requests.validate``,
``agent.assignments.generation_request`` of the assignment as it arrives),
timed in this process. *Recovery* is
the time from a runtime worker's crash to the next generation's first event,
with the real model (the worker restarts and loads it again). Each probe and
each crash records the machine's load (bench/machine_load.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.common.v1 import inference_pb2 as common_pb

from agent.assignments import generation_request
from agent.backoff import Backoff
from agent.runtime.base import GenerationError, GenerationRequest, Started
from agent.runtime.loader import RuntimeSettings, load_runtime
from agent.runtime.models import DEFAULT_MODEL_ID
from agent.runtime.worker import WorkerRuntime
from bench.machine_load import MARKS, LoadSample, MachineLoad, cell
from core import event_loop
from core.convert.job_events import assign_from_pb
from core.errors import InvalidArgument
from core.inference import ChatMessage, ChatRole, ResponseFormat, ResponseFormatType, Sampling
from server.cloud.requests import ChatRequest, validate


@dataclass(frozen=True)
class HostileInput:
    name: str
    messages: int = 1
    schema: str = ""


def _array(keyword: str, count: int) -> str:
    return json.dumps({"type": "array", "items": {"type": "integer"}, keyword: count})


INPUTS = (
    HostileInput("json_schema maxItems 100,000", schema=_array("maxItems", 100_000)),
    HostileInput("json_schema maxItems 4,096", schema=_array("maxItems", 4_096)),
    HostileInput("json_schema minItems 100,000", schema=_array("minItems", 100_000)),
    HostileInput("json_schema maxLength 100,000", schema='{"type":"string","maxLength":100000}'),
    # 100,000 (the reported attack) takes minutes to tokenize here; the cost grows
    # faster than linearly (2,000: 0.26 CPU s, 5,000: 1.0, 10,000: 3.5).
    HostileInput("10,000 empty messages", messages=10_000),
)
CONTEXT = 2048
MAX_PROMPT_TOKENS = CONTEXT - 1


def _runtime_request(item: HostileInput) -> GenerationRequest:
    return GenerationRequest(
        model=DEFAULT_MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, "" if item.messages > 1 else "Numbers, please."),)
        * item.messages,
        sampling=Sampling(
            max_tokens=8,
            temperature=0.0,
            response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, item.schema)
            if item.schema
            else None,
        ),
        max_prompt_tokens=MAX_PROMPT_TOKENS,
    )


async def _probe(name: str) -> None:
    """Child: run the input on the runtime in this process; print what it cost."""
    [item] = [item for item in INPUTS if item.name == name]
    runtime = await load_runtime(RuntimeSettings(context_length=CONTEXT))
    cpu = time.process_time()
    outcome = "generated"
    try:
        async for _ in runtime.generate(_runtime_request(item)):
            pass
    except GenerationError as error:
        outcome = f"{type(error).__name__}: {str(error)[:60]}"
    used = time.process_time() - cpu
    await runtime.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cpu_s": used, "peak_mb": peak_mb, "outcome": outcome}))


def _node_work(item: HostileInput, load: MachineLoad) -> str:
    began = load.start()
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-m", "bench.hostile_inputs", "--probe", item.name],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    machine = load.stop(began, item.name)
    foreign = f"; foreign load {machine.foreign_cores:.2f} cores{' (!)' if machine.foreign else ''}"
    if child.returncode != 0:
        return f"process died (exit {child.returncode}) after {wall:.1f} s{foreign}"
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return (
        f"{result['cpu_s']:.2f} CPU s, peak {result['peak_mb']:.0f} MB (process), "
        f"{result['outcome']}{foreign}"
    )


def _timed(check: Callable[[], object]) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        check()
        outcome = "accepted"
    except InvalidArgument as error:
        outcome = f"refused: {str(error)[:50]}"
    return (time.perf_counter() - started) * 1000, outcome


def _cloud_check(item: HostileInput) -> tuple[float, str]:
    request = ChatRequest(
        model=DEFAULT_MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, ""),) * item.messages,
        response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, item.schema)
        if item.schema
        else None,
    )
    return _timed(lambda: validate(request))


def _agent_check(item: HostileInput) -> tuple[float, str]:
    spec = common_pb.GenerationSpec(
        model=DEFAULT_MODEL_ID,
        messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER)] * item.messages,
        sampling=common_pb.SamplingParams(max_tokens=8),
        max_prompt_tokens=MAX_PROMPT_TOKENS,
    )
    if item.schema:
        spec.sampling.response_format.type = common_pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
        spec.sampling.response_format.json_schema = item.schema
    assign = agent_pb.AssignJob(job_id="bench", epoch=1, spec=spec)
    return _timed(lambda: generation_request(assign_from_pb(assign)))


async def _recovery(rounds: int, load: MachineLoad) -> list[tuple[float, LoadSample]]:
    """Seconds from a worker crash (a schema that overflows llama.cpp's grammar
    parser, sent to the runtime directly) to the next generation's first event, and
    the machine's load over each crash and recovery."""
    runtime = await WorkerRuntime.start(
        functools.partial(load_runtime, RuntimeSettings(context_length=CONTEXT)),
        backoff=Backoff(base_s=0.5, cap_s=30.0),
    )
    times = []
    try:
        for round_ in range(rounds):
            began = load.start()
            crashed = 0.0
            try:
                async for _ in runtime.generate(_runtime_request(INPUTS[0])):
                    pass
            except GenerationError:
                crashed = time.perf_counter()
            if not crashed:
                raise RuntimeError("the schema did not crash the runtime worker")
            # Run to the end (8 tokens): a cancelled one would hold the slot a while.
            recovered: float | None = None
            async for event in runtime.generate(_runtime_request(HostileInput("ordinary"))):
                if isinstance(event, Started) and recovered is None:
                    recovered = time.perf_counter() - crashed
            if recovered is None:
                raise RuntimeError("the generation after the crash never started")
            times.append((recovered, load.stop(began, f"recovery r{round_ + 1}")))
    finally:
        await runtime.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5, help="crashes for the recovery time")
    args = parser.parse_args()
    if args.probe:
        event_loop.run(_probe(args.probe))
        return
    load = MachineLoad()  # the probes and the worker are this process's children
    print("| input | node work without bounds | cloud refusal | agent refusal |")
    print("|---|---|---|---|")
    for item in INPUTS:
        cloud_ms, cloud = _cloud_check(item)
        agent_ms, agent = _agent_check(item)
        print(
            f"| {item.name} | {_node_work(item, load)} | {cloud_ms:.2f} ms, {cloud} "
            f"| {agent_ms:.2f} ms, {agent} |"
        )
    recoveries = event_loop.run(_recovery(args.rounds, load))
    times = [seconds for seconds, _ in recoveries]
    print(
        f"\nruntime worker crash -> next generation started: "
        f"{cell(times, [sample for _, sample in recoveries], '{:.2f}')} s "
        f"({len(times)} crashes)\n{MARKS}; (!) under foreign load"
    )
    print(load.summary())


if __name__ == "__main__":
    main()
