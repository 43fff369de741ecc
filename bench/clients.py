"""One streamed, greedy chat completion, timed the same way on both sides.

- direct: llama-cpp-python's own ``Llama.create_chat_completion(stream=True)``
  in this process, on a ``Llama`` built by the agent's loader;
- platform: ``POST /v1/chat/completions`` with ``stream: true`` over HTTP to
  the gateway of a running `resultity up`;
- peer: the same request to llama-cpp-python's own OpenAI-compatible server
  (``python -m llama_cpp.server``, bench/peer_process.py).

TTFT is the time from sending the request to the first non-empty content
delta; the timestamps of every content delta are taken on arrival.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import httpx
import llama_cpp

# Explicit so that neither side picks a random seed; greedy decoding ignores it.
SEED = 1234
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Sample:
    """Timings of one streamed completion (seconds since the request was sent)."""

    ttft_s: float
    last_token_s: float
    total_s: float
    completion_tokens: int
    content_deltas: int
    prompt_tokens: int | None
    text: str
    # The platform's x-request-id (the jobs API finds the request's jobs by it).
    request_id: str | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        """Completion tokens over the time from the first to the last content token."""
        span = self.last_token_s - self.ttft_s
        return self.completion_tokens / span if span > 0 else float("nan")

    @property
    def end_to_end_tokens_per_s(self) -> float:
        """Completion tokens over the whole request."""
        return self.completion_tokens / self.total_s if self.total_s > 0 else float("nan")


class BenchError(RuntimeError):
    """A request did not produce a usable sample."""


class _Timer:
    """Collects the arrival times of content deltas."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.deltas = 0
        self.parts: list[str] = []

    def content(self, text: str | None) -> None:
        if not text:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.deltas += 1
        self.parts.append(text)

    def sample(
        self, completion_tokens: int, prompt_tokens: int | None, request_id: str | None = None
    ) -> Sample:
        end = time.perf_counter()
        if self.first is None or self.last is None:
            raise BenchError("the stream carried no content")
        return Sample(
            ttft_s=self.first - self.start,
            last_token_s=self.last - self.start,
            total_s=end - self.start,
            completion_tokens=completion_tokens,
            content_deltas=self.deltas,
            prompt_tokens=prompt_tokens,
            text="".join(self.parts),
            request_id=request_id,
        )


def greedy_kwargs(max_tokens: int) -> dict[str, Any]:
    """The sampler the agent's runtime uses for temperature 0: plain greedy."""
    return {
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_penalty": 1.0,
        "max_tokens": max_tokens,
        "seed": SEED,
    }


def direct_prompt_tokens(llama: llama_cpp.Llama, messages: list[dict[str, str]]) -> int:
    """The chat-templated prompt size as llama-cpp-python counts it (one token sampled)."""
    llama.reset()  # type: ignore[no-untyped-call]  # unannotated upstream
    response = llama.create_chat_completion(_chat(messages), **greedy_kwargs(1))
    usage = cast(dict[str, Any], response)["usage"]
    return int(usage["prompt_tokens"])


def run_direct(llama: llama_cpp.Llama, messages: list[dict[str, str]], max_tokens: int) -> Sample:
    """llama-cpp-python's own streaming chat completion. It keeps its KV cache and
    evaluates the prompt from where it differs from what it ran last, as the agent
    and the peer server do (the caller decides what the prompts share). Each
    streamed chunk with content is one token.
    """
    timer = _Timer()
    stream = cast(
        Iterator[dict[str, Any]],
        llama.create_chat_completion(_chat(messages), stream=True, **greedy_kwargs(max_tokens)),
    )
    for chunk in stream:
        for choice in chunk["choices"]:
            timer.content(choice["delta"].get("content"))
    return timer.sample(timer.deltas, None)


def _chat(messages: list[dict[str, str]]) -> Any:
    """Plain role/content dicts are what llama-cpp-python's message TypedDicts describe."""
    return messages


def run_platform(
    http: httpx.Client,
    base_url: str,
    api_key: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    *,
    sampler: dict[str, Any] | None = None,
    one_token_per_chunk: bool = False,
) -> Sample:
    """An OpenAI-compatible server's SSE stream (the gateway's, or the peer's); token
    counts from the usage chunk it reports. llama-cpp-python's server sends none
    (``one_token_per_chunk``): each of its content chunks is one token, as on the
    direct side; its sampler defaults are not greedy (e.g. repeat_penalty 1.1), so
    the peer also gets ``greedy_kwargs`` as ``sampler``."""
    body = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "seed": SEED,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(sampler or {}),
    }
    headers = {"authorization": f"Bearer {api_key}"}
    timer = _Timer()
    usage: dict[str, Any] | None = None
    with http.stream(
        "POST", f"{base_url}/chat/completions", json=body, headers=headers
    ) as response:
        request_id = response.headers.get("x-request-id")
        if response.status_code != 200:
            response.read()
            raise BenchError(f"HTTP {response.status_code}: {response.text[:500]}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise BenchError(f"error in stream: {event['error']}")
            for choice in event.get("choices") or ():
                timer.content((choice.get("delta") or {}).get("content"))
            usage = event.get("usage") or usage
    if one_token_per_chunk:
        return timer.sample(timer.deltas, None)
    if usage is None:
        raise BenchError("the stream reported no usage")
    return timer.sample(int(usage["completion_tokens"]), int(usage["prompt_tokens"]), request_id)
