"""The agent's session with the network: one bidirectional stream at a time.

Registers with a hello, heartbeats at the interval the network asks for, runs
assigned jobs and streams their tokens. When the stream breaks it cancels its
jobs (the network has already moved them elsewhere) and reconnects with
jittered exponential backoff; so it does when the network asks it to
reconnect (the server is going away), which is not a failure.

``drain`` is the graceful stop: the network is told to send no more jobs, the
running ones finish within a grace period, then the stream is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import psutil
import structlog
from resultity.agent.v1 import agent_service_pb2 as pb
from resultity.agent.v1 import agent_service_pb2_grpc as pb_grpc
from resultity.common.v1 import inference_pb2 as common_pb

from agent.backoff import Backoff
from agent.batching import MAX_BATCH_DELAY_S, MAX_BATCH_TOKENS
from agent.convert import (
    InvalidAssignment,
    failure_reason,
    finish_reason,
    generation_request,
    logprobs_to_pb,
)
from agent.identity import NodeIdentity, signed_hello
from agent.runner import FailureKind, JobRef, JobRunner
from agent.runtime.base import Runtime, StopReason, TokenLogprob
from server.common.channels import insecure_channel
from server.common.node_signing import OutputDigest, result_payload

log = structlog.get_logger(__name__)

AGENT_VERSION = "0.1.0"


@dataclass(frozen=True)
class SessionSettings:
    network: str
    node_name: str
    # Used until the network's welcome says otherwise.
    heartbeat_interval_s: float = 5.0
    # How long a stopping agent lets its running jobs finish.
    drain_grace_s: float = 30.0
    # The operator's node token (from the account layer); empty on a network
    # that does not check tokens.
    node_token: str = ""
    # The node's key; `resultity agent` keeps it in its data dir. A fresh one
    # by default (a new node every process).
    identity: NodeIdentity = field(default_factory=NodeIdentity.generate)
    # Generated text is sent in messages of up to this many tokens, or what
    # gathered within the delay (see agent/batching.py); 1 sends every token.
    batch_tokens: int = MAX_BATCH_TOKENS
    batch_delay_s: float = MAX_BATCH_DELAY_S


class _StreamSink:
    """Turns job progress into messages on the current stream; signs results.

    Each job's result is signed over a digest of every chunk sent for it
    (server/common/node_signing.py), so the network can check that the node
    stands behind exactly what it streamed.
    """

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
        self._outputs.setdefault(job, OutputDigest()).add(text, token_ids)
        self._outbound.put_nowait(
            pb.ConnectRequest(
                job_chunk=pb.JobChunk(
                    job_id=job.job_id,
                    epoch=job.epoch,
                    text=text,
                    token_count=token_count,
                    prompt_tokens=prompt_tokens,
                    token_ids=token_ids,
                    logprobs=logprobs_to_pb(logprobs),
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

    def failed(self, job: JobRef, kind: FailureKind, message: str) -> None:
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
                )
            )
        )

    def forget(self, job: JobRef) -> None:
        """A cancelled job sends no result."""
        self._outputs.pop(job, None)


class AgentSession:
    def __init__(
        self, settings: SessionSettings, runtime: Runtime, *, backoff: Backoff | None = None
    ) -> None:
        self._settings = settings
        self._runtime = runtime
        self._backoff = backoff or Backoff()
        self.node_id: str | None = None
        # The network configuration version last applied.
        self.config_version = 0
        self.connected = asyncio.Event()
        self.draining = False
        # The live session's outbound queue and runner, for drain().
        self._live: tuple[asyncio.Queue[pb.ConnectRequest | None], JobRunner] | None = None
        self._stopped = asyncio.Event()

    async def run_forever(self) -> None:
        """Keeps a session open until cancelled or drained."""
        try:
            while not self.draining:
                try:
                    reconnect = await self._session()
                    if self.draining:
                        return
                    if reconnect is None:
                        log.warning("network closed the session")
                    else:
                        log.info("network asked to reconnect", reason=reconnect)
                except grpc.aio.AioRpcError as error:
                    log.warning("session ended", code=error.code().name, details=error.details())
                if self.draining:
                    return
                delay = self._backoff.next_delay()
                log.info("reconnecting", delay_s=round(delay, 2), attempt=self._backoff.attempt)
                await asyncio.sleep(delay)
        finally:
            self._stopped.set()

    async def drain(self, grace_s: float | None = None) -> None:
        """Takes no new jobs, lets running ones finish (up to the grace period), then
        closes the session; ``run_forever`` returns. Jobs still running when the
        grace period ends are cancelled here and continued elsewhere by the network.
        """
        grace = self._settings.drain_grace_s if grace_s is None else grace_s
        self.draining = True
        live = self._live
        if live is not None:
            outbound, runner = live
            outbound.put_nowait(pb.ConnectRequest(draining=pb.Draining()))
            log.info("draining", node_id=self.node_id, active=runner.active, grace_s=grace)
            try:
                async with asyncio.timeout(grace):
                    await runner.wait_idle()
            except TimeoutError:
                log.warning("grace period over; leaving jobs to other nodes", active=runner.active)
            # Half-closing the stream ends the session: the network forgets the node.
            outbound.put_nowait(None)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._stopped.wait()
        log.info("drained", node_id=self.node_id)

    def _hello(self, challenge: pb.Challenge) -> pb.ConnectRequest:
        hello = pb.Hello(
            node_name=self._settings.node_name,
            agent_version=AGENT_VERSION,
            models=[
                pb.ServedModel(model=m.model, runtime=m.runtime, context_length=m.context_length)
                for m in self._runtime.models
            ],
            max_concurrent_jobs=self._runtime.slots,
        )
        return signed_hello(self._settings.identity, hello, challenge, self._settings.node_token)

    async def _session(self) -> str | None:
        """One session; returns the reason if the network asked to reconnect."""
        outbound: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
        sink = _StreamSink(outbound, self._settings.identity)
        runner = JobRunner(
            self._runtime,
            sink,
            batch_tokens=self._settings.batch_tokens,
            batch_delay_s=self._settings.batch_delay_s,
        )
        channel = insecure_channel(self._settings.network)
        heartbeats: asyncio.Task[None] | None = None
        try:
            call = pb_grpc.AgentServiceStub(channel).Connect(_drain(outbound))
            async for response in call:
                kind = response.WhichOneof("message")
                if kind == "challenge":
                    outbound.put_nowait(self._hello(response.challenge))
                elif kind == "welcome":
                    welcome = response.welcome
                    interval = welcome.heartbeat_interval.ToNanoseconds() / 1e9
                    self.node_id = welcome.node_id
                    self._backoff.reset()
                    self._live = (outbound, runner)
                    self.connected.set()
                    log.info("registered", node_id=self.node_id, heartbeat_s=interval)
                    heartbeats = asyncio.create_task(
                        _heartbeat(
                            outbound, runner, interval or self._settings.heartbeat_interval_s
                        )
                    )
                elif kind == "config":
                    # Applied by the next session's heartbeats (the welcome
                    # carries the same timings); acknowledged so operators see it.
                    self.config_version = response.config.version
                    outbound.put_nowait(
                        pb.ConnectRequest(
                            config_applied=pb.ConfigApplied(version=response.config.version)
                        )
                    )
                elif kind == "assign_job":
                    self._assign(runner, sink, response.assign_job)
                elif kind == "cancel_job":
                    cancel = response.cancel_job
                    runner.cancel(JobRef(cancel.job_id, cancel.epoch))
                    sink.forget(JobRef(cancel.job_id, cancel.epoch))
                elif kind == "reconnect":
                    return response.reconnect.reason
            return None
        finally:
            self._live = None
            self.connected.clear()
            if heartbeats is not None:
                heartbeats.cancel()
            await runner.cancel_all()
            outbound.put_nowait(None)
            await channel.close(grace=None)

    def _assign(
        self,
        runner: JobRunner,
        sink: _StreamSink,
        assign: pb.AssignJob,
    ) -> None:
        job = JobRef(assign.job_id, assign.epoch)
        continuation = assign.continuation if assign.HasField("continuation") else None
        try:
            request = generation_request(assign.spec, continuation)
        except InvalidAssignment as error:
            sink.failed(job, FailureKind.INVALID_REQUEST, str(error))
            return
        runner.start(job, request)


async def _drain(
    outbound: asyncio.Queue[pb.ConnectRequest | None],
) -> AsyncIterator[pb.ConnectRequest]:
    while (message := await outbound.get()) is not None:
        yield message


async def _heartbeat(
    outbound: asyncio.Queue[pb.ConnectRequest | None], runner: JobRunner, interval_s: float
) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            await asyncio.sleep(interval_s)
            outbound.put_nowait(
                pb.ConnectRequest(
                    heartbeat=pb.Heartbeat(
                        active_jobs=runner.active,
                        queued_jobs=runner.queued,
                        recent_tokens_per_second=runner.tokens_per_second(),
                        free_memory_bytes=psutil.virtual_memory().available,
                    )
                )
            )
