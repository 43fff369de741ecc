"""Continuous batching: all of a node's generations in one llama.cpp context.

One model and one context whose K/V cache holds, in shared cells, up to
``slots`` running sequences and idle ones (finished conversations, kept as a
prefix cache). A single scheduler thread runs steps; a step is one
``llama_decode`` of one batch holding, for every running sequence, the next
token it must evaluate (the one it just sampled, or one delivered token of a
continuation, one per decode as ``llama_cpp.py`` explains) or the next chunk
of its prompt. Prompt chunks share ``PREFILL_CHUNK`` tokens a step, so a long
prompt does not stall the other sequences' tokens for long. Each sequence then
samples from its own row of the logits with its own sampler chain.

Greedy output is the same alone or batched because the context uses flash
attention and a q8_0 K/V cache: a token's K/V are quantized into the cache
before attention reads them, and its logits no longer depend on which tokens
share its batch or how its prompt was chunked. With the f16 cache and plain
attention, batched sums differed and greedy picks flipped at near-ties. One
dependence remains: attention adds up a sequence's cells in their order in the
cache, and llama.cpp fills the lowest freed cells first. So cells are freed
only when cells are short (an idle sequence evicted for a generation, or one
preempted), never when one ends or is cancelled; a sequence that runs while
another's cells below its own are freed may still see its sums reordered.

Prompt-prefix reuse: a finished sequence keeps its tokens in the cache (it is
idle), whatever the slots do: the context has ``IDLE_SEQUENCES`` sequence ids
beyond the slots, so a one-slot node still holds a conversation while it
answers someone else. A new generation whose prompt starts with all of an idle
sequence's tokens takes that sequence and evaluates only the rest (a chat's
next turn: the previous prompt and reply). One whose prompt shares only a
start with it (a system prompt, the template's first tokens) gets a sequence
of its own that shares the common cells (``llama_memory_seq_cp``: one cell
held by both), and the idle conversation stays whole. Tokens are compared,
never hashes. Idle sequences are evicted, least recently used first, only when
running or admitted generations need their cells (or, all ids taken, an id).

Cells: a generation is admitted when its tokens fit beside the running
ones with a step's worth to spare. When a step finds the cells full (the
running generations grew), idle sequences are evicted first; then the
generation admitted last is preempted: its cells are freed and it waits at the
head of the queue, to evaluate again what it had (prompt in chunks, the tokens
after it one per decode, as before) and go on where it was. A lone generation
always fits: the cache holds at least one whole context. A generation held
back in the queue (preempted, or waiting for cells) is told so (``Waiting``)
when it starts waiting and every ``waiting_report_s`` of its request while it
waits, by this scheduler's thread: the network then tells it from a hung one.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import llama_cpp
import llama_cpp.llama_cpp as llama_lib
import structlog

from agent.runtime.base import WAITING_REPORT_S, Finished, GenerationError, Waiting
from agent.runtime.channel import GenerationChannel
from agent.runtime.llama_vocab import Vocab
from agent.runtime.sampling import SamplerChain
from agent.runtime.text_stream import TextStream
from core.inference import FinishReason, Sampling
from core.prompt_prefixes import MAX_ADVERTISED_PREFIXES

log = structlog.get_logger(__name__)

# Sequence ids the context has beyond the slots, for idle conversations. Cells,
# not ids, bound what stays cached; an id costs a row of the context's logits
# buffer (n_vocab floats, 196 KB for SmolLM2), so not every id llama.cpp allows.
IDLE_SEQUENCES = 16

# Prompt tokens evaluated per step over all sequences: large enough that a
# prompt's prefill stays efficient, small enough that the running sequences'
# next tokens wait one short decode, not a whole prompt.
PREFILL_CHUNK = 128


@dataclass(eq=False)
class Job:
    """One generation handed to the scheduler: sample up to ``budget`` tokens after
    ``prompt`` and the delivered ``prefix``, and report through ``channel``.

    ``fingerprints`` gives, from the reply's text, the prefix fingerprints of the
    conversation the sequence then holds (None: nothing to advertise). ``done`` is
    set once the scheduler no longer touches the job (its chain freed)."""

    prompt: list[int]
    prefix: list[int]
    stream: TextStream
    sampling: Sampling
    chain: SamplerChain | None
    budget: int
    channel: GenerationChannel
    fingerprints: Callable[[str], tuple[int, ...]] | None = None
    # How often it is told it still waits (GenerationRequest.waiting_report_s).
    waiting_report_s: float = WAITING_REPORT_S
    done: Future[None] = field(default_factory=Future)
    # Progress, kept here so that a preempted generation resumes where it was:
    # the tokens sampled (counted ones), their text, and how many of the tokens
    # after the prompt (delivered, then sampled) the chain has accepted.
    generated: list[int] = field(default_factory=list)
    reply: list[str] = field(default_factory=list)
    accepted: int = 0
    # Monotonic time it was last told it waits (None: it has not waited since it
    # last started).
    waiting_reported: float | None = None
    # Prompt tokens taken from an idle sequence when it was first admitted (None:
    # not yet admitted). A preempted generation evaluating its prompt again when
    # it resumes does not change it: it says what the cache saved the prompt.
    cached_prompt: int | None = None


@dataclass(eq=False)
class _Sequence:
    """A sequence id of the context: its tokens in the cache and, while it runs, its job."""

    seq_id: int
    held: list[int] = field(default_factory=list)
    # The cache cells of ``held`` (the scheduler's own numbers, one per token):
    # a cell may be shared with other sequences (see ``_Cells``).
    cells: list[int] = field(default_factory=list)
    job: Job | None = None
    # What the idle sequence's tokens are, for the router (newest conversation last).
    fingerprints: tuple[int, ...] = ()
    last_used: int = 0
    # Running state: tokens still to evaluate: prompt_left prompt tokens (evaluated
    # in chunks), then those after the prompt, one per decode (post_fed of them
    # evaluated so far); started orders the running sequences by admission.
    feed: list[int] = field(default_factory=list)
    prompt_left: int = 0
    post_fed: int = 0
    started: int = 0


class BatchScheduler:
    """Runs every generation of one ``llama_cpp.Llama`` context in its own thread."""

    def __init__(self, llama: llama_cpp.Llama, vocab: Vocab, slots: int) -> None:
        """``slots`` generations run at once; the context's other sequence ids hold
        idle conversations."""
        self._llama = llama
        self._vocab = vocab
        self._ctx = llama.ctx
        self._memory = llama_lib.llama_get_memory(llama.ctx)
        self._capacity = llama.n_ctx()
        self._slots = slots
        self._cells = _Cells()
        self._sequences = [
            _Sequence(seq_id) for seq_id in range(llama_lib.llama_n_seq_max(self._ctx))
        ]
        self._batch_size = slots + PREFILL_CHUNK
        self._batch = llama_lib.llama_batch_init(self._batch_size, 0, 1)
        self._pending: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._clock = itertools.count(1)
        self._advertised: tuple[int, ...] = ()
        # Prompt tokens taken from idle sequences instead of evaluated, and generations
        # preempted for want of cells (for operators and tests).
        self.reused_tokens = 0
        self.preemptions = 0
        self._thread = threading.Thread(target=self._run, name="llama-batch", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closed:
                raise GenerationError("runtime is closed")
            self._pending.append(job)
            self._wake.notify()

    def cached_prefixes(self) -> tuple[int, ...]:
        return self._advertised

    def close(self) -> None:
        """Ends every generation (running or waiting) and stops the thread; blocks."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        llama_lib.llama_batch_free(self._batch)

    # --- scheduler thread ------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._pending and not self._running():
                    self._wake.wait()
                if self._closed:
                    break
            try:
                self._admit()
                self._report_waiting()
                self._step()
            except BaseException as error:  # reported to every generation, never lost
                log.exception("batch step failed")
                for sequence in self._running():
                    self._drop(sequence, error)
        closed = GenerationError("runtime is closed")
        for sequence in self._running():
            self._drop(sequence, closed)
        with self._wake:
            waiting, self._pending = list(self._pending), deque()
        for job in waiting:
            _fail(job, closed)

    def _running(self) -> list[_Sequence]:
        return [sequence for sequence in self._sequences if sequence.job is not None]

    def _admit(self) -> None:
        """Starts waiting jobs, in order, while a sequence and cells are free; ends
        those cancelled while they waited, wherever they are in the queue."""
        with self._wake:
            cancelled = [job for job in self._pending if job.channel.cancel.is_set()]
            for job in cancelled:
                self._pending.remove(job)
        for job in cancelled:
            _fail(job, GenerationError("generation cancelled"))
        while True:
            with self._wake:
                if not self._pending:
                    return
                job = self._pending[0]
                if job.budget <= 0:
                    self._pending.popleft()
                    job.channel.put(job.stream.finish(), 0)
                    _end(job, FinishReason.LENGTH, 0)
                    continue
                if len(self._running()) >= self._slots:
                    return
                sequence, source, reuse = self._choose(job.prompt)
                # The source's first ``reuse`` cells become the job's; the others it
                # needs must be free, the source kept.
                needed = _length(job) - reuse + self._headroom()
                if not self._make_room(needed, source):
                    return
                self._pending.popleft()
            self._start(sequence, job, source, reuse)

    def _report_waiting(self) -> None:
        """Tells the jobs left in the queue after admission that they wait: when they
        start waiting, then every ``waiting_report_s`` of theirs."""
        now = time.monotonic()
        with self._wake:
            for job in self._pending:
                reported = job.waiting_reported
                if reported is None or now - reported >= job.waiting_report_s:
                    job.waiting_reported = now
                    with contextlib.suppress(RuntimeError):  # gone: cancelled, see _admit
                        job.channel.wait(Waiting())

    def _choose(self, prompt: list[int]) -> tuple[_Sequence, _Sequence | None, int]:
        """Where a job with ``prompt`` runs: a sequence, the idle one holding the
        longest start of the prompt (None: none does) and that start's length.

        A sequence holding nothing but that start is taken; otherwise an empty
        one, else the least recently used idle one (not the source), will share
        the start and the source stays cached."""
        idle = [sequence for sequence in self._sequences if sequence.job is None]
        # At least the prompt's last token is evaluated: its logits are sampled.
        reuse = {id(s): min(_common_length(s.held, prompt), len(prompt) - 1) for s in idle}
        best = max(idle, key=lambda s: (reuse[id(s)], s.last_used))
        source = best if reuse[id(best)] > 0 else None
        if source is not None and reuse[id(source)] == len(source.held):
            return source, source, len(source.held)
        others = [s for s in idle if s is not source]
        target = min(others, key=lambda s: (bool(s.held), s.last_used))
        return target, source, reuse[id(best)] if source is not None else 0

    def _headroom(self) -> int:
        """Cells a new generation leaves free: one step of the running ones (so that
        admitting it does not preempt them at once), none when none runs (a lone
        generation always fits: the cache holds a whole context)."""
        running = len(self._running())
        return running + PREFILL_CHUNK if running else 0

    def _make_room(self, needed: int, keep: _Sequence | None = None) -> bool:
        """Evicts idle sequences (not ``keep``), oldest first, until ``needed`` cells
        are free; whether they are. (Evicting one frees only the cells no other
        sequence shares.)"""
        idle = sorted(
            (s for s in self._sequences if s.job is None and s is not keep and s.held),
            key=lambda s: s.last_used,
        )
        evicted = False
        for victim in idle:
            if self._free() >= needed:
                break
            self._forget(victim, 0)
            evicted = True
        if evicted:
            self._advertise()
        return self._free() >= needed

    def _free(self) -> int:
        return self._capacity - self._cells.used

    def _start(self, sequence: _Sequence, job: Job, source: _Sequence | None, reuse: int) -> None:
        if reuse:
            self.reused_tokens += reuse
            log.debug("prompt prefix reused", tokens=reuse, prompt_tokens=len(job.prompt))
        if job.cached_prompt is None:
            job.cached_prompt = reuse
        if source is not sequence:
            self._forget(sequence, 0)
            if source is not None:
                llama_lib.llama_memory_seq_cp(
                    self._memory, source.seq_id, sequence.seq_id, 0, reuse
                )
                sequence.held = source.held[:reuse]
                sequence.cells = self._cells.share(source.cells[:reuse])
        sequence.fingerprints = ()
        sequence.job = job
        job.waiting_reported = None
        # A preempted generation evaluates again what it had evaluated, and the
        # token it sampled last.
        sequence.feed = job.prompt[reuse:] + job.prefix + job.generated
        sequence.prompt_left = len(job.prompt) - reuse
        sequence.post_fed = 0
        sequence.started = next(self._clock)
        self._advertise()

    def _forget(self, sequence: _Sequence, keep: int) -> None:
        """Drops the sequence's cached tokens from position ``keep`` on."""
        if len(sequence.held) > keep:
            llama_lib.llama_memory_seq_rm(self._memory, sequence.seq_id, keep, -1)
            del sequence.held[keep:]
            self._cells.release(sequence.cells[keep:])
            del sequence.cells[keep:]
        sequence.fingerprints = ()

    def _step(self) -> None:
        """One decode for every running sequence, then their sampling."""
        for sequence in self._running():
            assert sequence.job is not None
            if sequence.job.channel.cancel.is_set():
                self._drop(sequence, GenerationError("generation cancelled"), keep=True)
        plan = self._plan()
        while plan and not self._make_room(sum(take for _, take in plan)):
            # Out of cells: the generation admitted last gives its own back and waits.
            self._preempt(max(self._running(), key=lambda s: s.started))
            plan = self._plan()
        if not plan:
            return
        batch = self._batch
        rows: list[tuple[_Sequence, int]] = []
        fed: list[tuple[_Sequence, list[int]]] = []
        count = 0
        for sequence, take in plan:
            job = sequence.job
            assert job is not None
            assert job.chain is not None
            if sequence.prompt_left:
                sequence.prompt_left -= take
            else:
                if sequence.post_fed >= job.accepted:
                    # A delivered token: the chain accepts it as if it had sampled it.
                    job.chain.accept(sequence.feed[0])
                    job.accepted += 1
                sequence.post_fed += 1
            tokens = sequence.feed[:take]
            del sequence.feed[:take]
            position = len(sequence.held)
            for offset, token in enumerate(tokens):
                batch.token[count] = token
                batch.pos[count] = position + offset
                batch.n_seq_id[count] = 1
                batch.seq_id[count][0] = sequence.seq_id
                batch.logits[count] = False
                count += 1
            if not sequence.feed:
                batch.logits[count - 1] = True
                rows.append((sequence, count - 1))
            fed.append((sequence, tokens))
        batch.n_tokens = count
        result = llama_lib.llama_decode(self._ctx, batch)
        if result != 0:
            error = GenerationError(f"llama_decode failed ({result})")
            for sequence, _ in fed:
                self._drop(sequence, error)
            return
        for sequence, tokens in fed:
            sequence.held.extend(tokens)
            sequence.cells.extend(self._cells.take(len(tokens)))
        for sequence, row in rows:
            self._sampled(sequence, row)

    def _plan(self) -> list[tuple[_Sequence, int]]:
        """How many tokens each running sequence evaluates this step: one past its
        prompt (those first: always in the batch), else its share of PREFILL_CHUNK."""
        plan = []
        prefill = PREFILL_CHUNK
        for sequence in sorted(self._running(), key=lambda s: s.prompt_left > 0):
            if not sequence.prompt_left:
                plan.append((sequence, 1))
            elif prefill:
                take = min(sequence.prompt_left, prefill)
                prefill -= take
                plan.append((sequence, take))
        return plan

    def _preempt(self, sequence: _Sequence) -> None:
        """Frees a running sequence's cells and queues its job first, to resume."""
        job = sequence.job
        assert job is not None
        self.preemptions += 1
        log.debug("generation preempted", tokens=len(sequence.held))
        sequence.job = None
        sequence.feed = []
        sequence.prompt_left = 0
        self._forget(sequence, 0)
        with self._wake:
            self._pending.appendleft(job)

    def _sampled(self, sequence: _Sequence, row: int) -> None:
        """Samples the sequence's next token from logits ``row`` and reports it."""
        job = sequence.job
        assert job is not None
        assert job.chain is not None
        token = job.chain.sample(self._ctx, row)
        if self._vocab.is_end(token):
            self._finish(sequence, FinishReason.STOP)
            return
        job.generated.append(token)
        job.accepted += 1
        logprob = None
        if job.sampling.logprobs:
            logprob = self._vocab.logprob(self._ctx, row, token, job.sampling.top_logprobs)
        text = job.stream.push(self._vocab.piece(token))
        job.reply.append(text)
        job.channel.put(text, 1, token, logprob)
        if job.stream.stopped:
            self._finish(sequence, FinishReason.STOP)
        elif len(job.generated) >= job.budget:
            self._finish(sequence, FinishReason.LENGTH)
        else:
            sequence.feed.append(token)

    def _finish(self, sequence: _Sequence, reason: FinishReason) -> None:
        """The generation ended normally: its tokens stay cached for the next turn."""
        job = sequence.job
        assert job is not None
        tail = job.stream.finish()
        job.channel.put(tail, 0)
        sequence.feed = []
        sequence.last_used = next(self._clock)
        if job.fingerprints is not None:
            sequence.fingerprints = job.fingerprints("".join(job.reply) + tail)
        sequence.job = None
        # Before the end: whoever sees the generation end sees the cache it left.
        self._advertise()
        _end(job, reason, len(job.generated))

    def _drop(self, sequence: _Sequence, error: BaseException, *, keep: bool = False) -> None:
        """The generation failed, or was cancelled (``keep``: its evaluated tokens stay
        cached, and freeing no cells mid-run keeps the running sequences' cells in
        order, see ``_forget``)."""
        job = sequence.job
        assert job is not None
        sequence.job = None
        sequence.feed = []
        sequence.prompt_left = 0
        sequence.last_used = next(self._clock)
        if not keep:
            self._forget(sequence, 0)
        self._advertise()
        _fail(job, error)

    def _advertise(self) -> None:
        """The fingerprints of the idle sequences' conversations, newest first."""
        idle = sorted(
            (s for s in self._sequences if s.job is None and s.fingerprints),
            key=lambda s: -s.last_used,
        )
        seen: dict[int, None] = {}
        for sequence in idle:
            for fingerprint in reversed(sequence.fingerprints):
                seen.setdefault(fingerprint, None)
        self._advertised = tuple(seen)[:MAX_ADVERTISED_PREFIXES]


class _Cells:
    """How many cache cells the sequences hold, a cell shared by several counted once.

    Cells are numbered here, not by llama.cpp (which does not say where it put a
    token); a number is held while some sequence's ``cells`` lists it."""

    def __init__(self) -> None:
        self._numbers = itertools.count()
        self._holders: dict[int, int] = {}

    @property
    def used(self) -> int:
        return len(self._holders)

    def take(self, count: int) -> list[int]:
        cells = list(itertools.islice(self._numbers, count))
        self._holders.update(dict.fromkeys(cells, 1))
        return cells

    def share(self, cells: list[int]) -> list[int]:
        for cell in cells:
            self._holders[cell] += 1
        return list(cells)

    def release(self, cells: list[int]) -> None:
        for cell in cells:
            if self._holders[cell] == 1:
                del self._holders[cell]
            else:
                self._holders[cell] -= 1


def _length(job: Job) -> int:
    """Tokens the job's sequence evaluates: prompt, delivered and sampled ones."""
    return len(job.prompt) + len(job.prefix) + len(job.generated)


def _common_length(held: list[int], prompt: list[int]) -> int:
    length = 0
    for mine, theirs in zip(held, prompt, strict=False):
        if mine != theirs:
            break
        length += 1
    return length


def _end(job: Job, reason: FinishReason, completion: int) -> None:
    """Ends the job with Finished (its stream already finished)."""
    if job.stream.stopped:
        reason = FinishReason.STOP
    job.channel.end(Finished(reason, len(job.prompt), completion, job.cached_prompt or 0))
    _release(job)


def _fail(job: Job, error: BaseException) -> None:
    with contextlib.suppress(RuntimeError):  # the consumer's loop is gone
        job.channel.end(error)
    _release(job)


def _release(job: Job) -> None:
    if job.chain is not None:
        job.chain.close()
    if not job.done.done():
        job.done.set_result(None)
