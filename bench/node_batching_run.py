"""One configuration of the node batching benchmark, in a process of its own.

Run by bench/node_batching.py as a script, with PYTHONPATH at the tree under
test (this one, or a baseline commit's): it imports only what every revision
of the llama.cpp runtime has (``LlamaCppRuntime.load`` and ``generate``). It
prints one JSON object: aggregate tokens/s per number of concurrent streams,
the TTFT of a cold prompt and of a follow-up turn, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
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
    started = time.perf_counter()
    results = await asyncio.gather(
        *(_generate(runtime, _request(_story(i), max_tokens)) for i in range(streams))
    )
    wall = time.perf_counter() - started
    tokens = sum(count for _, count, _ in results)
    return {"streams": streams, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


async def _follow_up(runtime: LlamaCppRuntime, variant: str) -> tuple[GenerationRequest, float]:
    """A chat's second turn, and the TTFT of its first turn."""
    system = ChatMessage(ChatRole.SYSTEM, f"{variant} {RULES}")
    first = (system, ChatMessage(ChatRole.USER, "Describe a lighthouse in three sentences."))
    reply, _, ttft = await _generate(runtime, _request(first, 48))
    second = (
        *first,
        ChatMessage(ChatRole.ASSISTANT, reply),
        ChatMessage(ChatRole.USER, "Now describe its keeper."),
    )
    return _request(second, 8), ttft


async def run(slots: int, threads: int | None, streams: list[int], max_tokens: int) -> Any:
    runtime = await LlamaCppRuntime.load(
        DEFAULT_MODEL_ID, smollm2_gguf_path(), slots=slots, n_threads=threads
    )
    try:
        await _throughput(runtime, 1, 8)  # warm-up
        throughput = [await _throughput(runtime, n, max_tokens) for n in streams]
        # Cold: a second turn whose first never ran here (another system prompt);
        # warm: the second turn of the chat whose first turn just ran.
        cold_request, _ = await _follow_up(runtime, "Cold variant.")
        cold_request = _request(
            (ChatMessage(ChatRole.SYSTEM, f"Other variant. {RULES}"), *cold_request.messages[1:]),
            8,
        )
        _, _, cold = await _generate(runtime, cold_request)
        warm_request, _ = await _follow_up(runtime, "Warm variant.")
        _, _, warm = await _generate(runtime, warm_request)
        return {
            "slots": slots,
            "throughput": throughput,
            "ttft_cold_s": cold,
            "ttft_follow_up_s": warm,
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
    args = parser.parse_args()
    result = asyncio.run(run(args.slots, args.threads, args.streams, args.max_tokens))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
