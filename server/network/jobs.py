"""A job in flight: what its nodes report, what the caller received, who earned it.

The job's record of delivered output is what a continuation is built from
when its node is lost: the text and tokens the caller has already received.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from core.agent_messages import ChunkReport, DoneReport, FailedReport, StartedReport, WaitingReport
from core.inference import (
    Continuation,
    GenerationSpec,
    JobDelta,
    NodeRequirements,
    NodeUsage,
    Usage,
)
from core.node_signing import OutputDigest


@dataclass(frozen=True, slots=True)
class NodeLost:
    """The assignment of ``epoch`` is given up (node gone, stalled or draining out)."""

    reason: str
    epoch: int


@dataclass(frozen=True, slots=True)
class QueueTimeout:
    """The assignment of ``epoch`` waited in its node's queue too long to start."""

    waited_s: float
    epoch: int


# Reports that show the job running on its node (no longer queued there): its
# stall timer counts from the last one. A waiting job's repeated report keeps a
# job the node's scheduler holds back from passing for a stalled one.
RunningReport = StartedReport | WaitingReport | ChunkReport
# What the relay reads from a job's queue: the node's reports, its loss, or its
# waiting too long to start.
NodeReport = RunningReport | DoneReport | FailedReport | NodeLost | QueueTimeout


@dataclass(slots=True)
class _Share:
    node_id: str
    operator_account_id: str = ""
    # The node signed a result over what it streamed: its work can earn.
    verified: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False, slots=True)
class ActiveJob:
    job_id: str
    spec: GenerationSpec
    node_id: str
    epoch: int = 1
    reports: asyncio.Queue[tuple[int, NodeReport]] = field(default_factory=asyncio.Queue)
    migrations: int = 0
    # Monotonic time of the current assignment's last report (or its start).
    last_progress: float = 0.0
    # The current assignment left its node's queue: its silence now counts as a stall.
    running: bool = False
    # Monotonic time of the current assignment.
    assigned_at: float = 0.0
    # Nodes this job ran on; a continuation never goes back to one of them.
    tried: set[str] = field(default_factory=set)
    # The fingerprints of the job's conversation (routing.job_prefixes): a
    # continuation too is best run where the conversation is cached.
    prefixes: tuple[int, ...] = ()
    # Highest epoch given up: its late reports are dropped even before the
    # job has moved on.
    fenced_epoch: int = 0
    prompt_tokens: int = 0
    delivered_tokens: int = 0
    _texts: list[str] = field(default_factory=list)
    _token_ids: list[int] | None = field(default_factory=list)
    _shares: list[_Share] = field(default_factory=list)
    # Digest of what each epoch's node streamed, for checking its signed result.
    _outputs: dict[int, OutputDigest] = field(default_factory=dict)
    operator_account_id: str = ""
    # Which nodes may run the job: its first node and every one it moves to.
    requirements: NodeRequirements = field(default_factory=NodeRequirements)

    def __post_init__(self) -> None:
        self.tried.add(self.node_id)
        self._shares.append(_Share(self.node_id, self.operator_account_id))

    def output(self, epoch: int) -> OutputDigest:
        """What the node of ``epoch`` has streamed so far (as accepted, in order)."""
        return self._outputs.setdefault(epoch, OutputDigest())

    def accepts(self, node_id: str, epoch: int) -> bool:
        """Fencing: only the current, not given-up assignment may report."""
        return node_id == self.node_id and epoch == self.epoch and epoch > self.fenced_epoch

    def post(self, epoch: int, report: NodeReport) -> None:
        self.reports.put_nowait((epoch, report))

    def heard(self, report: NodeReport, now: float) -> None:
        """The current assignment's node reported at ``now`` (monotonic)."""
        self.last_progress = now
        if isinstance(report, RunningReport):
            self.running = True

    def stalled(self, now: float, stall_timeout_s: float) -> bool:
        """Running, and nothing heard for ``stall_timeout_s``. A job its node's
        scheduler holds back is heard from (WaitingReport) for as long as that
        scheduler works, so only a node that stopped working on it stalls."""
        return self.running and now - self.last_progress > stall_timeout_s

    def queued_too_long(self, now: float, queue_timeout_s: float) -> bool:
        """Still in its node's queue ``queue_timeout_s`` after its assignment."""
        return not self.running and now - self.assigned_at > queue_timeout_s

    def expire(self, now: float) -> None:
        """Fences the current, still queued assignment: it waited too long to start."""
        if self.fenced_epoch < self.epoch:
            self.fenced_epoch = self.epoch
            self.post(self.epoch, QueueTimeout(now - self.assigned_at, self.epoch))

    def give_up(self, reason: str) -> None:
        """Fences the current assignment and tells the relay to move the job."""
        if self.fenced_epoch < self.epoch:
            self.fenced_epoch = self.epoch
            self.post(self.epoch, NodeLost(reason, self.epoch))

    def record(self, chunk: ChunkReport) -> JobDelta:
        """Counts a relayed chunk; returns the delta for the caller.

        The prompt is billed once: only the first reported prompt size is
        passed on, whichever node reported it.
        """
        self._texts.append(chunk.text)
        self.delivered_tokens += chunk.token_count
        share = self._shares[-1]
        share.completion_tokens += chunk.token_count
        prompt = 0
        if chunk.prompt_tokens and not self.prompt_tokens:
            prompt = self.prompt_tokens = share.prompt_tokens = chunk.prompt_tokens
        if self._token_ids is not None:
            if len(chunk.token_ids) == chunk.token_count:
                self._token_ids.extend(chunk.token_ids)
            else:
                self._token_ids = None
        return JobDelta(chunk.text, chunk.token_count, prompt, chunk.logprobs, chunk.embedding)

    def reassign(self, node_id: str, operator_account_id: str = "") -> None:
        """Moves the job to ``node_id`` under a new epoch."""
        self.fenced_epoch = max(self.fenced_epoch, self.epoch)
        self.epoch += 1
        self.migrations += 1
        self.node_id = node_id
        self.tried.add(node_id)
        self._shares.append(_Share(node_id, operator_account_id))

    def verified(self) -> None:
        """The current node's signed result checked out: its share can earn."""
        self._shares[-1].verified = True

    def continuation(self) -> Continuation:
        return Continuation(
            text="".join(self._texts),
            token_count=self.delivered_tokens,
            token_ids=tuple(self._token_ids or ()),
        )

    def remaining_spec(self) -> GenerationSpec:
        """The spec with what is left of the completion budget."""
        left = max(0, self.spec.sampling.max_tokens - self.delivered_tokens)
        return replace(self.spec, sampling=replace(self.spec.sampling, max_tokens=left))

    def usage(self, reported_prompt_tokens: int = 0) -> Usage:
        """Usage to bill; ``reported_prompt_tokens`` (from the final report) counts
        only if no chunk carried the prompt size."""
        if not self.prompt_tokens and reported_prompt_tokens:
            self.prompt_tokens = self._shares[-1].prompt_tokens = reported_prompt_tokens
        return Usage(self.prompt_tokens, self.delivered_tokens)

    def node_usage(self) -> tuple[NodeUsage, ...]:
        """Delivered usage by node, in assignment order (a node may appear once).

        A node's operator is named only if the node signed a verified result:
        work from a node that was lost or cut off earns nothing.
        """
        return tuple(
            NodeUsage(
                share.node_id,
                Usage(share.prompt_tokens, share.completion_tokens),
                share.operator_account_id if share.verified else "",
            )
            for share in self._shares
        )
