"""One request's trace crosses the gateway, cloud, network and agent processes.

Each service runs as its own process (`resultity account|network|cloud|gateway`
and an agent process with the scripted runtime), exporting spans over OTLP to
a collector in the test. The request arrives with a W3C `traceparent`, so its
trace id is known: every process's spans of the request carry it, each one's
first span is a child of a span of the process that called it, and the spans
carry the GenAI attributes of the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc

from core.metadata import bearer_metadata
from server.secrets import service_token
from tests.harness import free_port
from tests.otlp_collector import OtlpCollector, ReceivedSpan

MODEL = "smollm2-135m-instruct"
# The span each process opens for the request (its others are children of it).
FIRST_SPANS = {
    ("resultity-gateway", "POST /v1/chat/completions"),
    ("resultity-cloud", "/resultity.cloud.v1.InferenceService/CreateChatCompletion"),
    ("resultity-network", "/resultity.network.v1.DispatchService/RunJob"),
    ("resultity-agent", f"chat {MODEL}"),
}
# The calls from one process to the next (client spans).
CALLS = {
    ("resultity-gateway", "/resultity.cloud.v1.InferenceService/CreateChatCompletion"),
    ("resultity-cloud", "/resultity.network.v1.DispatchService/RunJob"),
}


class Processes:
    def __init__(self, environ: dict[str, str]) -> None:
        self._environ = environ
        self._started: list[asyncio.subprocess.Process] = []

    async def start(self, *argv: str) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *argv, env=self._environ, stdout=asyncio.subprocess.DEVNULL
        )
        self._started.append(process)

    def alive(self) -> bool:
        return all(process.returncode is None for process in self._started)

    async def stop(self) -> None:
        for process in reversed(self._started):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self._started:
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


@pytest.fixture
async def collector() -> AsyncIterator[OtlpCollector]:
    collector = OtlpCollector()
    await collector.start()
    try:
        yield collector
    finally:
        await collector.stop()


@contextlib.asynccontextmanager
async def platform_processes(
    dsn: str, data_dir: Path, collector: OtlpCollector
) -> AsyncIterator[tuple[str, str]]:
    """The services as processes; yields the gateway's URL and the account target."""
    environ = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        # Spans go out within 100 ms of ending rather than 5 s.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "RESULTITY_DATABASE_URL": dsn,
        "RESULTITY_REDIS_URL": "",
        "RESULTITY_AMQP_URL": "",
    }
    account, network, cloud = (f"127.0.0.1:{free_port()}" for _ in range(3))
    http_port = free_port()
    processes = Processes(environ)
    cli = ("-m", "server.cli")
    common = ("--data-dir", str(data_dir))
    try:
        # The account server creates the service token the others read.
        await processes.start(*cli, "account", "--listen", account, *common)
        await _wait_for_file(data_dir / "service-token", processes)
        await processes.start(*cli, "network", "--listen", network, *common)
        await processes.start(
            *cli, "cloud", "--listen", cloud, "--account", account, "--network", network, *common
        )
        await processes.start(*cli, "gateway", "--cloud", cloud, "--port", str(http_port))
        await processes.start(
            "-m", "tests.doubles.scripted_agent", "--network", network, "--name", "traced",
            "--answer-canaries",
        )  # fmt: skip
        gateway = f"http://127.0.0.1:{http_port}"
        await _wait_until_ready(gateway, processes)
        yield gateway, account
    finally:
        await processes.stop()


async def _wait_for_file(path: Path, processes: Processes) -> None:
    async with asyncio.timeout(120):
        while not await asyncio.to_thread(path.exists):
            assert processes.alive(), "a service exited during start-up"
            await asyncio.sleep(0.2)


async def _wait_until_ready(gateway: str, processes: Processes) -> None:
    """Until the gateway answers /ready: cloud serves and the agent passed validation."""
    async with httpx.AsyncClient(base_url=gateway) as http, asyncio.timeout(180):
        while True:
            assert processes.alive(), "a service exited during start-up"
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.3)


async def _customer_key(account: str, data_dir: Path) -> str:
    metadata = bearer_metadata(service_token(data_dir))
    async with grpc.aio.insecure_channel(account) as channel:
        created = await account_grpc.AccountServiceStub(channel).CreateAccount(
            account_pb.CreateAccountRequest(name="traced customer"), metadata=metadata
        )
        account_id = created.account.account_id
        await ledger_grpc.LedgerServiceStub(channel).TopUp(
            ledger_pb.TopUpRequest(
                account_id=account_id, amount_micro_credits=10_000_000, idempotency_key=account_id
            ),
            metadata=metadata,
        )
        issued = await keys_grpc.ApiKeyServiceStub(channel).CreateApiKey(
            keys_pb.CreateApiKeyRequest(
                account_id=account_id, scopes=[keys_pb.API_KEY_SCOPE_INFERENCE]
            ),
            metadata=metadata,
        )
    return issued.secret


def _first_of(spans: list[ReceivedSpan], service: str) -> ReceivedSpan:
    """The service's span whose parent is not one of the service's own."""
    own = {span.span_id for span in spans if span.service == service}
    [first] = [s for s in spans if s.service == service and s.parent_span_id not in own]
    return first


def _service_of(spans: list[ReceivedSpan], span_id: str) -> str:
    [parent] = [span for span in spans if span.span_id == span_id]
    return parent.service


async def test_one_request_is_one_trace_across_the_four_processes(
    postgres_dsn: str, tmp_path: Path, collector: OtlpCollector
) -> None:
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    async with platform_processes(postgres_dsn, tmp_path, collector) as (gateway, account):
        key = await _customer_key(account, tmp_path)
        async with httpx.AsyncClient(base_url=gateway, timeout=60) as http:
            answer = await http.post(
                "/v1/chat/completions",
                headers={
                    "authorization": f"Bearer {key}",
                    "traceparent": f"00-{trace_id}-{caller_span}-01",
                },
                json={"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]},
            )
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        spans = await collector.wait_for(trace_id, FIRST_SPANS | CALLS)

    # Each process's part of the trace hangs under the process that called it.
    for service, name in FIRST_SPANS:
        assert _first_of(spans, service).name == name
    gateway_root = _first_of(spans, "resultity-gateway")
    assert gateway_root.parent_span_id == caller_span
    for service, caller in (
        ("resultity-cloud", "resultity-gateway"),
        ("resultity-network", "resultity-cloud"),
        ("resultity-agent", "resultity-network"),
    ):
        first = _first_of(spans, service)
        assert _service_of(spans, first.parent_span_id) == caller, (service, first)

    # GenAI attributes: the request at the gateway, usage where it is known.
    assert gateway_root.attributes["gen_ai.request.model"] == MODEL
    assert gateway_root.attributes["gen_ai.operation.name"] == "chat"
    cloud = _first_of(spans, "resultity-cloud")
    assert cloud.attributes["gen_ai.response.model"] == MODEL
    assert cloud.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert cloud.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    network = _first_of(spans, "resultity-network")
    assert network.attributes["gen_ai.request.model"] == MODEL
    agent = _first_of(spans, "resultity-agent")
    assert agent.attributes["resultity.node.id"] == network.attributes["resultity.node.id"]
    assert agent.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert agent.attributes["gen_ai.response.finish_reasons"] == ("stop",)

    # The network's own jobs (join benchmark, canaries) carry a decoy: a trace
    # context of the same form, of a trace no other process has a span in.
    probes = [
        s for s in collector.spans if s.service == "resultity-agent" and s.trace_id != trace_id
    ]
    assert probes
    exported = {span.span_id for span in collector.spans}
    for probe in probes:
        assert probe.parent_span_id
        assert probe.parent_span_id not in exported
        assert {span.service for span in collector.trace(probe.trace_id)} == {"resultity-agent"}
