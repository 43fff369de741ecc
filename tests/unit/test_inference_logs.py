"""Inference logs against in-memory ports: written only for accounts (and subclouds)
that opted in, whole, however the request ends; off the request's path, so a full
queue or a failing store drops logs and never a request; deleted after retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from core.errors import InvalidArgument, JobFailed, NoCapacity
from core.inference import (
    CatalogModel,
    ChatMessage,
    ChatRole,
    FinishReason,
    JobAssigned,
    JobDelta,
    ModelPrice,
    Usage,
)
from core.prometheus import PrometheusMetrics
from server.cloud.inference import InferenceService
from server.cloud.inference_logs import (
    SWEEP_BATCH,
    InferenceLog,
    InferenceLogWriter,
    LogCapture,
    LogSweeper,
)
from server.cloud.inflight import InFlightLeases
from server.cloud.metrics import CloudMetrics
from server.cloud.pricing import cost
from server.cloud.requests import (
    ChatRequest,
    ChoiceFinished,
    ChoiceStarted,
    CompletionStarted,
    ContentDelta,
    ToolCallDelta,
)
from server.cloud.settler import Settler
from server.common.inference_logging import (
    DEFAULT_RETENTION_DAYS,
    LOGGING_OFF,
    InferenceLogging,
    log_retention,
    validate_logging,
)
from server.common.settlement_queue import InProcessSettlementQueue
from tests.doubles.cloud_ports import (
    STALL,
    FakeAccount,
    FakeNetwork,
    InMemoryInferenceLogs,
    InMemoryInFlight,
    completion,
)
from tests.harness import eventually

PRICE = ModelPrice(prompt=2, completion=5)
MODEL = CatalogModel("m", "resultity", PRICE, 1024, chat_template_overhead_tokens=10, ready_nodes=1)
WEEK = InferenceLogging(enabled=True, retention_days=7)
OPTED_IN = "Bearer sk-opted-in"
NOT_OPTED_IN = "Bearer sk-not-opted-in"


def _chat(n: int = 1) -> ChatRequest:
    return ChatRequest(
        model="m", messages=(ChatMessage(ChatRole.USER, "hello there"),), max_tokens=16, n=n
    )


class Cloud:
    """An InferenceService whose logs go through a writer into an in-memory store."""

    def __init__(self, *, capacity: int = 100, start_writer: bool = True) -> None:
        self.account = FakeAccount()
        self.opted_in = self.account.add_customer("sk-opted-in", 1_000_000, WEEK)
        self.account.add_customer("sk-not-opted-in", 1_000_000)
        self.network = FakeNetwork([MODEL])
        self.store = InMemoryInferenceLogs()
        self.registry = CollectorRegistry()
        self.writer = InferenceLogWriter(
            self.store,
            capacity=capacity,
            metrics=CloudMetrics(PrometheusMetrics(self.registry)),
        )
        if start_writer:
            self.writer.start()
        self.service = InferenceService(
            self.account,
            self.network,
            settlements=Settler(self.account, InProcessSettlementQueue()),
            inflight=InFlightLeases(InMemoryInFlight(), lease_s=60),
            logs=self.writer,
        )

    def dropped(self, reason: str) -> float:
        """The count of ``resultity_inference_logs_dropped_total`` for ``reason``."""
        value = self.registry.get_sample_value(
            "resultity_inference_logs_dropped_total", {"reason": reason}
        )
        return value or 0.0

    async def logs(self) -> list[InferenceLog]:
        """Every log stored, once what was queued is written."""
        await self.writer.close(timeout_s=10)
        return list(self.store.entries.values())


@pytest.fixture
async def cloud() -> Cloud:
    return Cloud()


def test_a_request_is_logged_only_with_its_accounts_and_its_subclouds_consent() -> None:
    month = InferenceLogging(enabled=True, retention_days=30)
    off_with_long_retention = InferenceLogging(enabled=False, retention_days=365)
    assert log_retention(LOGGING_OFF, None) is None
    assert log_retention(off_with_long_retention, month) is None
    assert log_retention(WEEK, None) == timedelta(days=7)
    # A subcloud's key: the subcloud must opt in too, and the shorter retention wins.
    assert log_retention(WEEK, LOGGING_OFF) is None
    assert log_retention(WEEK, month) == timedelta(days=7)
    assert log_retention(month, WEEK) == timedelta(days=7)
    # The subcloud's consent alone logs nobody.
    assert log_retention(LOGGING_OFF, month) is None


def test_retention_is_one_day_to_a_year_and_zero_means_the_default() -> None:
    assert validate_logging(InferenceLogging(True, 0)).retention_days == DEFAULT_RETENTION_DAYS
    assert validate_logging(InferenceLogging(True, 365)).retention_days == 365
    for days in (-1, 366):
        with pytest.raises(InvalidArgument) as refused:
            validate_logging(InferenceLogging(True, days))
        assert refused.value.metadata == {"field": "inference_logging.retention_days"}


async def test_an_opted_in_accounts_request_is_logged_whole(cloud: Cloud) -> None:
    cloud.network.scripts.extend(
        [completion(["Hi", "!"], prompt_tokens=7), completion(["Yo"], prompt_tokens=7)]
    )
    done = await cloud.service.complete(OPTED_IN, _chat(n=2), "req-1")

    [entry] = await cloud.logs()
    job_ids = tuple(job.job_id for job in cloud.network.jobs)
    assert (entry.log_id, entry.job_ids) == (job_ids[0], job_ids)
    assert (entry.request_id, entry.account_id, entry.subcloud_id, entry.model) == (
        "req-1",
        cloud.opted_in.account_id,
        "",
        "m",
    )
    assert entry.expires_at - entry.created_at == timedelta(days=7)
    assert entry.request["endpoint"] == "chat.completions"
    [message] = entry.request["messages"]
    assert (message["role"], message["content"]) == ("user", "hello there")
    assert (entry.request["max_tokens"], entry.request["n"]) == (16, 2)
    response = entry.response
    assert (response["id"], response["status"]) == (done.started.completion_id, "completed")
    assert [(c["index"], c["text"], c["finish_reason"]) for c in response["choices"]] == [
        (0, "Hi!", "stop"),
        (1, "Yo", "stop"),
    ]
    assert response["usage"] == {"prompt_tokens": 14, "completion_tokens": 3}
    assert response["charged_micro_credits"] == cost(PRICE, Usage(14, 3))


async def test_nothing_is_logged_for_an_account_that_did_not_opt_in(cloud: Cloud) -> None:
    cloud.network.scripts.append(completion(["Hi"], prompt_tokens=7))
    await cloud.service.complete(NOT_OPTED_IN, _chat(), "req-1")
    assert await cloud.logs() == []
    assert cloud.store.writes == 0
    assert cloud.writer.dropped == 0


async def test_a_failed_request_is_logged_with_its_error_and_one_that_never_ran_is_not(
    cloud: Cloud,
) -> None:
    cloud.network.scripts.append(
        [JobAssigned("node-1"), JobDelta("Hi", 1, 7), JobFailed("the node crashed")]
    )
    with pytest.raises(JobFailed):
        await cloud.service.complete(OPTED_IN, _chat(), "req-failed")
    # No node took it: no job, so no record any log could be read through.
    cloud.network.scripts.append([NoCapacity("no node is free")])
    with pytest.raises(NoCapacity):
        await cloud.service.complete(OPTED_IN, _chat(), "req-never-ran")

    [entry] = await cloud.logs()
    assert entry.request_id == "req-failed"
    assert entry.response["status"] == "failed"
    assert entry.response["error"] == {"reason": "JOB_FAILED", "message": "the node crashed"}
    assert entry.response["choices"] == [{"index": 0, "finish_reason": None, "text": "Hi"}]


async def test_a_client_that_leaves_mid_stream_leaves_a_cancelled_log(cloud: Cloud) -> None:
    cloud.network.scripts.append([JobAssigned("node-1"), JobDelta("Hi", 1, 7), STALL])
    stream = cloud.service.stream(OPTED_IN, _chat(), "req-left")
    async for event in stream:
        if isinstance(event, ContentDelta):
            break
    await stream.aclose()

    [entry] = await cloud.logs()
    assert entry.response["status"] == "cancelled"
    assert entry.response["choices"][0]["text"] == "Hi"
    assert "usage" not in entry.response


async def test_a_full_queue_drops_logs_and_no_request_waits_for_it() -> None:
    # The writer never runs: the queue fills and stays full.
    cloud = Cloud(capacity=1, start_writer=False)
    for request_id in ("req-1", "req-2", "req-3"):
        cloud.network.scripts.append(completion(["Hi"], prompt_tokens=7))
        done = await cloud.service.complete(OPTED_IN, _chat(), request_id)
        assert done.choices[0].content == "Hi"
    assert cloud.writer.dropped == cloud.dropped("queue_full") == 2


async def test_a_failing_store_drops_logs_and_the_requests_succeed(cloud: Cloud) -> None:
    cloud.store.failing = True
    cloud.network.scripts.append(completion(["Hi"], prompt_tokens=7))
    done = await cloud.service.complete(OPTED_IN, _chat(), "req-lost")
    assert done.choices[0].content == "Hi"
    await eventually(lambda: cloud.dropped("store_failed") == 1)
    # The writer goes on once the store is back.
    cloud.store.failing = False
    cloud.network.scripts.append(completion(["Yo"], prompt_tokens=7))
    await cloud.service.complete(OPTED_IN, _chat(), "req-kept")
    assert [entry.request_id for entry in await cloud.logs()] == ["req-kept"]
    assert cloud.registry.get_sample_value("resultity_inference_logs_written_total") == 1


async def test_the_sweeper_deletes_the_logs_whose_retention_ended() -> None:
    store = InMemoryInferenceLogs()
    now = datetime(2026, 6, 1, tzinfo=UTC)

    def entry(log_id: str, expires_at: datetime) -> InferenceLog:
        return InferenceLog(
            log_id, "req", "acct", "", (log_id,), "m", now - timedelta(days=30), expires_at, {}, {}
        )

    expired = [entry(f"old-{i}", now - timedelta(seconds=i)) for i in range(SWEEP_BATCH + 5)]
    await store.add([*expired, entry("fresh", now + timedelta(seconds=1))])

    assert await LogSweeper(store, clock=lambda: now).sweep() == SWEEP_BATCH + 5
    assert list(store.entries) == ["fresh"]
    assert await LogSweeper(store, clock=lambda: now + timedelta(days=1)).sweep() == 1
    assert store.entries == {}


def test_tool_calls_are_logged_whole_with_the_choice() -> None:
    capture = LogCapture(
        "chat.completions",
        _chat(),
        request_id="req-1",
        account_id="acct",
        subcloud_id="",
        retention=timedelta(days=1),
    )
    started = CompletionStarted("chatcmpl-j1", "m", datetime(2026, 1, 1, tzinfo=UTC), None, ("j1",))
    for event in (
        started,
        ChoiceStarted(0),
        ToolCallDelta(0, 0, id="call_1", name="get_weather"),
        ToolCallDelta(0, 0, arguments='{"city": '),
        ToolCallDelta(0, 0, arguments='"Oslo"}'),
        ToolCallDelta(0, 1, id="call_2", name="get_time", arguments="{}"),
        ChoiceFinished(0, FinishReason.TOOL_CALLS),
    ):
        capture.see(event)
    entry = capture.entry(None)
    assert entry is not None
    [choice] = entry.response["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["tool_calls"] == [
        {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"id": "call_2", "name": "get_time", "arguments": "{}"},
    ]
