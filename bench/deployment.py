"""The control plane scaled out on this machine, every service its own process.

Account, network replicas, cloud replicas and gateways are started as the
README's "Scaling out" starts them (`python -m server.cli account|network|cloud|
gateway`), on a scratch database of the PostgreSQL server given, with Redis
(and RabbitMQ, when given) for every service or for none; gateway ``i`` calls
cloud ``i``. The node is bench/gateway_sides.py's agent side: an AgentSession
whose runtime generates instantly and answers the network's join canaries.

Shared services are shared with other people's runs, so each deployment gets
a Redis logical database of its own (one that held no key, claimed atomically
and emptied afterwards: node presence keys are not namespaced per network) and a
RabbitMQ virtual host of its own (its queue names are fixed); the virtual hosts
must exist (``rabbitmq_vhost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import psutil
import redis

from bench.gateway_sides import ServerProcess, create_customer_key, create_node_token, start_side
from bench.machine_load import POSTGRES, RABBITMQ, REDIS, postgres_role
from bench.processes import ProcessGroup, accepts, cpu_s, free_port, supervised
from bench.scratch_database import scratch_database
from core import channels
from core.metadata import bearer_metadata
from server.common.credentials import generate_service_token

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0
CLAIM_KEY = "resultity-bench:claim"
CLAIM_TTL_S = 3600
# The control plane's processes by role; the node ("agent") and the shared services apart.
CONTROL_PLANE = ("gateway", "cloud", "network", "account")
# Variables the services read that a deployment sets itself, or must not inherit.
_INHERITED_OUT = ("RESULTITY_",)
# Per-key limits no run reaches: every request still takes from and gives back to the
# counters (in Redis when shared), as in a deployment that limits its keys.
UNREACHED_KEY_LIMITS = {
    "RESULTITY_RATE_LIMIT_KEY_REQUESTS_PER_MINUTE": str(10**9),
    "RESULTITY_RATE_LIMIT_KEY_TOKENS_PER_MINUTE": str(10**12),
    "RESULTITY_RATE_LIMIT_KEY_CONCURRENT_REQUESTS": str(10**5),
}


@dataclass(frozen=True)
class Topology:
    """``networks`` network replicas, the node on replica ``node_on``, cloud calling
    replica ``cloud_network``; ``pairs`` gateway+cloud replicas; ``shared``: Redis (and
    RabbitMQ, if given) for every service, else each keeps its state in memory."""

    name: str
    networks: int = 1
    node_on: int = 0
    cloud_network: int = 0
    pairs: int = 1
    shared: bool = True


@dataclass(frozen=True)
class SharedServices:
    database_url: str  # the server; each deployment creates a scratch database on it
    redis_url: str
    amqp_url: str | None  # the broker; each deployment uses a virtual host of its own


@dataclass
class Deployment:
    topology: Topology
    gateways: list[str]  # base URLs
    api_key: str
    database: str
    processes: dict[str, list[psutil.Process]] = field(default_factory=dict)  # by role
    services: frozenset[str] = frozenset()  # shared services' process names it uses

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far: of each role's processes; of the PostgreSQL backends of
        this deployment's database ("postgres"); of the whole Redis and RabbitMQ
        servers ("redis", "rabbitmq"), when it uses them and they run here."""
        out = dict.fromkeys((*CONTROL_PLANE, "agent", "postgres", "redis", "rabbitmq"), 0.0)
        for role, processes in self.processes.items():
            out[role] += sum(cpu_s(process) for process in processes)
        for process in psutil.process_iter(["name"]):
            name = process.info["name"]
            if name == POSTGRES and postgres_role(process, (self.database,)) == "backend":
                out["postgres"] += cpu_s(process)
            elif name == REDIS and REDIS in self.services:
                out["redis"] += cpu_s(process)
            elif name == RABBITMQ and RABBITMQ in self.services:
                out["rabbitmq"] += cpu_s(process)
        return out


def rabbitmq_vhost(amqp_url: str, topology: Topology) -> str:
    """The deployment's broker URL: virtual host ``resultity-bench-<topology>``."""
    vhost = f"resultity-bench-{topology.name}"
    return urlunsplit(urlsplit(amqp_url)._replace(path="/" + quote(vhost, safe="")))


@contextlib.contextmanager
def _claimed_redis_database(url: str) -> Iterator[str]:
    """A logical database of the Redis at ``url`` that held no key, claimed with a key
    of the deployment's own (atomically: two runs never share one), emptied after."""
    client = redis.Redis.from_url(url)
    try:
        count = int(client.config_get("databases").get("databases") or 16)
    except redis.ResponseError:
        count = 16  # CONFIG refused (a managed Redis): the default number
    finally:
        client.close()
    claim = uuid.uuid4().hex
    for index in reversed(range(count)):
        candidate = urlunsplit(urlsplit(url)._replace(path=f"/{index}"))
        database = redis.Redis.from_url(candidate)
        claimed = database.eval(
            "if redis.call('DBSIZE') == 0 then "
            "redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1 end return 0",
            1,
            CLAIM_KEY,
            claim,
            CLAIM_TTL_S,
        )
        if claimed:
            try:
                yield candidate
            finally:
                if database.get(CLAIM_KEY) == claim.encode():
                    database.flushdb()
                database.close()
            return
        database.close()
    raise RuntimeError(f"no empty logical database left on the Redis at {url}")


def _environment(service_token: str, rate_limits: bool) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(_INHERITED_OUT)}
    if rate_limits:
        env.update(UNREACHED_KEY_LIMITS)
    env.update(
        RESULTITY_SERVICE_TOKEN=service_token,
        RESULTITY_KEY_HASH_SECRET=secrets.token_hex(32),
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "generated")]),
    )
    return env


async def _wait_until(group: ProcessGroup, ready: Callable[[], bool], what: str) -> None:
    """Until ``ready()``, polled in a thread: the deployments start side by side."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    await asyncio.to_thread(group.wait_until, lambda: True if ready() else None, deadline, what)


def _serving(gateway: str) -> bool:
    """Whether the gateway's readiness probe says a model has a ready node."""
    try:
        return httpx.get(f"{gateway}/ready", timeout=5.0).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.asynccontextmanager
async def deployed(
    topology: Topology, shared: SharedServices, tokens: int, *, rate_limits: bool
) -> AsyncIterator[Deployment]:
    """``topology`` running, serving the zero runtime's model through every gateway;
    with ``rate_limits``, cloud counts every key's requests (UNREACHED_KEY_LIMITS)."""
    service_token = generate_service_token()
    async with contextlib.AsyncExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="resultity-bench-")))
        dsn = await stack.enter_async_context(scratch_database(shared.database_url))
        flags = ["--database-url", dsn]
        services = {POSTGRES}
        if topology.shared:
            flags += ["--redis-url", stack.enter_context(_claimed_redis_database(shared.redis_url))]
            services.add(REDIS)
        amqp = (
            ["--amqp-url", rabbitmq_vhost(shared.amqp_url, topology)]
            if topology.shared and shared.amqp_url
            else []
        )
        if amqp:
            services.add(RABBITMQ)
        group = stack.enter_context(supervised(logs / "control-plane.log"))
        env = _environment(service_token, rate_limits)
        pids: dict[str, list[int]] = {role: [] for role in CONTROL_PLANE}

        def start(role: str, argv: list[str]) -> None:
            command = [sys.executable, "-m", "server.cli", "--log-level", "warning", role, *argv]
            pids[role].append(group.start(command, env))

        common = [*flags, "--data-dir", str(logs / "data")]
        account = f"127.0.0.1:{free_port()}"
        start("account", ["--listen", account, *common, *amqp])
        networks = [f"127.0.0.1:{free_port()}" for _ in range(topology.networks)]
        for index, network in enumerate(networks):
            replica = ["--replica-id", f"net-{index}"] if topology.shared else []
            start("network", ["--listen", network, "--account", account, *common, *replica])
        for address in (account, *networks):
            await _wait_until(group, partial(accepts, address), f"a server to listen at {address}")

        async with channels.insecure_channel(account) as channel:
            service = bearer_metadata(service_token)
            node_token = await create_node_token(channel, service)
            api_key = await create_customer_key(channel, service)
        agent: ServerProcess = await asyncio.to_thread(
            start_side, "agent", tokens, networks[topology.node_on], node_token
        )
        stack.callback(agent.stop)

        gateways = []
        for _ in range(topology.pairs):
            cloud, gateway_port = f"127.0.0.1:{free_port()}", free_port()
            upstream = ["--account", account, "--network", networks[topology.cloud_network]]
            start("cloud", ["--listen", cloud, *upstream, *common, *amqp])
            await _wait_until(group, partial(accepts, cloud), f"cloud to listen at {cloud}")
            start("gateway", ["--cloud", cloud, "--port", str(gateway_port)])
            gateways.append(f"http://127.0.0.1:{gateway_port}")
        for gateway in gateways:
            await _wait_until(group, partial(_serving, gateway), f"{gateway} to serve the model")
        roles = {role: [psutil.Process(pid) for pid in started] for role, started in pids.items()}
        yield Deployment(
            topology,
            gateways,
            api_key,
            urlsplit(dsn).path.lstrip("/"),
            {**roles, "agent": [agent.psutil_process]},
            frozenset(services),
        )
