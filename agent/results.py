"""What the agent sends about its jobs, and its signature over each result.

Each job's result is signed over a digest of every chunk sent for it (text,
token ids, logprobs, embedding: server/common/node_signing.py), so the
network can check that the node stands behind exactly what it streamed.
Logprobs are digested in the form they are sent in (the network's domain
type), so both sides hash the same values.
"""

from __future__ import annotations

import asyncio

from resultity.agent.v1 import agent_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb

from agent.convert import delivered_logprobs, failure_reason, finish_reason
from agent.identity import NodeIdentity
from agent.runner import FailureKind, JobRef
from agent.runtime.base import StopReason, TokenLogprob
from core.inference_proto import logprobs_to_pb
from core.node_signing import OutputDigest, result_payload


class ResultSink:
    """Turns job progress into messages on the current stream; signs results."""

    def __init__(
        self, outbound: asyncio.Queue[pb.ConnectRequest | None], identity: NodeIdentity
    ) -> None:
        self._outbound = outbound
        self._identity = identity
        self._outputs: dict[JobRef, OutputDigest] = {}

    def _sign(
        self, job: JobRef, *, done: bool, reason: int, prompt_tokens: int, completion_tokens: int
    ) -> bytes:
        payload = result_payload(
            job_id=job.job_id,
            epoch=job.epoch,
            done=done,
            reason=reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            output=self._outputs.pop(job, OutputDigest()),
        )
        return self._identity.sign(payload)

    def chunk(
        self,
        job: JobRef,
        text: str,
        token_count: int,
        prompt_tokens: int,
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] = (),
        embedding: tuple[float, ...] = (),
    ) -> None:
        delivered = delivered_logprobs(logprobs)
        self._outputs.setdefault(job, OutputDigest()).add(text, token_ids, delivered, embedding)
        self._outbound.put_nowait(
            pb.ConnectRequest(
                job_chunk=pb.JobChunk(
                    job_id=job.job_id,
                    epoch=job.epoch,
                    text=text,
                    token_count=token_count,
                    prompt_tokens=prompt_tokens,
                    token_ids=token_ids,
                    logprobs=logprobs_to_pb(delivered),
                    embedding=embedding,
                )
            )
        )

    def done(
        self, job: JobRef, reason: StopReason, prompt_tokens: int, completion_tokens: int
    ) -> None:
        code = finish_reason(reason)
        signature = self._sign(
            job,
            done=True,
            reason=code,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        self._outbound.put_nowait(
            pb.ConnectRequest(
                job_done=pb.JobDone(
                    job_id=job.job_id,
                    epoch=job.epoch,
                    finish_reason=code,
                    usage=common_pb.Usage(
                        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
                    ),
                    signature=signature,
                )
            )
        )

    def started(self, job: JobRef) -> None:
        self._outbound.put_nowait(
            pb.ConnectRequest(job_started=pb.JobStarted(job_id=job.job_id, epoch=job.epoch))
        )

    def failed(self, job: JobRef, kind: FailureKind, message: str, param: str = "") -> None:
        code = failure_reason(kind)
        signature = self._sign(job, done=False, reason=code, prompt_tokens=0, completion_tokens=0)
        self._outbound.put_nowait(
            pb.ConnectRequest(
                job_failed=pb.JobFailed(
                    job_id=job.job_id,
                    epoch=job.epoch,
                    reason=code,
                    message=message,
                    signature=signature,
                    param=param,
                )
            )
        )

    def forget(self, job: JobRef) -> None:
        """A cancelled job sends no result."""
        self._outputs.pop(job, None)
