"""What the agent sends about its jobs, and its signature over each result.

Each job's result is signed over a digest of every chunk sent for it (text,
token ids, logprobs, embedding: core/node_signing.py), so the network can
check that the node stands behind exactly what it streamed. Logprobs are
digested in the form they are sent in (core's TokenLogprob, as the runtime
made them), so both sides hash the same values.
"""

from __future__ import annotations

import asyncio

from resultity.agent.v1 import agent_service_pb2 as pb

from agent.identity import NodeIdentity
from agent.runner import JobRef
from core.agent_messages import (
    ChunkReport,
    DoneReport,
    FailedReport,
    FailureKind,
    StartedReport,
    WaitingReport,
)
from core.convert.agent_reports import report_to_pb
from core.convert.generation import finish_reason_to_pb
from core.convert.job_events import failure_to_pb
from core.inference import FinishReason, Usage
from core.node_signing import OutputDigest, result_payload


class ResultSink:
    """Turns job progress into messages on the current stream; signs results."""

    def __init__(
        self, outbound: asyncio.Queue[pb.ConnectRequest | None], identity: NodeIdentity
    ) -> None:
        self._outbound = outbound
        self._identity = identity
        self._outputs: dict[tuple[str, int], OutputDigest] = {}

    def _sign(self, job: JobRef, *, done: bool, reason: int, usage: Usage) -> bytes:
        payload = result_payload(
            job_id=job.job_id,
            epoch=job.epoch,
            done=done,
            reason=reason,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            output=self._outputs.pop((job.job_id, job.epoch), OutputDigest()),
        )
        return self._identity.sign(payload)

    def chunk(self, chunk: ChunkReport) -> None:
        output = self._outputs.setdefault((chunk.job_id, chunk.epoch), OutputDigest())
        output.add(chunk.text, chunk.token_ids, chunk.logprobs, chunk.embedding)
        self._outbound.put_nowait(report_to_pb(chunk))

    def done(
        self,
        job: JobRef,
        reason: FinishReason,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int,
    ) -> None:
        """Reports the job done. ``cached_prompt_tokens`` stays on the node (its
        metrics): the network is told, and bills, every prompt token."""
        code = finish_reason_to_pb(reason)
        usage = Usage(prompt_tokens, completion_tokens)
        signature = self._sign(job, done=True, reason=code, usage=usage)
        report = DoneReport(job.job_id, job.epoch, reason, usage, signature, code)
        self._outbound.put_nowait(report_to_pb(report))

    def started(self, job: JobRef) -> None:
        self._outbound.put_nowait(report_to_pb(StartedReport(job.job_id, job.epoch)))

    def waiting(self, job: JobRef) -> None:
        self._outbound.put_nowait(report_to_pb(WaitingReport(job.job_id, job.epoch)))

    def failed(self, job: JobRef, kind: FailureKind, message: str, param: str = "") -> None:
        code = failure_to_pb(kind)
        usage = Usage()
        signature = self._sign(job, done=False, reason=code, usage=usage)
        report = FailedReport(job.job_id, job.epoch, kind, message, usage, signature, code, param)
        self._outbound.put_nowait(report_to_pb(report))

    def forget(self, job: JobRef) -> None:
        """A cancelled job sends no result."""
        self._outputs.pop((job.job_id, job.epoch), None)
