"""The gateway's calls to cloud, over cloud's replicas.

``--cloud`` is one HOST:PORT or several, comma-separated, or a DNS name resolving to
several hosts; core/replica_channels.py spreads the calls over them in turn and
passes a call that did not reach its replica to the next one where that is harmless,
as it does for cloud's own calls to the account and network services.

Which calls a second replica may take when the first was unreachable:

- reads (models, jobs, the readiness probe): always;
- unary completions and embeddings: never. They carry no idempotency key, and the
  replica may have run (and billed) the job before its connection failed;
- streamed completions: before their first response only. Cloud sends that once the
  request is admitted and a node has the job, before any token; after it, the
  client may have text, and the stream's failure is the client's to see.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc
from resultity.cloud.v1 import inference_service_pb2_grpc, job_service_pb2_grpc

from core.channels import PLAINTEXT, Tls
from core.replica_channels import ReplicaChannels, ReplicatedStub

if TYPE_CHECKING:
    from resultity.cloud.v1.inference_service_pb2_grpc import InferenceServiceAsyncStub
    from resultity.cloud.v1.job_service_pb2_grpc import JobServiceAsyncStub

S = TypeVar("S")  # a service's stub
R = TypeVar("R")  # a response
C = TypeVar("C", bound=grpc.aio.Call)


class Cloud:
    """Cloud's services on every replica; the channels close together."""

    def __init__(self, addresses: str, tls: Tls = PLAINTEXT) -> None:
        self._replicas = ReplicaChannels(addresses, tls)
        self.targets = self._replicas.targets
        self.inference: ReplicatedStub[InferenceServiceAsyncStub] = self._replicas.stubs(
            inference_service_pb2_grpc.InferenceServiceStub
        )
        self.jobs: ReplicatedStub[JobServiceAsyncStub] = self._replicas.stubs(
            job_service_pb2_grpc.JobServiceStub
        )
        self.health = self._replicas.stubs(health_pb2_grpc.HealthStub)

    async def close(self) -> None:
        await self._replicas.close()


class CloudCall:
    """A call to cloud as the relay (gateway/relay.py) handles it, whichever replica
    takes it: cancelled when the client leaves (a replica tried after that is
    cancelled at once), its metadata read from the replica's call."""

    def __init__(self) -> None:
        self._call: grpc.aio.Call | None = None
        self._cancelled = False

    def on(self, call: C) -> C:
        """``call``, just started on a replica, is this call from now on."""
        self._call = call
        if self._cancelled:
            call.cancel()
        return call

    def cancel(self) -> bool:
        self._cancelled = True
        return self._call is not None and self._call.cancel()

    async def initial_metadata(self) -> grpc.aio.Metadata | None:
        return None if self._call is None else await self._call.initial_metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata | None:
        return None if self._call is None else await self._call.trailing_metadata()


def unary(
    stub: ReplicatedStub[S],
    start: Callable[[S], grpc.aio.UnaryUnaryCall[Any, R]],
    *,
    again: bool,
) -> tuple[CloudCall, Awaitable[R]]:
    """The call ``start`` makes on a replica, and its response; on the next replicas
    while none is reachable if ``again`` (reads only, see above)."""
    call = CloudCall()
    return call, stub.call(lambda each: call.on(start(each)), again=again)


def streamed(
    stub: ReplicatedStub[S], start: Callable[[S], grpc.aio.UnaryStreamCall[Any, R]]
) -> tuple[CloudCall, AsyncGenerator[R, None]]:
    """The stream ``start`` opens on a replica, and its responses; on the next replica
    while one fails unreachable before its first response."""
    call = CloudCall()
    return call, stub.stream(lambda each: call.on(start(each)))
