"""llama.cpp backend: runs a GGUF chat model on the node's CPU.

One ``llama_cpp.Llama`` (one copy of the model) serves every slot: its context
holds a sequence per slot and ``IDLE_SEQUENCES`` more for cached conversations,
and a scheduler thread decodes the running ones together (continuous batching
and prompt-prefix reuse, ``llama_batch.py``). The token
loop is driven there, not by llama-cpp-python's completion helpers, so that
token counts are exact. ``Started`` is yielded once the prompt is tokenized
and handed to the scheduler, which starts it as soon as a slot is free.
Counting rules:

- ``prompt_tokens`` is the length of the chat-templated, tokenized prompt
  (only the template's own control tokens are read as such, the callers'
  text is plain text: ``llama_prompt.py``);
- ``completion_tokens`` counts every sampled token except an end-of-generation
  token (EOS, ``<|im_end|>``, ...), which is consumed, never shown or counted;
  the token that completes a stop sequence is counted;
- every counted token is carried by some ``TokenText``, so the token counts of
  the TokenText events always sum to ``completion_tokens``. A token whose text
  is empty or still held back (possible start of a stop sequence) adds its
  count to the next event that has text; the last TokenText may have empty text
  (counts only) or a count of 0 (only text released at the end).

A continuation (a job moved here from a lost node) templates the messages with
the generation prompt, then replays the delivered tokens one by one and
samples from there, emitting only new text. Two choices, both measured on
SmolLM2 with greedy decoding (3-4 prompts, prefixes of 1-40 tokens):

- token ids, not text: re-tokenizing the delivered text does not always give
  back the tokens that produced it (an emoji split over byte tokens comes back
  as different tokens), and the continuation then diverges. Ids are replayed
  when the previous node reported them and they reproduce the delivered text;
  otherwise the text is tokenized (as plain text, never as special tokens).
- one token per decode, not one batch: prefilling the prefix as a batch
  changes the floating-point order of the attention and matmul sums, and
  greedy picks flipped at near-ties in 13 of 40 cases. Replaying each token as
  its own decode repeats the original computation, and all 18 of 18 cases
  matched the uninterrupted run. It costs one decode per delivered token
  (about the cost of generating them again, without sampling).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import llama_cpp.llama_cpp as llama_lib
import structlog

from agent.runtime.base import (
    Embedding,
    Finished,
    GenerationError,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    PromptTooLong,
    Started,
    UnknownModel,
)
from agent.runtime.channel import GenerationChannel
from agent.runtime.llama_batch import IDLE_SEQUENCES, PREFILL_CHUNK, BatchScheduler, Job
from agent.runtime.llama_prompt import PromptTokenizer
from agent.runtime.llama_vocab import Vocab
from agent.runtime.sampling import Grammar, SamplerChain, grammar_for
from agent.runtime.text_stream import TextStream
from agent.runtime.tool_grammar import tool_grammar
from core.inference import ChatMessage, ChatRole, Continuation, FinishReason
from core.prompt_prefixes import prefix_fingerprints

log = structlog.get_logger(__name__)

RUNTIME_NAME = "llama.cpp"

# Llama() reads llama_{model,context}_default_params() while loading; patched under this lock.
_LOAD_LOCK = threading.Lock()
# Whole contexts the slots' K/V cache holds at most: generations rarely fill
# theirs, and the cache's cells cost memory whether used or not (SmolLM2-135M:
# 12 KB a token at q8_0). When running generations fill it, the one admitted
# last is preempted and resumed later (llama_batch.py).
CACHED_CONTEXTS = 4
_DEFAULT_BATCH = 512


class LlamaCppRuntime:
    """A GGUF chat model served by llama.cpp, ``slots`` generations at a time."""

    def __init__(
        self,
        model_id: str,
        model_path: Path,
        *,
        context_length: int = 2048,
        slots: int = 1,
        n_threads: int | None = None,
        cpu_repack: bool = False,
    ) -> None:
        """Load the model (blocking; prefer ``await LlamaCppRuntime.load(...)``).

        ``context_length`` bounds each generation; the K/V cache the slots share
        holds ``min(slots, CACHED_CONTEXTS)`` such contexts. ``cpu_repack`` enables
        llama.cpp's repacked CPU weight buffers (AMX, AVX/ARM repack). Off by
        default: the AMX path segfaults on multi-token batches on some Xeons (seen
        with SmolLM2 Q4_1), and repacked kernels can shift numerics, which greedy
        canaries compare across nodes.
        """
        most = llama_lib.llama_max_parallel_sequences() - IDLE_SEQUENCES
        if not 1 <= slots <= most:
            raise ValueError(f"slots must be from 1 to {most}")
        self._model_id = model_id
        self._slots = slots
        self._context_length = context_length
        self._llama = _load_llama(
            model_path,
            context_length * min(slots, CACHED_CONTEXTS),
            n_threads,
            cpu_repack,
            sequences=slots + IDLE_SEQUENCES,
        )
        self._vocab = Vocab(self._llama)
        self._prompts = PromptTokenizer(self._llama, self._vocab)
        self._scheduler = BatchScheduler(self._llama, self._vocab, slots)
        self._closed = False
        self._model_path = model_path
        self._n_threads = n_threads
        self._cpu_repack = cpu_repack
        self._embedder: llama_cpp.Llama | None = None
        self._embedder_lock = asyncio.Lock()

    @classmethod
    async def load(
        cls,
        model_id: str,
        model_path: Path,
        *,
        context_length: int = 2048,
        slots: int = 1,
        n_threads: int | None = None,
        cpu_repack: bool = False,
    ) -> LlamaCppRuntime:
        """Load in a thread so the event loop keeps running meanwhile."""
        return await asyncio.to_thread(
            cls,
            model_id,
            model_path,
            context_length=context_length,
            slots=slots,
            n_threads=n_threads,
            cpu_repack=cpu_repack,
        )

    @property
    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self._model_id, RUNTIME_NAME, self._context_length)]

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens taken from the cache instead of evaluated, since loading."""
        return self._scheduler.reused_tokens

    @property
    def preemptions(self) -> int:
        """Generations preempted for want of cache cells (and resumed), since loading."""
        return self._scheduler.preemptions

    def cached_prefixes(self) -> tuple[int, ...]:
        return self._scheduler.cached_prefixes()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if self._closed:
            raise GenerationError("runtime is closed")
        if request.model != self._model_id:
            raise UnknownModel(request.model)
        if request.embed:
            async for event in self._embed(request):
                yield event
            return
        prompt, prefix, stream = await asyncio.to_thread(self._prepare, request)
        grammar = await asyncio.to_thread(_grammar, request)
        budget = max(
            0, min(request.sampling.max_tokens, self._context_length - len(prompt) - len(prefix))
        )
        chain = None
        if budget > 0:
            # Compiling a large grammar takes a while: here, not in the scheduler's steps.
            chain = await asyncio.to_thread(SamplerChain, self._llama, request.sampling, grammar)
        channel = GenerationChannel(asyncio.get_running_loop())
        job = Job(
            prompt,
            prefix,
            stream,
            request.sampling,
            chain,
            budget,
            channel,
            None if request.prompt is not None else partial(_conversation_fingerprints, request),
            request.waiting_report_s,
        )
        try:
            self._scheduler.submit(job)
        except BaseException:
            if chain is not None:
                chain.close()
            raise
        try:
            yield Started(len(prompt))
            async with contextlib.aclosing(channel.events()) as events:
                async for event in events:
                    yield event
        finally:
            channel.cancel.set()
            # Waits without raising: the slot is free once the scheduler let go of the job.
            await asyncio.wait({asyncio.wrap_future(job.done)})

    async def _embed(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Embeds the prompt with a second Llama in embedding mode (loaded on first use,
        one embedding at a time), mean-pooled and normalized to unit length."""
        text = request.prompt or ""
        # Plain text, as llama.embed tokenizes it.
        tokens = len(self._prompts.text(text))
        if tokens > min(request.max_prompt_tokens, self._context_length):
            raise PromptTooLong(
                f"input has {tokens} tokens, limit is "
                f"{min(request.max_prompt_tokens, self._context_length)}"
            )
        async with self._embedder_lock:
            if self._embedder is None:
                self._embedder = await asyncio.to_thread(
                    _load_llama,
                    self._model_path,
                    self._context_length,
                    self._n_threads,
                    self._cpu_repack,
                    embedding=True,
                )
            values, count = await asyncio.to_thread(_embed, self._embedder, text)
        yield Started(count)
        yield Embedding(values)
        yield Finished(FinishReason.STOP, count, 0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._embedder is not None:
            async with self._embedder_lock:
                self._embedder.close()
        await asyncio.to_thread(self._scheduler.close)
        self._llama.close()

    def _prepare(self, request: GenerationRequest) -> tuple[list[int], list[int], TextStream]:
        """The prompt's tokens, a continuation's delivered tokens, and the text stream
        primed with them (so stop sequences and split characters carry over)."""
        prompt = self._tokenize_chat(request)
        continuation = request.continuation
        if continuation is None:
            return prompt, [], TextStream(request.sampling.stop)
        replayed = self._replayable(continuation, request.sampling.stop)
        if replayed is not None:
            return prompt, list(continuation.token_ids), replayed
        log.warning(
            "continuation without usable token ids; re-tokenizing its text",
            token_count=continuation.token_count,
        )
        return (
            prompt,
            self._vocab.tokenize_text(continuation.text),
            TextStream(request.sampling.stop),
        )

    def _replayable(self, continuation: Continuation, stop: tuple[str, ...]) -> TextStream | None:
        """A stream primed with the continuation's ids, if they give back its text."""
        ids = continuation.token_ids
        if not ids or len(ids) != continuation.token_count:
            return None
        if any(not 0 <= token < self._vocab.size or self._vocab.is_end(token) for token in ids):
            return None
        stream = TextStream(stop)
        shown = "".join(stream.push(self._vocab.piece(token)) for token in ids)
        if shown != continuation.text or stream.stopped:
            return None
        return stream

    def _tokenize_chat(self, request: GenerationRequest) -> list[int]:
        """The templated chat, or a text completion's prompt as it is."""
        # Before templating: no token is longer than the vocabulary's longest piece,
        # so text over max_prompt_tokens of those cannot fit whatever the template adds.
        contents = (request.prompt,) if request.prompt is not None else request.messages
        size = sum(
            len((item if isinstance(item, str) else item.content).encode()) for item in contents
        )
        if size > request.max_prompt_tokens * self._vocab.longest_piece:
            raise PromptTooLong(
                f"prompt has {size} bytes, more than {request.max_prompt_tokens} tokens can hold"
            )
        if request.prompt is not None:
            tokens = self._prompts.text(request.prompt)
        else:
            tokens = self._prompts.chat(request.messages, request.tool_use)
        if len(tokens) > request.max_prompt_tokens:
            raise PromptTooLong(
                f"prompt has {len(tokens)} tokens, limit is {request.max_prompt_tokens}"
            )
        if len(tokens) >= self._context_length:
            raise PromptTooLong(
                f"prompt has {len(tokens)} tokens, context window is {self._context_length}"
            )
        return tokens


def _grammar(request: GenerationRequest) -> Grammar | None:
    """The grammar of the tool calls, or of the response format (cloud offers tools
    only without one)."""
    if request.tool_use is not None:
        return tool_grammar(request.tool_use)
    return grammar_for(request.sampling)


def _conversation_fingerprints(request: GenerationRequest, reply: str) -> tuple[int, ...]:
    """The prefix fingerprints of the chat as its next turn will send it: the
    messages, then the assistant's reply (a continuation's delivered text first)."""
    delivered = request.continuation.text if request.continuation is not None else ""
    answer = ChatMessage(ChatRole.ASSISTANT, delivered + reply)
    return prefix_fingerprints(request.model, request.tool_use, (*request.messages, answer))


def _embed(llama: llama_cpp.Llama, text: str) -> tuple[tuple[float, ...], int]:
    values, count = llama.embed(text, normalize=True, truncate=False, return_count=True)
    return tuple(float(value) for value in values), int(count)


def _load_llama(
    path: Path,
    context_length: int,
    n_threads: int | None,
    cpu_repack: bool,
    *,
    sequences: int = 1,
    embedding: bool = False,
) -> llama_cpp.Llama:
    """The model with a context of ``context_length`` cells shared by ``sequences``
    sequences; for generation with flash attention and a q8_0 K/V cache, which keep
    greedy output the same however sequences are batched (llama_batch.py)."""
    with _LOAD_LOCK:
        model_defaults = llama_lib.llama_model_default_params
        context_defaults = llama_lib.llama_context_default_params

        def model_params() -> Any:
            params = model_defaults()
            params.use_extra_bufts = cpu_repack
            return params

        def context_params() -> Any:
            params = context_defaults()
            params.n_seq_max = sequences
            params.kv_unified = True
            return params

        # Llama() has no argument for these parameters.
        llama_lib.llama_model_default_params = model_params
        llama_lib.llama_context_default_params = context_params
        batch = max(_DEFAULT_BATCH, sequences + PREFILL_CHUNK)
        try:
            if embedding:
                return llama_cpp.Llama(
                    str(path),
                    n_ctx=context_length,
                    n_threads=n_threads,
                    n_threads_batch=n_threads,
                    embedding=True,
                    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                    verbose=False,
                )
            return llama_cpp.Llama(
                str(path),
                n_ctx=context_length,
                n_batch=batch,
                n_ubatch=batch,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                flash_attn=True,
                type_k=llama_lib.GGML_TYPE_Q8_0,
                type_v=llama_lib.GGML_TYPE_Q8_0,
                verbose=False,
            )
        finally:
            llama_lib.llama_model_default_params = model_defaults
            llama_lib.llama_context_default_params = context_defaults


if TYPE_CHECKING:
    from agent.runtime.base import Runtime

    def _is_runtime(runtime: LlamaCppRuntime) -> Runtime:
        return runtime
