"""`python -m bench.network`: heartbeat ingestion and failover recovery of the network server.

The network server (NetworkComponent on a gRPC server, validation off, no
account target so node tokens are not checked) runs in a spawned child
process, so its CPU time is read apart from the load (psutil).

1. *Heartbeat ingestion.* Simulated agents are raw ``grpc.aio`` Connect streams
   in this process, each on its own TCP connection, each a node with its own
   Ed25519 key that completes the real handshake (challenge, signed hello,
   welcome) and then only heartbeats. Saturation: ``--saturate-streams``
   streams write heartbeats back to back; the server counts what it ingests.
   Fleet: ``--agents`` connected agents, first idle, then heartbeating at the
   network's interval (5 s by default) with random phases; server CPU seconds
   per second, per 1,000 agents.
2. *Failover recovery.* Two AgentSessions (default token batching) serve the
   model with a runtime that yields a token every 5 ms (bench/paced_runtime.py).
   A client streams a job through DispatchService.RunJob; after ``--kill-after``
   tokens the serving agent's session task is cancelled (its stream dies) and
   the time until the client's next token is measured. The killed agent is
   replaced by a fresh one before the next repetition.

Method and results: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Protocol, cast

import grpc
import psutil
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.agent.v1 import agent_service_pb2_grpc as agent_grpc
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from agent.identity import NodeIdentity, signed_hello
from agent.session import AGENT_VERSION, AgentSession, SessionSettings
from bench.machine_load import MARKS, LoadSample, MachineLoad, cell
from bench.paced_runtime import MODEL_ID, PacedRuntime, token_text
from bench.scratch_database import scratch_database
from core import channels, event_loop
from core.convert.generation import spec_to_pb
from core.inference import ChatMessage, ChatRole, GenerationSpec, Sampling
from core.logging import configure_logging
from core.metadata import bearer_metadata
from server.common.credentials import generate_service_token
from server.network.component import NetworkComponent
from server.network.service import FailoverSettings, LivenessSettings, ValidationSettings

START_TIMEOUT_S = 60.0
CONNECT_BATCH = 50  # handshakes in flight at once while building the fleet

# --- the network server (spawned child process) -------------------------------


async def _serve(conn: Connection, service_token: str) -> None:
    async with scratch_database() as dsn:
        await _serve_on(conn, service_token, dsn)


async def _serve_on(conn: Connection, service_token: str, dsn: str) -> None:
    network = NetworkComponent(
        validation=ValidationSettings(enabled=False),
        service_token=service_token,
        database_url=dsn,
    )
    await network.start()
    ingested = 0
    beat = network.service.heartbeat

    def counting_heartbeat(*args: object, **kwargs: object) -> None:
        nonlocal ingested
        ingested += 1
        beat(*args, **kwargs)  # type: ignore[arg-type]

    # An instance attribute: the servicer's calls go through the counter.
    network.service.heartbeat = counting_heartbeat  # type: ignore[method-assign]
    server = channels.server()
    network.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(f"127.0.0.1:{port}")
    try:
        while (command := await asyncio.to_thread(conn.recv)) != "stop":
            if command == "count":
                conn.send((ingested, len(network.service.nodes())))
    finally:
        await network.stop()
        await server.stop(1.0)


def _server_main(conn: Connection, service_token: str) -> None:
    configure_logging("warning")
    event_loop.run(_serve(conn, service_token))  # the loop the network server runs on


@dataclass
class NetworkProcess:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    target: str
    # What the dispatch API's callers present.
    service_token: str

    def counts(self) -> tuple[int, int]:
        """Heartbeats ingested so far and nodes connected."""
        self.conn.send("count")
        ingested, nodes = self.conn.recv()
        return int(ingested), int(nodes)

    def cpu_s(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send("stop")
        self.process.join(15)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


def _start_network() -> NetworkProcess:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    token = generate_service_token()
    process = context.Process(target=_server_main, args=(child, token), name="bench-network")
    process.daemon = True
    process.start()
    if not parent.poll(START_TIMEOUT_S):
        process.terminate()
        raise RuntimeError("the network server did not start")
    return NetworkProcess(process, parent, str(parent.recv()), token)


# --- raw agents ----------------------------------------------------------------

HEARTBEAT = agent_pb.ConnectRequest(
    heartbeat=agent_pb.Heartbeat(
        active_jobs=0, queued_jobs=0, recent_tokens_per_second=0.0, free_memory_bytes=8 << 30
    )
)


class _Duplex(Protocol):
    """The read/write side of a grpc.aio stream-stream call (not in the type stubs)."""

    async def read(self) -> object: ...

    async def write(self, request: agent_pb.ConnectRequest) -> None: ...

    def cancel(self) -> bool: ...


_EOF = vars(grpc.aio)["EOF"]  # what read() returns once the stream has ended


def _response(message: object, expected: str) -> agent_pb.ConnectResponse:
    if not isinstance(message, agent_pb.ConnectResponse) or (
        message.WhichOneof("message") != expected
    ):
        raise RuntimeError(f"expected a {expected}, got {message!r}")
    return message


class RawAgent:
    """One node's Connect stream, without the agent's runtime or job handling."""

    def __init__(self, target: str, index: int) -> None:
        # A connection of its own, as separate agent hosts have.
        self._channel = grpc.aio.insecure_channel(
            target, options=[*channels.CLIENT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        )
        self._index = index
        self._identity = NodeIdentity.generate()
        connect = cast(Callable[[], _Duplex], agent_grpc.AgentServiceStub(self._channel).Connect)
        self._call = connect()
        self._reader: asyncio.Task[None] | None = None
        self.interval_s = 0.0

    async def connect(self) -> None:
        challenge = _response(await self._call.read(), "challenge")
        hello = agent_pb.Hello(
            node_name=f"bench-{self._index}",
            agent_version=AGENT_VERSION,
            models=[agent_pb.ServedModel(model=MODEL_ID, runtime="bench", context_length=2048)],
            max_concurrent_jobs=1,
        )
        await self._call.write(signed_hello(self._identity, hello, challenge.challenge, ""))
        welcome = _response(await self._call.read(), "welcome")
        self.interval_s = welcome.welcome.heartbeat_interval.ToNanoseconds() / 1e9
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        """Drains what the network sends (its configuration) so the stream never blocks."""
        while await self._call.read() is not _EOF:
            pass

    async def beat(self) -> None:
        await self._call.write(HEARTBEAT)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._call.cancel()
        await self._channel.close(grace=None)


async def _connect_fleet(target: str, size: int) -> list[RawAgent]:
    agents = [RawAgent(target, index) for index in range(size)]
    for start in range(0, size, CONNECT_BATCH):
        await asyncio.gather(*(agent.connect() for agent in agents[start : start + CONNECT_BATCH]))
    return agents


async def _close_all(agents: Sequence[RawAgent]) -> None:
    await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)


async def _settle(network: NetworkProcess, expected_nodes: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while network.counts()[1] != expected_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the network did not reach {expected_nodes} nodes")
        await asyncio.sleep(0.1)


@dataclass(frozen=True)
class Saturation:
    streams: int
    seconds: float
    heartbeats_per_s: float
    server_cores: float  # CPU seconds per second
    bench_cores: float
    load: LoadSample

    @property
    def server_us_per_heartbeat(self) -> float:
        return self.server_cores / self.heartbeats_per_s * 1e6


async def saturate(
    network: NetworkProcess, streams: int, seconds: float, rounds: int, load: MachineLoad
) -> list[Saturation]:
    """``rounds`` windows of ``seconds`` each, back to back."""
    agents = await _connect_fleet(network.target, streams)
    measured = []
    try:
        await _settle(network, streams)
        stop = asyncio.Event()

        async def pump(agent: RawAgent) -> None:
            while not stop.is_set():
                await agent.beat()

        pumps = [asyncio.create_task(pump(agent)) for agent in agents]
        await asyncio.sleep(0.5)  # warm-up, not measured
        bench = psutil.Process()
        for round_ in range(rounds):
            beats0, _ = network.counts()
            cpu0, bench0, t0 = network.cpu_s(), bench.cpu_times(), time.perf_counter()
            began = load.start()
            await asyncio.sleep(seconds)
            beats1, _ = network.counts()
            cpu1, bench1, t1 = network.cpu_s(), bench.cpu_times(), time.perf_counter()
            sample = load.stop(began, f"saturation r{round_ + 1}")
            elapsed = t1 - t0
            bench_s = (bench1.user + bench1.system) - (bench0.user + bench0.system)
            measured.append(
                Saturation(
                    streams,
                    elapsed,
                    (beats1 - beats0) / elapsed,
                    (cpu1 - cpu0) / elapsed,
                    bench_s / elapsed,
                    sample,
                )
            )
        stop.set()
        await asyncio.gather(*pumps, return_exceptions=True)
    finally:
        await _close_all(agents)
    return measured


@dataclass(frozen=True)
class Fleet:
    agents: int
    connect_s: float
    interval_s: float
    idle_cores: float
    idle_load: LoadSample
    beating_cores: list[float]  # per round
    heartbeats_per_s: list[float]
    beating_loads: list[LoadSample]


async def fleet(
    network: NetworkProcess, size: int, idle_s: float, beat_s: float, load: MachineLoad
) -> Fleet:
    """The heartbeating phase is measured in windows of one heartbeat interval."""
    began = time.perf_counter()
    agents = await _connect_fleet(network.target, size)
    try:
        await _settle(network, size)
        connect_s = time.perf_counter() - began
        await asyncio.sleep(1.0)  # configuration messages and their acks settle
        cpu0, t0 = network.cpu_s(), time.perf_counter()
        window = load.start()
        await asyncio.sleep(idle_s)
        idle = (network.cpu_s() - cpu0) / (time.perf_counter() - t0)
        idle_load = load.stop(window, "fleet idle")

        interval = agents[0].interval_s
        rng = random.Random(1)
        stop = asyncio.Event()

        async def heartbeat(agent: RawAgent, phase: float) -> None:
            await asyncio.sleep(phase)
            while not stop.is_set():
                await agent.beat()
                await asyncio.sleep(interval)

        beaters = [
            asyncio.create_task(heartbeat(agent, rng.uniform(0, interval))) for agent in agents
        ]
        beating, rates, loads = [], [], []
        for round_ in range(max(1, round(beat_s / interval))):
            beats0, _ = network.counts()
            cpu0, t0 = network.cpu_s(), time.perf_counter()
            window = load.start()
            await asyncio.sleep(interval)
            beats1, _ = network.counts()
            elapsed = time.perf_counter() - t0
            beating.append((network.cpu_s() - cpu0) / elapsed)
            rates.append((beats1 - beats0) / elapsed)
            loads.append(load.stop(window, f"fleet heartbeating r{round_ + 1}"))
        stop.set()
        for task in beaters:
            task.cancel()
        await asyncio.gather(*beaters, return_exceptions=True)
    finally:
        await _close_all(agents)
    return Fleet(size, connect_s, interval, idle, idle_load, beating, rates, loads)


# --- failover ------------------------------------------------------------------


@dataclass
class PacedAgent:
    session: AgentSession
    task: asyncio.Task[None]

    @classmethod
    async def start(cls, target: str, name: str, interval_s: float) -> PacedAgent:
        session = AgentSession(
            SessionSettings(network=target, node_name=name), PacedRuntime(interval_s)
        )
        task = asyncio.create_task(session.run_forever())
        async with asyncio.timeout(10):
            await session.connected.wait()
        return cls(session, task)

    async def kill(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def _wait_nodes(network: NetworkProcess, count: int) -> None:
    await _settle(network, count)


async def failover(
    network: NetworkProcess,
    runs: int,
    tokens: int,
    kill_after: int,
    interval_s: float,
    load: MachineLoad,
) -> list[tuple[float, LoadSample]]:
    """Seconds from killing the serving agent to the client's next token, per run, and
    the machine's load during the run."""
    agents = [
        await PacedAgent.start(network.target, f"paced-{index}", interval_s) for index in range(2)
    ]
    await _wait_nodes(network, 2)
    spec = GenerationSpec(
        model=MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, "count"),),
        sampling=Sampling(max_tokens=tokens),
        max_prompt_tokens=1024,
    )
    expected = "".join(token_text(index) for index in range(tokens))
    recoveries: list[tuple[float, LoadSample]] = []
    async with channels.insecure_channel(network.target) as channel:
        stub = dispatch_grpc.DispatchServiceStub(channel)
        for run in range(runs):
            await asyncio.to_thread(load.wait_for_quiet)
            began = load.start()
            call = stub.RunJob(
                dispatch_pb.RunJobRequest(job_id=f"bench-failover-{run}", spec=spec_to_pb(spec)),
                metadata=bearer_metadata(network.service_token),
            )
            serving = ""
            received, text = 0, ""
            killed_at: float | None = None
            recovery: float | None = None
            migrated = False
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "assigned":
                    serving = event.assigned.node_id
                elif kind == "migrated":
                    migrated = True
                elif kind == "delta":
                    now = time.perf_counter()
                    if killed_at is not None and recovery is None:
                        recovery = now - killed_at
                    received += event.delta.token_count
                    text += event.delta.text
                    if killed_at is None and received >= kill_after:
                        victim = next(a for a in agents if a.session.node_id == serving)
                        killed_at = time.perf_counter()
                        await victim.kill()
                        agents.remove(victim)
            if text != expected or not migrated or recovery is None:
                raise RuntimeError(f"run {run}: no clean failover (migrated={migrated})")
            recoveries.append((recovery, load.stop(began, f"failover r{run + 1}")))
            agents.append(await PacedAgent.start(network.target, f"paced-r{run}", interval_s))
            await _wait_nodes(network, 2)
    for agent in agents:
        await agent.kill()
    return recoveries


# --- report ----------------------------------------------------------------------


def _percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def _run(args: argparse.Namespace) -> None:
    load = MachineLoad()  # the network server is this process's child
    network = _start_network()
    try:
        rounds = await saturate(
            network, args.saturate_streams, args.saturate_seconds, args.rounds, load
        )
        loads = [r.load for r in rounds]
        print(
            f"saturation, {args.saturate_streams} streams back to back, {len(rounds)} rounds "
            f"of {args.saturate_seconds:g} s: "
            f"{cell([r.heartbeats_per_s for r in rounds], loads, '{:,.0f}')} heartbeats/s "
            f"ingested; server {cell([r.server_cores for r in rounds], loads, '{:.2f}')} cores "
            f"({cell([r.server_us_per_heartbeat for r in rounds], loads, '{:.1f}')} µs CPU per "
            f"heartbeat), load generator {cell([r.bench_cores for r in rounds], loads, '{:.2f}')}"
            " cores",
            flush=True,
        )
        fl = await fleet(network, args.agents, args.idle_seconds, args.beat_seconds, load)
        per_k = 1000 / fl.agents
        beating = [cores * per_k * 1000 for cores in fl.beating_cores]
        print(
            f"fleet of {fl.agents} agents (handshakes took {fl.connect_s:.1f} s): server CPU "
            f"idle {cell([fl.idle_cores * per_k * 1000], [fl.idle_load], '{:.1f}')} ms/s per "
            f"1,000 agents; heartbeating every {fl.interval_s:g} s "
            f"({cell(fl.heartbeats_per_s, fl.beating_loads, '{:,.0f}')}/s, "
            f"{len(beating)} rounds of one interval) "
            f"{cell(beating, fl.beating_loads, '{:.1f}')} ms/s per 1,000 agents",
            flush=True,
        )
    finally:
        network.stop()
    network = _start_network()
    try:
        runs = await failover(
            network, args.failover_runs, args.tokens, args.kill_after, args.token_interval, load
        )
    finally:
        network.stop()
    ms = [r * 1000 for r, _ in runs]
    print(
        f"failover, {len(ms)} runs (agent killed after {args.kill_after} of {args.tokens} "
        f"tokens, a token every {args.token_interval * 1000:g} ms): kill → next token "
        f"p50 {_percentile(ms, 50):.1f} ms, p99 {_percentile(ms, 99):.1f} ms, "
        f"min {min(ms):.1f} ms, max {max(ms):.1f} ms; across runs "
        f"{cell(ms, [sample for _, sample in runs], '{:.1f}')} ms"
    )
    liveness, stall = LivenessSettings(), FailoverSettings()
    print(
        f"a silent node (stream open, nothing sent) is given up after the heartbeat "
        f"timeout {liveness.heartbeat_timeout_s:g} s (no new jobs after "
        f"{liveness.suspect_s:g} s), or its job after the stall timeout "
        f"{stall.stall_timeout_s:g} s; checked every "
        f"{min(liveness.heartbeat_interval_s, liveness.suspect_s) / 2:g} s"
    )
    print(MARKS)
    print(load.summary())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.network", description=__doc__)
    parser.add_argument("--saturate-streams", type=int, default=100)
    parser.add_argument("--saturate-seconds", type=float, default=2.0, help="per round")
    parser.add_argument("--rounds", type=int, default=3, help="of the saturation")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--beat-seconds", type=float, default=10.0)
    parser.add_argument("--failover-runs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--kill-after", type=int, default=20)
    parser.add_argument("--token-interval", type=float, default=0.005)
    args = parser.parse_args(argv)
    configure_logging("warning")
    started = time.perf_counter()
    asyncio.run(_run(args))
    print(f"bench.network took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
