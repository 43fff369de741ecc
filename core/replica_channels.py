"""Channels to a service that runs as several replicas.

A service's address (cloud's ``--account`` and ``--network``, the network's
``--account``, the gateway's ``--cloud``) is one HOST:PORT or several,
comma-separated; one of them may be a DNS name resolving to several hosts (a
Kubernetes headless Service), over which that channel spreads its calls
(round_robin, core/channels.py).

Calls are spread over the replicas in turn. A call that did not reach its
replica's service (UNAVAILABLE without the service's ErrorInfo: the transport
failed, nothing answered) goes on to the next replica when delivering it twice
would be harmless: reads, writes that carry an idempotency key, and a stream
that had no response yet. A replica found unreachable is tried last for
``DOWN_FOR_S``, so that a dead one costs a failed connection now and then, not
on every call. So is one whose channel already failed to connect (gRPC saw it
go before any call of ours did), so that a call sent once does not fail on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc
import structlog

from core.channels import PLAINTEXT, Tls, channel
from core.grpc_errors import error_info

log = structlog.get_logger(__name__)

S = TypeVar("S")  # a service's stub
T = TypeVar("T")
R = TypeVar("R")  # a streamed response
# A server-streaming call, or a generator of its responses standing for it.
Streamed = grpc.aio.UnaryStreamCall[Any, R] | AsyncGenerator[R, None]

# How long a replica found unreachable goes to the back of the turn.
DOWN_FOR_S = 5.0
# Channels in these states have no connection and fail calls at once.
_FAILING = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)


def parse_targets(addresses: str) -> tuple[str, ...]:
    """The HOST:PORT entries of a comma-separated list, in order (blanks dropped)."""
    return tuple(target for target in (part.strip() for part in addresses.split(",")) if target)


def unreachable(error: grpc.aio.AioRpcError) -> bool:
    """Whether a call failed before the service answered it, so that another replica
    may take it: UNAVAILABLE from the transport, not a service's error (which carries
    ErrorInfo, even one that maps to UNAVAILABLE such as NO_CAPACITY)."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and error_info(error) is None


class ReplicaChannels:
    """One channel per replica address, their turn, and which seem down; closed together."""

    def __init__(self, addresses: str, tls: Tls = PLAINTEXT) -> None:
        self.targets = parse_targets(addresses)
        if not self.targets:
            raise ValueError(f"no HOST:PORT in {addresses!r}")
        self._channels = tuple(channel(target, tls) for target in self.targets)
        self._turn = 0
        # Monotonic time until which each replica is tried last.
        self._down_until = [0.0] * len(self.targets)

    def stubs(self, factory: Callable[[grpc.aio.Channel], S]) -> ReplicatedStub[S]:
        """A stub of one service on every replica."""
        return self.targeted_stubs(lambda each, _: factory(each))

    def targeted_stubs(self, factory: Callable[[grpc.aio.Channel, str], S]) -> ReplicatedStub[S]:
        """A stub of one service on every replica, made from its channel and target."""
        pairs = zip(self._channels, self.targets, strict=True)
        return ReplicatedStub(self, tuple(factory(each, target) for each, target in pairs))

    def order(self) -> list[int]:
        """The replicas one call tries, by index: from the next in turn, those found
        unreachable lately or whose channel cannot connect last."""
        start = self._turn
        self._turn = (start + 1) % len(self._channels)
        turn = [*range(start, len(self._channels)), *range(start)]
        now = time.monotonic()
        # A stable sort: the replicas keep their turn within each group.
        return sorted(turn, key=lambda index: self._down_until[index] > now or self._failing(index))

    def _failing(self, index: int) -> bool:
        return self._channels[index].get_state(try_to_connect=False) in _FAILING

    def answered(self, index: int) -> None:
        self._down_until[index] = 0.0

    def unreachable(self, index: int, error: grpc.aio.AioRpcError) -> None:
        self._down_until[index] = time.monotonic() + DOWN_FOR_S
        log.warning("replica unreachable", target=self.targets[index], error=error.details())

    async def close(self) -> None:
        for each in self._channels:
            await each.close(grace=None)


class ReplicatedStub(Generic[S]):
    def __init__(self, replicas: ReplicaChannels, stubs: tuple[S, ...]) -> None:
        self._replicas = replicas
        self._stubs = stubs

    async def each(self, attempt: Callable[[S], Awaitable[T]]) -> list[T | grpc.aio.AioRpcError]:
        """``attempt`` on every replica at once (a probe of them all): each one's
        result or the error it failed with, in the order of the addresses."""

        async def on(index: int) -> T | grpc.aio.AioRpcError:
            try:
                result = await attempt(self._stubs[index])
            except grpc.aio.AioRpcError as error:
                if unreachable(error):
                    self._replicas.unreachable(index, error)
                else:
                    self._replicas.answered(index)
                return error
            self._replicas.answered(index)
            return result

        return list(await asyncio.gather(*(on(index) for index in range(len(self._stubs)))))

    async def call(self, attempt: Callable[[S], Awaitable[T]], *, again: bool = True) -> T:
        """``attempt`` on one replica, and while none answers (with a result or an
        error) on the next ones if ``again``: for calls a replica may receive twice."""
        order = self._replicas.order()
        failure: grpc.aio.AioRpcError | None = None
        for index in order if again else order[:1]:
            try:
                result = await attempt(self._stubs[index])
            except grpc.aio.AioRpcError as error:
                if not unreachable(error):
                    self._replicas.answered(index)
                    raise
                self._replicas.unreachable(index, error)
                failure = error
            else:
                self._replicas.answered(index)
                return result
        assert failure is not None  # there is at least one replica
        raise failure

    async def stream(self, start: Callable[[S], Streamed[R]]) -> AsyncGenerator[R, None]:
        """The responses of a server-streaming call started by ``start`` on one
        replica (the call, or a generator standing for it: one that raises the
        call's errors and cancels it when closed); one that fails unreachable before
        its first response passes the call to the next. Leaving early cancels the
        call (close this generator)."""
        order = self._replicas.order()
        for index in order:
            call = start(self._stubs[index])
            answered = False
            try:
                async for response in call:
                    if not answered:
                        answered = True
                        self._replicas.answered(index)
                    yield response
                return
            except grpc.aio.AioRpcError as error:
                if answered:
                    raise
                if not unreachable(error):
                    self._replicas.answered(index)
                    raise
                self._replicas.unreachable(index, error)
                if index == order[-1]:
                    raise
            finally:
                if isinstance(call, AsyncGenerator):
                    await call.aclose()
                else:
                    call.cancel()
