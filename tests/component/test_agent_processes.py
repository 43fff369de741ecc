"""Agent processes under signals: a frozen one is declared dead and its job moves
on; a SIGTERM'd one finishes its job, takes no new one and exits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.network.service import LivenessSettings
from tests.harness import JobStream, NetworkServer, eventually, start_network

REPO = Path(__file__).resolve().parents[2]
SCRIPT = " ".join(f"w{i}" for i in range(100))


class AgentProcesses:
    def __init__(self, target: str) -> None:
        self._target = target
        self.by_name: dict[str, asyncio.subprocess.Process] = {}

    async def spawn(self, name: str, *extra: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.doubles.scripted_agent",
            "--network",
            self._target,
            "--name",
            name,
            "--script",
            SCRIPT,
            "--token-delay",
            "0.02",
            *extra,
            cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.by_name[name] = process
        return process

    async def close(self) -> None:
        for process in self.by_name.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.kill()
                await process.wait()


@pytest.fixture
async def network(postgres_dsn: str) -> AsyncIterator[NetworkServer]:
    server = await start_network(
        postgres_dsn,
        liveness=LivenessSettings(
            heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0, suspect_after_s=0.5
        ),
    )
    yield server
    await server.stop()


@pytest.fixture
async def agents(network: NetworkServer) -> AsyncIterator[AgentProcesses]:
    processes = AgentProcesses(network.target)
    yield processes
    await processes.close()


def _name_of(network: NetworkServer, node_id: str) -> str:
    return network.component.service.node(node_id).hello.name


async def test_frozen_agent_process_is_declared_dead_and_its_job_moves_on(
    network: NetworkServer, agents: AgentProcesses
) -> None:
    for name in ("p0", "p1"):
        await agents.spawn(name)
    service = network.component.service
    await eventually(lambda: len(service.nodes()) == 2, timeout_s=60)

    job = JobStream(network, "job-frozen")
    await eventually(lambda: len(job.of("delta")) >= 5)
    frozen_id = job.of("assigned")[0].assigned.node_id
    frozen = agents.by_name[_name_of(network, frozen_id)]
    os.kill(frozen.pid, signal.SIGSTOP)

    await asyncio.wait_for(job.task, timeout=60)
    assert job.text == SCRIPT
    [migrated] = job.of("migrated")
    assert migrated.migrated.reason == "heartbeat timeout"
    assert migrated.migrated.node_id != frozen_id
    assert frozen_id not in {node.node_id for node in service.nodes()}
    shares = job.of("finished")[0].finished.node_usage
    assert [share.node_id for share in shares] == [frozen_id, migrated.migrated.node_id]
    assert sum(share.usage.completion_tokens for share in shares) == 100


async def test_sigterm_agent_finishes_its_job_and_takes_no_new_one(
    network: NetworkServer, agents: AgentProcesses
) -> None:
    for name in ("p0", "p1"):
        await agents.spawn(name)
    service = network.component.service
    await eventually(lambda: len(service.nodes()) == 2, timeout_s=60)

    first = JobStream(network, "job-draining")
    await eventually(lambda: len(first.of("delta")) >= 3)
    draining_id = first.of("assigned")[0].assigned.node_id
    draining = agents.by_name[_name_of(network, draining_id)]
    draining.send_signal(signal.SIGTERM)
    await eventually(lambda: service.node(draining_id).draining)

    second = JobStream(network, "job-after")
    await asyncio.wait_for(asyncio.gather(first.task, second.task), timeout=60)

    assert first.text == SCRIPT
    assert not first.of("migrated")
    assert second.of("assigned")[0].assigned.node_id != draining_id
    assert await asyncio.wait_for(draining.wait(), timeout=30) == 0
    await eventually(lambda: draining_id not in {node.node_id for node in service.nodes()})
