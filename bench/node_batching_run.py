"""One configuration of the node batching benchmark, in a process of its own.

Run by bench/node_batching.py as a script, with PYTHONPATH at the tree under
test (this one, or a baseline commit's): it imports only what every revision
of the llama.cpp runtime has (``LlamaCppRuntime.load`` and ``generate``). It
prints one JSON object: aggregate tokens/s per number of concurrent streams,
the TTFT of a chat's follow-up turn and of the same prompt cold, and the
process's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from pathlib import Path
from typing import Any

from agent.runtime.base import GenerationRequest, TokenText
from agent.runtime.llama_cpp import LlamaCppRuntime
from agent.runtime.models import DEFAULT_MODEL_ID, smollm2_gguf_path
from core.inference import ChatMessage, ChatRole, Sampling

TOPICS = (
    "a lighthouse keeper",
    "a dragon who collects clocks",
    "a city under the sea",
    "a robot learning to paint",
    "a lost astronaut",
    "a talking cat in Paris",
    "the last bookshop on Earth",
    "a pirate afraid of water",
    "a village of giants",
    "a time-travelling baker",
    "a haunted train",
    "a desert caravan",
    "a wizard's apprentice",
    "a garden on Mars",
    "a detective owl",
    "a storm chaser",
)
# A long system prompt: the part of a conversation that prefix reuse saves.
RULES = " ".join(
    f"Rule {n}: answer politely, stay on topic, and never mention rule {n + 1}." for n in range(40)
)


def _request(messages: tuple[ChatMessage, ...], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        model=DEFAULT_MODEL_ID,
        messages=messages,
        sampling=Sampling(max_tokens=max_tokens, temperature=0.0),
        max_prompt_tokens=1500,
    )


def _story(index: int) -> tuple[ChatMessage, ...]:
    topic = TOPICS[index % len(TOPICS)]
    return (ChatMessage(ChatRole.USER, f"Write a long, detailed story about {topic}."),)


async def _generate(runtime: LlamaCppRuntime, request: GenerationRequest) -> tuple[str, int, float]:
    """The text, completion tokens, and seconds to the first token."""
    started = time.perf_counter()
    first = 0.0
    text: list[str] = []
    tokens = 0
    async for event in runtime.generate(request):
        if isinstance(event, TokenText):
            if not first and event.token_count:
                first = time.perf_counter() - started
            text.append(event.text)
            tokens += event.token_count
    return "".join(text), tokens, first


async def _throughput(runtime: LlamaCppRuntime, streams: int, max_tokens: int) -> dict[str, float]:
    started, cpu = time.perf_counter(), time.process_time()
    results = await asyncio.gather(
        *(_generate(runtime, _request(_story(i), max_tokens)) for i in range(streams))
    )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    tokens = sum(count for _, count, _ in results)
    return {
        "streams": streams,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        # Every thread of the process: llama.cpp's, the scheduler's, the event loop's.
        "cpu_ms_per_token": cpu / tokens * 1000,
    }


async def _turns(runtime: LlamaCppRuntime) -> tuple[float, float]:
    """The TTFT of a chat's second turn right after its first (its start may be
    cached), and of the same second turn under another system prompt (cold)."""
    system = ChatMessage(ChatRole.SYSTEM, f"You keep a lighthouse. {RULES}")
    first = (system, ChatMessage(ChatRole.USER, "Describe your lighthouse in three sentences."))
    reply, _, _ = await _generate(runtime, _request(first, 48))
    second = (
        *first,
        ChatMessage(ChatRole.ASSISTANT, reply),
        ChatMessage(ChatRole.USER, "Now describe your evenings there."),
    )
    _, _, follow_up = await _generate(runtime, _request(second, 8))
    other = ChatMessage(ChatRole.SYSTEM, f"You guard a lighthouse. {RULES}")
    _, _, cold = await _generate(runtime, _request((other, *second[1:]), 8))
    return follow_up, cold


async def run(
    model: Path, slots: int, threads: int | None, streams: list[int], max_tokens: int
) -> Any:
    runtime = await LlamaCppRuntime.load(DEFAULT_MODEL_ID, model, slots=slots, n_threads=threads)
    try:
        await _throughput(runtime, 1, 8)  # warm-up
        throughput = [await _throughput(runtime, n, max_tokens) for n in streams]
        follow_up, cold = await _turns(runtime)
        return {
            "slots": slots,
            "throughput": throughput,
            "ttft_cold_s": cold,
            "ttft_follow_up_s": follow_up,
            "reused_tokens": getattr(runtime, "reused_tokens", None),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    finally:
        await runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--streams", type=int, nargs="+", required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--model", type=Path, help="GGUF file (default: bundled SmolLM2)")
    args = parser.parse_args()
    model = args.model or smollm2_gguf_path()
    result = asyncio.run(run(model, args.slots, args.threads, args.streams, args.max_tokens))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
