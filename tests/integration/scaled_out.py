"""The platform scaled out on this machine, every service its own OS process:
account and network replicas, cloud replicas each calling every account replica
and every network replica, or those the test names (each cloud replica starting
the turn at another one), a gateway per cloud replica (gateway i calls cloud i,
or the cloud replicas the test names), and the agents a test starts, homed on
the network replicas it chooses: scripted, or `resultity agent` running the
bundled SmolLM2. The network replicas resolve the agents' node tokens through the
account replicas. What replicas share lives in one PostgreSQL database, one Redis
and, when given, RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.account.v1 import node_token_service_pb2 as node_token_pb
from resultity.account.v1 import node_token_service_pb2_grpc as node_token_grpc
from resultity.account.v1 import rate_limits_pb2 as rate_limits_pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from core import channels
from core.metadata import bearer_metadata
from core.namespace import AmqpNames, RedisNames
from core.replica_channels import ReplicaChannels
from server.common.credentials import generate_service_token
from server.network.catalog import SMOLLM2_135M
from tests.harness import free_port
from tests.namespaces import forget_amqp, forget_redis, new_namespace

REPO = Path(__file__).resolve().parents[2]
# Cloud replicas trust cached keys this long: a key refused sooner was refused
# because an invalidation reached the replica, not because its entry expired.
CACHE_TTL_S = "3600"
READY_TIMEOUT_S = 60.0
# Until every agent serves: it connects, (the real one) loads its model, and
# passes the network's join checks, on a loaded machine.
NODES_TIMEOUT_S = 240.0
CLI = (sys.executable, "-m", "server.cli", "--log-level", "warning")


@dataclass
class Processes:
    """Started processes by name, their output in ``<logs>/<name>.log``; ended with
    SIGTERM, then SIGKILL."""

    logs: Path
    env: dict[str, str]
    running: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    _commands: dict[str, tuple[tuple[str, ...], dict[str, str]]] = field(default_factory=dict)

    async def spawn(
        self, name: str, *argv: str, env: Mapping[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        """Starts ``argv`` as ``name``, with ``env`` added to the platform's environment."""
        self._commands[name] = (argv, {**self.env, **(env or {})})
        return await self._start(name)

    async def _start(self, name: str) -> asyncio.subprocess.Process:
        argv, env = self._commands[name]
        with (self.logs / f"{name}.log").open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=REPO, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        self.running[name] = process
        return process

    async def kill(self, name: str) -> None:
        """SIGKILL: the process ends with no chance to clean up."""
        process = self.running[name]
        process.kill()
        await process.wait()

    async def restart(self, name: str) -> asyncio.subprocess.Process:
        """Starts a process that ended again, with the same command."""
        assert self.running[name].returncode is not None, f"{name} still runs"
        return await self._start(name)

    async def close(self) -> None:
        for process in reversed(self.running.values()):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                await asyncio.wait_for(process.wait(), timeout=15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def wait_until_listening(port: int, process: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(READY_TIMEOUT_S):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"process on port {port} exited with {process.returncode}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            await writer.wait_closed()
            return


@dataclass
class Customer:
    account_id: str
    api_key: str
    api_key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The key as gRPC calls to cloud present it."""
        return bearer_metadata(self.api_key)


@dataclass(frozen=True)
class Agent:
    name: str
    # The node operator's account, credited for the node's work, and its token.
    operator_id: str
    node_token: str
    # Where the node's key is kept: the same node when started again.
    data_dir: Path


@dataclass
class ScaledOut:
    accounts: list[str]
    networks: list[str]
    clouds: list[str]
    gateways: list[str]
    service_token: str
    processes: Processes
    # The test's own calls to the account service, to whichever replica is up.
    account_replicas: ReplicaChannels
    # Each service process's port, by name (account-0, network-1, cloud-0, ...).
    ports: dict[str, int]
    # The platform's keys and channels in Redis (a namespace of its own).
    redis_names: RedisNames

    @property
    def service(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.service_token)

    async def restart(self, name: str) -> None:
        """Starts a service process that ended again; returns once it listens and,
        for an account replica, once the test's own channel to it answers again
        (until its next reconnect attempt it fails calls fast, core/channels.py)."""
        await wait_until_listening(self.ports[name], await self.processes.restart(name))
        service, _, index = name.partition("-")
        if service == "account":
            await self._reconnected(int(index))

    async def _reconnected(self, account: int) -> None:
        health = self.account_replicas.stubs(health_pb2_grpc.HealthStub)
        request = health_pb2.HealthCheckRequest()
        async with asyncio.timeout(READY_TIMEOUT_S):
            while True:
                answers = await health.each(lambda stub: stub.Check(request))
                if not isinstance(answers[account], grpc.aio.AioRpcError):
                    return
                await asyncio.sleep(0.1)

    async def create_account(self, name: str) -> str:
        accounts = self.account_replicas.stubs(account_grpc.AccountServiceStub)
        request = account_pb.CreateAccountRequest(name=name)
        response = await accounts.call(
            lambda stub: stub.CreateAccount(request, metadata=self.service)
        )
        return response.account.account_id

    async def top_up(self, account_id: str, credits: int) -> None:
        ledger = self.account_replicas.stubs(ledger_grpc.LedgerServiceStub)
        request = ledger_pb.TopUpRequest(
            account_id=account_id, amount_micro_credits=credits, idempotency_key=uuid.uuid4().hex
        )
        await ledger.call(lambda stub: stub.TopUp(request, metadata=self.service))

    async def customer(
        self, credits: int, limits: rate_limits_pb.RateLimits | None = None
    ) -> Customer:
        account_id = await self.create_account("customer")
        await self.top_up(account_id, credits)
        keys = self.account_replicas.stubs(keys_grpc.ApiKeyServiceStub)
        request = keys_pb.CreateApiKeyRequest(
            account_id=account_id, name="test", rate_limits=limits
        )
        issued = await keys.call(lambda stub: stub.CreateApiKey(request, metadata=self.service))
        return Customer(account_id, issued.secret, issued.api_key.api_key_id)

    async def operator(self) -> tuple[str, str]:
        """A new node operator account and a node token of it."""
        account_id = await self.create_account("operator")
        tokens = self.account_replicas.stubs(node_token_grpc.NodeTokenServiceStub)
        request = node_token_pb.CreateNodeTokenRequest(account_id=account_id, name="node")
        issued = await tokens.call(
            lambda stub: stub.CreateNodeToken(request, metadata=self.service)
        )
        return account_id, issued.secret

    async def balance(self, account_id: str) -> ledger_pb.Balance:
        ledger = self.account_replicas.stubs(ledger_grpc.LedgerServiceStub)
        request = ledger_pb.GetBalanceRequest(account_id=account_id)
        response = await ledger.call(lambda stub: stub.GetBalance(request, metadata=self.service))
        return response.balance

    async def ledger_summary(self) -> ledger_pb.GetLedgerSummaryResponse:
        ledger = self.account_replicas.stubs(ledger_grpc.LedgerServiceStub)
        request = ledger_pb.GetLedgerSummaryRequest()
        return await ledger.call(lambda stub: stub.GetLedgerSummary(request, metadata=self.service))

    async def revoke(self, customer: Customer) -> None:
        keys = self.account_replicas.stubs(keys_grpc.ApiKeyServiceStub)
        request = keys_pb.RevokeApiKeyRequest(api_key_id=customer.api_key_id)
        await keys.call(lambda stub: stub.RevokeApiKey(request, metadata=self.service))

    async def agent(
        self,
        name: str,
        *,
        homes: Sequence[int] = (0,),
        region: str = "",
        script: str | None = None,
        token_delay_s: float = 0.0,
        slots: int = 4,
        llama: bool = False,
    ) -> Agent:
        """An agent process with a node token of an operator of its own, connecting to
        the network replicas ``homes`` (indexes, in the order it tries them): the
        scripted runtime answering the join checks, or with ``llama`` `resultity
        agent` running the bundled SmolLM2 (one slot, one thread)."""
        operator_id, node_token = await self.operator()
        data_dir = self.processes.logs / name
        common = (
            "--network", ",".join(self.networks[index] for index in homes), "--name", name,
            *(("--region", region) if region else ()), "--data-dir", str(data_dir),
        )  # fmt: skip
        if llama:
            argv: tuple[str, ...] = (
                *CLI, "agent", *common, "--threads", "1", "--context-length", "1024",
                "--drain-grace", "5",
            )  # fmt: skip
        else:
            argv = (
                sys.executable, "-m", "tests.doubles.scripted_agent", *common,
                "--slots", str(slots), "--answer-canaries", "--token-delay", str(token_delay_s),
                *(("--script", script) if script else ()),
            )  # fmt: skip
        await self.processes.spawn(name, *argv, env={"RESULTITY_NODE_TOKEN": node_token})
        return Agent(name, operator_id, node_token, data_dir)

    async def nodes_of(self, network: int) -> list[admin_pb.Node]:
        """The nodes network replica ``network`` owns (their sessions are with it), as
        it lists them (it lists the other replicas' too)."""
        async with channels.insecure_channel(self.networks[network]) as channel:
            response = await admin_grpc.NodeAdminServiceStub(channel).ListNodes(
                admin_pb.ListNodesRequest(), metadata=self.service
            )
        return [node for node in response.nodes if node.replica_id == f"network-{network}"]

    async def ready_nodes(self, network: int) -> int:
        """The nodes network replica ``network`` routes to, its own and the others'."""
        async with channels.insecure_channel(self.networks[network]) as channel:
            response = await dispatch_grpc.DispatchServiceStub(channel).ListModels(
                dispatch_pb.ListModelsRequest(), metadata=self.service
            )
        ready = [model.ready_nodes for model in response.models if model.id == SMOLLM2_135M.id]
        return ready[0] if ready else 0

    async def wait_for_nodes(self, count: int) -> None:
        """Until every network replica routes over ``count`` ready nodes."""
        async with asyncio.timeout(NODES_TIMEOUT_S):
            for network in range(len(self.networks)):
                while await self.ready_nodes(network) != count:  # noqa: ASYNC110 - polls a process
                    await asyncio.sleep(0.2)

    async def wait_until_serving(self, http: httpx.AsyncClient) -> None:
        """Until every gateway lists the model: an agent passed validation."""
        probe = await self.customer(credits=1)
        async with asyncio.timeout(NODES_TIMEOUT_S):
            for gateway in self.gateways:
                while True:
                    response = await http.get(f"{gateway}/v1/models", headers=probe.headers)
                    if response.status_code == 200 and response.json()["data"]:
                        break
                    await asyncio.sleep(0.2)


def _environment(
    service_token: str, redis_url: str, namespace: str, extra: Mapping[str, str] | None
) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RESULTITY_RATE_LIMIT_", "RESULTITY_CLOUD_"))
    }
    env.update(
        RESULTITY_SERVICE_TOKEN=service_token,
        RESULTITY_KEY_HASH_SECRET=secrets.token_hex(32),
        RESULTITY_REDIS_URL=redis_url,
        RESULTITY_NAMESPACE=namespace,
        RESULTITY_CLOUD_CACHE_TTL_S=CACHE_TTL_S,
        PYTHONPATH=os.pathsep.join(
            [str(REPO), str(REPO / "generated"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    env.update(extra or {})
    return env


@contextlib.asynccontextmanager
async def scaled_out(
    logs: Path,
    database_url: str,
    redis_url: str,
    *,
    accounts: int = 1,
    networks: int = 1,
    replicas: int = 2,
    amqp_url: str | None = None,
    env: Mapping[str, str] | None = None,
    cloud_networks: Sequence[int] | None = None,
    gateway_clouds: Sequence[Sequence[int]] | None = None,
) -> AsyncIterator[ScaledOut]:
    """``accounts`` account and ``networks`` network replicas, ``replicas`` cloud
    replicas and as many gateways; ``env`` adds to every process's environment (e.g.
    RESULTITY_CLOUD_INFLIGHT_* settings); ``cloud_networks``: the network replicas
    (indexes) the cloud replicas call, unset all; ``gateway_clouds``: the cloud
    replicas (indexes, in turn from the first) each gateway calls, unset its own
    alone. No agent: the test starts its own.
    The platform keeps to a namespace of its own in Redis and RabbitMQ."""
    service_token = generate_service_token()
    namespace = new_namespace()
    processes = Processes(logs, _environment(service_token, redis_url, namespace, env))
    queue = ("--amqp-url", amqp_url) if amqp_url else ()
    stores = ("--database-url", database_url, *queue)
    ports = {
        name: free_port()
        for kind, count in (
            ("account", accounts),
            ("network", networks),
            ("cloud", replicas),
            ("gateway", replicas),
        )
        for name in (f"{kind}-{index}" for index in range(count))
    }

    def addresses(kind: str) -> list[str]:
        return [f"127.0.0.1:{port}" for name, port in ports.items() if name.startswith(kind)]

    account_list, network_list = addresses("account"), addresses("network")
    called = network_list if cloud_networks is None else [network_list[i] for i in cloud_networks]
    account_replicas = ReplicaChannels(",".join(account_list))
    try:
        # All at once: replicas starting together take turns at the migrations.
        for name, port in ports.items():
            kind, _, index = name.partition("-")
            listen = f"127.0.0.1:{port}"
            data_dir = ("--data-dir", str(logs / name))
            if kind == "account":
                await processes.spawn(name, *CLI, "account", "--listen", listen, *stores, *data_dir)
            elif kind == "network":
                await processes.spawn(
                    name, *CLI, "network", "--listen", listen, "--replica-id", name,
                    "--account", ",".join(account_list), "--database-url", database_url,
                    *data_dir,
                )  # fmt: skip
            elif kind == "cloud":
                turn = int(index) % len(called)
                await processes.spawn(
                    name, *CLI, "cloud", "--listen", listen,
                    "--account", ",".join(account_list),
                    "--network", ",".join(called[turn:] + called[:turn]),
                    *stores, *data_dir,
                )  # fmt: skip
            else:
                clouds = [int(index)] if gateway_clouds is None else gateway_clouds[int(index)]
                cloud = ",".join(f"127.0.0.1:{ports[f'cloud-{each}']}" for each in clouds)
                await processes.spawn(name, *CLI, "gateway", "--cloud", cloud, "--port", str(port))
        for name, port in ports.items():
            await wait_until_listening(port, processes.running[name])
        yield ScaledOut(
            account_list,
            network_list,
            addresses("cloud"),
            [f"http://{address}" for address in addresses("gateway")],
            service_token,
            processes,
            account_replicas,
            ports,
            RedisNames(namespace),
        )
    finally:
        await processes.close()
        await account_replicas.close()
        await forget_redis(redis_url, namespace)
        if amqp_url:
            await forget_amqp(amqp_url, AmqpNames(namespace))


def chat_request(max_tokens: int = 2) -> dict[str, object]:
    return {
        "model": SMOLLM2_135M.id,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }


def cost(usage: dict[str, int]) -> int:
    """What the catalog price makes of a response's usage, in micro-credits."""
    price = SMOLLM2_135M.price
    return usage["prompt_tokens"] * price.prompt + usage["completion_tokens"] * price.completion
