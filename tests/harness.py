"""In-process platform for component tests: real gRPC, real PostgreSQL.

Account, network and cloud run on one gRPC server on a free loopback port;
agents are real AgentSessions (with a test runtime) connecting over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.account.v1 import node_token_service_pb2 as node_token_pb
from resultity.account.v1 import node_token_service_pb2_grpc as node_token_grpc
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.agent.v1 import agent_service_pb2_grpc as agent_grpc
from resultity.cloud.v1 import inference_service_pb2_grpc as cloud_grpc
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from agent.backoff import Backoff
from agent.runtime.base import Runtime
from agent.session import AgentSession, SessionSettings
from agent.telemetry import AgentMetrics
from core import channels
from core.convert.generation import spec_to_pb
from core.grpc_metrics import GrpcServerMetrics
from core.inference import ChatMessage, ChatRole, GenerationSpec, Sampling
from core.metadata import bearer_metadata
from core.metrics import NO_METRICS, MetricsFactory
from gateway.app import create_app
from gateway.server import serve
from server.account.component import AccountComponent
from server.cli import _parser, _run
from server.cloud.component import CloudComponent
from server.common.bus import Bus
from server.common.credentials import generate_service_token
from server.common.shared_state import SharedState
from server.network.admission import AdmissionSettings
from server.network.component import NetworkComponent
from server.network.fleet import ReplicaSettings
from server.network.presence import Presence
from server.network.service import FailoverSettings, LivenessSettings, ValidationSettings
from server.secrets import PlatformSecrets
from tests.doubles.scripted_runtime import MODEL_ID

# Join validation and canaries run extra jobs on every node; tests of other
# concerns count jobs and texts exactly, so they run without them. Tests of
# validation pass ValidationSettings() (tests/component/test_node_validation.py).
NO_VALIDATION = ValidationSettings(enabled=False)


@dataclass
class Customer:
    account_id: str
    api_key: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.api_key)


@dataclass
class RunningAgent:
    session: AgentSession
    runtime: Runtime
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@dataclass
class Platform:
    target: str
    network: NetworkComponent
    account: AccountComponent
    cloud: CloudComponent
    channel: grpc.aio.Channel
    # Calls the account layer as the platform's own services do.
    service: tuple[tuple[str, str], ...] = ()
    agents: list[RunningAgent] = field(default_factory=list)

    @property
    def inference(self) -> cloud_grpc.InferenceServiceStub:
        return cloud_grpc.InferenceServiceStub(self.channel)

    @property
    def ledger(self) -> ledger_grpc.LedgerServiceStub:
        return ledger_grpc.LedgerServiceStub(self.channel)

    async def customer(self, credits: int) -> Customer:
        account = (
            await account_grpc.AccountServiceStub(self.channel).CreateAccount(
                account_pb.CreateAccountRequest(name="customer"), metadata=self.service
            )
        ).account
        if credits:
            await self.ledger.TopUp(
                ledger_pb.TopUpRequest(
                    account_id=account.account_id,
                    amount_micro_credits=credits,
                    idempotency_key=uuid.uuid4().hex,
                ),
                metadata=self.service,
            )
        key = await keys_grpc.ApiKeyServiceStub(self.channel).CreateApiKey(
            keys_pb.CreateApiKeyRequest(account_id=account.account_id, name="test"),
            metadata=self.service,
        )
        return Customer(account.account_id, key.secret)

    async def key(
        self, account_id: str, scope: keys_pb.ApiKeyScope.ValueType
    ) -> tuple[tuple[str, str], ...]:
        """The metadata of a new key of the account with ``scope``."""
        issued = await keys_grpc.ApiKeyServiceStub(self.channel).CreateApiKey(
            keys_pb.CreateApiKeyRequest(account_id=account_id, name="test", scopes=[scope]),
            metadata=self.service,
        )
        return bearer_metadata(issued.secret)

    async def balance(self, customer: Customer) -> ledger_pb.Balance:
        response = await self.ledger.GetBalance(
            ledger_pb.GetBalanceRequest(account_id=customer.account_id), metadata=self.service
        )
        return response.balance

    async def operator(self) -> tuple[str, str]:
        """A new node operator account and a node token for it."""
        account = (
            await account_grpc.AccountServiceStub(self.channel).CreateAccount(
                account_pb.CreateAccountRequest(name="operator"), metadata=self.service
            )
        ).account
        token = await node_token_grpc.NodeTokenServiceStub(self.channel).CreateNodeToken(
            node_token_pb.CreateNodeTokenRequest(account_id=account.account_id, name="node"),
            metadata=self.service,
        )
        return account.account_id, token.secret

    async def start_agent(
        self,
        runtime: Runtime,
        name: str = "test-node",
        node_token: str = "",
        *,
        batch_tokens: int = 1,
        region: str = "",
        metrics: AgentMetrics | None = None,
    ) -> RunningAgent:
        """An agent whose every token is its own message unless ``batch_tokens`` says
        otherwise, so tests can count chunks."""
        if not node_token:
            _, node_token = await self.operator()
        session = AgentSession(
            SessionSettings(
                network=self.target,
                node_name=name,
                node_token=node_token,
                batch_tokens=batch_tokens,
                region=region,
            ),
            runtime,
            backoff=Backoff(base_s=0.05, cap_s=0.2),
            metrics=metrics,
        )
        agent = RunningAgent(session, runtime, asyncio.create_task(session.run_forever()))
        self.agents.append(agent)
        await eventually(
            lambda: session.node_id in {n.node_id for n in self.network.service.nodes()}
        )
        return agent

    def agent_running(self, job_count: int = 1) -> RunningAgent:
        """The agent whose runtime has started ``job_count`` jobs (scripted runtimes)."""
        [agent] = [
            a for a in self.agents if len(getattr(a.runtime, "started_jobs", ())) == job_count
        ]
        return agent


def operator_command(
    platform: Platform,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *prefix: str,
) -> Callable[..., Awaitable[Any]]:
    """Runs `resultity <prefix> <argv>` in-process with the service token, and returns
    the JSON object it printed."""
    [(_, bearer)] = platform.service
    monkeypatch.setenv("RESULTITY_SERVICE_TOKEN", bearer.removeprefix("Bearer "))
    monkeypatch.delenv("RESULTITY_API_KEY", raising=False)

    async def run(*argv: str) -> Any:

        await _run(_parser().parse_args([*prefix, *argv]))
        # In-process platforms log to stdout too: the command's output is the last
        # JSON object, from a line "{" to a line "}" (or "{}").
        lines = capsys.readouterr().out.splitlines()
        start = max(i for i, line in enumerate(lines) if line in ("{", "{}"))
        end = start if lines[start] == "{}" else lines.index("}", start)
        return json.loads("\n".join(lines[start : end + 1]))

    return run


@contextlib.asynccontextmanager
async def serving_gateway(cloud_target: str) -> AsyncIterator[str]:
    """The OpenAI gateway over the cloud at ``cloud_target``, on a free loopback port;
    yields its base URL (no /v1)."""
    port = free_port()
    started = asyncio.Event()
    gateway = asyncio.create_task(
        serve(create_app(cloud_target), "127.0.0.1", port, started=started)
    )
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait((gateway, waiter), return_when=asyncio.FIRST_COMPLETED)
    if gateway.done():
        waiter.cancel()
        gateway.result()  # surfaces a start-up failure
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        gateway.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gateway


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def eventually(condition: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    """Waits until ``condition()`` holds; the timeout only bounds a broken test."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polls state owned by other tasks
            await asyncio.sleep(0.01)


_T = TypeVar("_T")


async def until(
    fetch: Callable[[], Awaitable[_T]], ready: Callable[[_T], bool], *, timeout_s: float = 10.0
) -> _T:
    """``await fetch()`` once ``ready`` holds of it (for what is written behind a
    request); the timeout only bounds a broken test."""
    async with asyncio.timeout(timeout_s):
        while not ready(found := await fetch()):  # noqa: ASYNC110 - written by other tasks
            await asyncio.sleep(0.02)
    return found


Opening = Callable[[agent_pb.Challenge], list[agent_pb.ConnectRequest]]


async def open_raw_session(
    target: str, opening: Opening, *, keep_open: bool = False
) -> tuple[agent_pb.Challenge, list[agent_pb.ConnectResponse], grpc.aio.AioRpcError | None]:
    """A node session by hand: answers the network's challenge with ``opening``, then
    (``keep_open``) stays silent, and returns what came back until the stream ended
    (and the error it ended with)."""
    challenge: asyncio.Future[agent_pb.Challenge] = asyncio.get_running_loop().create_future()
    responses: list[agent_pb.ConnectResponse] = []

    async def outgoing() -> AsyncIterator[agent_pb.ConnectRequest]:
        for request in opening(await challenge):
            yield request
        if keep_open:
            await asyncio.Event().wait()

    async with channels.insecure_channel(target) as channel:
        try:
            async for response in agent_grpc.AgentServiceStub(channel).Connect(outgoing()):
                if response.WhichOneof("message") == "challenge":
                    challenge.set_result(response.challenge)
                else:
                    responses.append(response)
        except grpc.aio.AioRpcError as error:
            return challenge.result(), responses, error
    return challenge.result(), responses, None


@contextlib.asynccontextmanager
async def running_platform(
    dsn: str,
    *,
    liveness: LivenessSettings | None = None,
    failover: FailoverSettings | None = None,
    validation: ValidationSettings = NO_VALIDATION,
    metrics: MetricsFactory = NO_METRICS,
    presence: Presence | None = None,
    max_connection_age_ms: int = channels.MAX_CONNECTION_AGE_MS,
) -> AsyncIterator[Platform]:
    """``metrics``: where the services count their work, as `resultity up`'s do. With
    ``presence``, the network is replica "replica-a" of a fleet on it (others join
    with start_network, ``account_target`` the platform's)."""
    server = channels.server(
        [GrpcServerMetrics(metrics)] if metrics is not NO_METRICS else [],
        max_connection_age_ms=max_connection_age_ms,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    target = f"127.0.0.1:{port}"
    secrets = PlatformSecrets.generate()
    # As in `resultity up`: account announces key changes to cloud in-process.
    shared = await SharedState.open()
    account = await AccountComponent.start(
        dsn, secrets, changes=shared.invalidations, metrics=metrics
    )
    network = NetworkComponent(
        liveness=liveness,
        failover=failover,
        validation=validation,
        admission=AdmissionSettings(network_id=new_network_id()),
        account_target=target,
        service_token=secrets.service_token,
        database_url=dsn,
        replica=None if presence is None else ReplicaSettings("replica-a", target),
        presence=presence,
        metrics=metrics,
    )
    await network.start()
    cloud = await CloudComponent.start(
        dsn,
        account_target=target,
        network_target=target,
        service_token=secrets.service_token,
        shared=shared,
        metrics=metrics,
    )
    for component in (account, network, cloud):
        component.register(server)
    await server.start()
    channel = channels.insecure_channel(target)
    platform = Platform(
        target, network, account, cloud, channel, bearer_metadata(secrets.service_token)
    )
    try:
        yield platform
    finally:
        for agent in platform.agents:
            await agent.stop()
        await channel.close(grace=None)
        await server.stop(None)
        await cloud.stop()
        await network.stop()
        await account.stop()
        await shared.close()


@dataclass
class NetworkServer:
    """The network layer alone on a gRPC server (no account or cloud)."""

    component: NetworkComponent
    server: grpc.aio.Server
    port: int
    service_token: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def service(self) -> tuple[tuple[str, str], ...]:
        """Metadata of the dispatch and node admin APIs' callers (the platform)."""
        return bearer_metadata(self.service_token)

    async def stop(self, grace_s: float | None = None) -> None:
        """Like a real shutdown: agents are asked to reconnect, then the server stops."""
        await self.component.stop()
        await self.server.stop(grace_s)


def new_network_id() -> str:
    """A network of its own in the shared test database: its configuration versions
    and node standings are not another test's."""
    return f"test-{uuid.uuid4().hex[:12]}"


async def start_network(
    dsn: str,
    *,
    liveness: LivenessSettings | None = None,
    failover: FailoverSettings | None = None,
    port: int = 0,
    validation: ValidationSettings = NO_VALIDATION,
    network_id: str = "",
    service_token: str = "",
    bus: Bus | None = None,
    hello_timeout_s: float = AdmissionSettings().hello_timeout_s,
    replica_id: str | None = None,
    presence: Presence | None = None,
    metrics: MetricsFactory = NO_METRICS,
    account_target: str | None = None,
) -> NetworkServer:
    """The network alone on ``dsn``; a ``network_id`` already used there restarts
    that network (its standings, configuration and job records). With the same
    ``network_id``, ``service_token``, ``bus`` and a ``presence`` as other servers,
    and a ``replica_id``, one replica of a network of several. ``account_target``:
    the account layer resolving node tokens and API keys (none: not checked)."""
    server = channels.server()
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    token = service_token or generate_service_token()
    component = NetworkComponent(
        liveness=liveness,
        failover=failover,
        validation=validation,
        admission=AdmissionSettings(
            network_id=network_id or new_network_id(), hello_timeout_s=hello_timeout_s
        ),
        account_target=account_target,
        service_token=token,
        database_url=dsn,
        bus=bus,
        replica=None
        if replica_id is None
        else ReplicaSettings(replica_id=replica_id, address=f"127.0.0.1:{bound}"),
        presence=presence,
        metrics=metrics,
    )
    await component.start()
    component.register(server)
    await server.start()
    return NetworkServer(component, server, bound, token)


class JobStream:
    """RunJob's events through a network server, as they arrive."""

    def __init__(self, network: NetworkServer, job_id: str) -> None:
        self.events: list[dispatch_pb.RunJobResponse] = []
        spec = GenerationSpec(
            model=MODEL_ID,
            messages=(ChatMessage(ChatRole.USER, "hello there"),),
            sampling=Sampling(max_tokens=200),
            max_prompt_tokens=100,
        )
        self.task = asyncio.create_task(self._run(network, job_id, spec))

    async def _run(self, network: NetworkServer, job_id: str, spec: GenerationSpec) -> None:
        async with channels.insecure_channel(network.target) as channel:
            call = dispatch_grpc.DispatchServiceStub(channel).RunJob(
                dispatch_pb.RunJobRequest(job_id=job_id, spec=spec_to_pb(spec)),
                metadata=network.service,
            )
            async for event in call:
                self.events.append(event)

    def of(self, kind: str) -> list[dispatch_pb.RunJobResponse]:
        return [event for event in self.events if event.WhichOneof("event") == kind]

    @property
    def text(self) -> str:
        return "".join(event.delta.text for event in self.of("delta"))
