"""llama.cpp backend: runs a GGUF chat model on the node's CPU.

Each slot is its own ``llama_cpp.Llama`` (one generation at a time each). The
token loop runs in a worker thread and is driven here, not by llama-cpp-python's
completion helpers, so that token counts are exact. ``Started`` is yielded once
the prompt is tokenized and a slot has begun working on it. Counting rules:

- ``prompt_tokens`` is the length of the chat-templated, tokenized prompt;
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
import ctypes
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import llama_cpp.llama_cpp as llama_lib
import numpy as np
import structlog
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

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
from agent.runtime.chat_prompt import template_inputs
from agent.runtime.sampling import Grammar, grammar_for, sample_tokens
from agent.runtime.text_stream import TextStream
from agent.runtime.tool_grammar import tool_grammar
from core.inference import (
    Continuation,
    FinishReason,
    Sampling,
    TokenLogprob,
    TopLogprob,
    token_text,
)

log = structlog.get_logger(__name__)

RUNTIME_NAME = "llama.cpp"

# Llama() reads llama_model_default_params() while loading; patched under this lock.
_LOAD_LOCK = threading.Lock()


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

        ``cpu_repack`` enables llama.cpp's repacked CPU weight buffers (AMX,
        AVX/ARM repack). Off by default: the AMX path segfaults on multi-token
        batches on some Xeons (seen with SmolLM2 Q4_1), and repacked kernels
        can shift numerics, which greedy canaries compare across nodes.
        """
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self._model_id = model_id
        self._llamas = [
            _load_llama(model_path, context_length, n_threads, cpu_repack) for _ in range(slots)
        ]
        first = self._llamas[0]
        self._context_length: int = first.n_ctx()
        self._vocab = _Vocab(first)
        self._template, self._template_source = _chat_formatter(first, self._vocab)
        self._free: asyncio.Queue[llama_cpp.Llama] = asyncio.Queue()
        for llama in self._llamas:
            self._free.put_nowait(llama)
        self._executor = ThreadPoolExecutor(slots, thread_name_prefix="llama-cpp")
        self._running: set[threading.Event] = set()
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
        return len(self._llamas)

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
        llama = await self._free.get()
        if self._closed:  # close() began while this request waited for a slot
            self._free.put_nowait(llama)
            raise GenerationError("runtime is closed")
        loop = asyncio.get_running_loop()
        channel = GenerationChannel(loop)
        self._running.add(channel.cancel)
        try:
            job = loop.run_in_executor(
                self._executor,
                _generate,
                llama,
                self._vocab,
                prompt,
                prefix,
                stream,
                request.sampling,
                grammar,
                budget,
                channel,
            )
        except BaseException:
            self._running.discard(channel.cancel)
            self._free.put_nowait(llama)
            raise

        def release(_: object) -> None:
            # The slot is free only once its thread has left the Llama object.
            self._running.discard(channel.cancel)
            self._free.put_nowait(llama)

        job.add_done_callback(release)
        try:
            yield Started(len(prompt))
            async with contextlib.aclosing(channel.events()) as events:
                async for event in events:
                    yield event
        finally:
            channel.cancel.set()
            # Waits without raising; a second cancellation still leaves the
            # slot to ``release``.
            await asyncio.wait({job})

    async def _embed(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Embeds the prompt with a second Llama in embedding mode (loaded on first use,
        one embedding at a time), mean-pooled and normalized to unit length."""
        text = request.prompt or ""
        tokens = len(self._vocab.tokenize(text))
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

    def cached_prefixes(self) -> tuple[int, ...]:
        """None: every job starts from an empty cache, so no conversation is held."""
        return ()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._embedder is not None:
            async with self._embedder_lock:
                self._embedder.close()
        for cancel in list(self._running):
            cancel.set()
        for _ in self._llamas:
            llama = await self._free.get()
            llama.close()
        self._executor.shutdown(wait=False)

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
            text = request.prompt
        else:
            inputs = template_inputs(request.messages, request.tool_use, self._template_source)
            try:
                text = self._template(**inputs).prompt
            except Exception as exc:
                # Chat templates are model-supplied Jinja; they reject input by raising.
                raise GenerationError(f"chat template rejected the messages: {exc}") from exc
        tokens = self._vocab.tokenize(text)
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


def _generate(
    llama: llama_cpp.Llama,
    vocab: _Vocab,
    prompt: list[int],
    prefix: list[int],
    stream: TextStream,
    sampling: Sampling,
    grammar: Grammar | None,
    budget: int,
    channel: GenerationChannel,
) -> None:
    """Worker thread: sample up to ``budget`` tokens after ``prompt`` and the already
    delivered ``prefix``, and report through ``channel``."""
    try:
        completion = 0
        reason = FinishReason.LENGTH
        # Closed here, in the worker thread, so the sampler chain is freed at once.
        with contextlib.closing(sample_tokens(llama, prompt, prefix, sampling, grammar)) as tokens:
            for token in tokens if budget > 0 else ():
                if channel.cancel.is_set():
                    channel.end(GenerationError("generation cancelled"))
                    return
                if vocab.is_end(token):
                    reason = FinishReason.STOP
                    break
                completion += 1
                # Read before the next decode overwrites the logits.
                logprob = None
                if sampling.logprobs:
                    logprob = _logprob(llama, vocab, token, sampling.top_logprobs)
                channel.put(stream.push(vocab.piece(token)), 1, token, logprob)
                if stream.stopped:
                    reason = FinishReason.STOP
                    break
                if completion >= budget:
                    break
        channel.put(stream.finish(), 0)
        if stream.stopped:
            reason = FinishReason.STOP
        channel.end(Finished(reason, len(prompt), completion))
    except BaseException as exc:  # reported to the consumer, never lost in the pool
        with contextlib.suppress(RuntimeError):
            channel.end(exc)


def _logprob(llama: llama_cpp.Llama, vocab: _Vocab, token: int, top: int) -> TokenLogprob:
    """The token's log-probability under the model's raw distribution (before
    temperature, penalties or grammar) and the ``top`` most likely tokens there."""
    pointer = llama_lib.llama_get_logits_ith(llama.ctx, -1)
    logits = np.ctypeslib.as_array(pointer, shape=(vocab.size,)).astype(np.float64)
    peak = float(logits.max())
    normalizer = peak + float(np.log(np.exp(logits - peak).sum()))
    alternatives: tuple[TopLogprob, ...] = ()
    if top > 0:
        best = np.argpartition(-logits, top - 1)[:top]
        best = best[np.argsort(-logits[best], kind="stable")]
        pieces = [vocab.piece(int(i)) for i in best]
        alternatives = tuple(
            TopLogprob(token_text(piece), piece, float(logits[i]) - normalizer)
            for piece, i in zip(pieces, best, strict=True)
        )
    piece = vocab.piece(token)
    return TokenLogprob(token_text(piece), piece, float(logits[token]) - normalizer, alternatives)


class _Vocab:
    """Tokenizer-level calls on a model's vocabulary (thread-safe in llama.cpp)."""

    def __init__(self, llama: llama_cpp.Llama) -> None:
        self._llama = llama
        self._ptr = llama_lib.llama_model_get_vocab(llama.model)
        # Bytes of the longest token (81 for SmolLM2); found once, in ~0.1 s.
        self.longest_piece = max(len(self.piece(token)) for token in range(self.size))

    def tokenize(self, text: str) -> list[int]:
        tokens: list[int] = self._llama.tokenize(text.encode(), add_bos=False, special=True)
        bos = llama_lib.llama_vocab_bos(self._ptr)
        # Templates usually write BOS themselves; add it only where the model
        # wants one and the template left it out.
        if llama_lib.llama_vocab_get_add_bos(self._ptr) and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        return tokens

    @property
    def size(self) -> int:
        return int(llama_lib.llama_vocab_n_tokens(self._ptr))

    def tokenize_text(self, text: str) -> list[int]:
        """Plain text (special-token markup stays text), no BOS."""
        if not text:
            return []
        tokens: list[int] = self._llama.tokenize(text.encode(), add_bos=False, special=False)
        return tokens

    def is_end(self, token: int) -> bool:
        return bool(llama_lib.llama_vocab_is_eog(self._ptr, token))

    def piece(self, token: int) -> bytes:
        # Own buffer handling: llama-cpp-python's detokenize mangles pieces over 32 bytes.
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = llama_lib.llama_token_to_piece(self._ptr, token, buffer, size, 0, False)
            if n >= 0:
                return buffer.raw[:n]
            size = -n

    def text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(llama_lib.llama_vocab_get_text(self._ptr, token)).decode()


def _chat_formatter(llama: llama_cpp.Llama, vocab: _Vocab) -> tuple[Jinja2ChatFormatter, str]:
    """The model's chat template, and its source (what it knows: tools, roles)."""
    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("the GGUF has no tokenizer.chat_template")
    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=vocab.text(llama.token_eos()),
        bos_token=vocab.text(llama.token_bos()),
        add_generation_prompt=True,
    )
    return formatter, str(template)


def _embed(llama: llama_cpp.Llama, text: str) -> tuple[tuple[float, ...], int]:
    values, count = llama.embed(text, normalize=True, truncate=False, return_count=True)
    return tuple(float(value) for value in values), int(count)


def _load_llama(
    path: Path,
    context_length: int,
    n_threads: int | None,
    cpu_repack: bool,
    *,
    embedding: bool = False,
) -> llama_cpp.Llama:
    with _LOAD_LOCK:
        defaults = llama_lib.llama_model_default_params

        def model_params() -> Any:
            params = defaults()
            params.use_extra_bufts = cpu_repack
            return params

        # Llama() has no argument for this model parameter.
        llama_lib.llama_model_default_params = model_params
        try:
            return llama_cpp.Llama(
                str(path),
                n_ctx=context_length,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                embedding=embedding,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN
                if embedding
                else llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED,
                verbose=False,
            )
        finally:
            llama_lib.llama_model_default_params = defaults


if TYPE_CHECKING:
    from agent.runtime.base import Runtime

    def _is_runtime(runtime: LlamaCppRuntime) -> Runtime:
        return runtime
