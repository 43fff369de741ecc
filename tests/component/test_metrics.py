"""Metrics move with traffic, and their label sets stay bounded whatever callers send.

The platform runs in-process as under `resultity up`: every service, the gateway
and an agent count into one Prometheus registry, read here as Prometheus would
read it (the gateway's /metrics).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.telemetry import AgentMetrics
from core.prometheus import PrometheusMetrics
from gateway.app import create_app
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import Customer, Platform, running_platform

CHAT = "/v1/chat/completions"


@dataclass
class Served:
    platform: Platform
    http: httpx.AsyncClient
    customer: Customer
    node_id: str


@pytest.fixture
async def served(postgres_dsn: str) -> AsyncIterator[Served]:
    metrics = PrometheusMetrics()
    async with running_platform(postgres_dsn, metrics=metrics) as platform:
        agent = await platform.start_agent(
            ScriptedRuntime(script="one two three four five"), metrics=AgentMetrics(metrics)
        )
        customer = await platform.customer(credits=50_000_000)
        app = create_app(platform.target, metrics=metrics)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://gateway",
                headers={"authorization": f"Bearer {customer.api_key}"},
            ) as http,
        ):
            assert agent.session.node_id is not None
            yield Served(platform, http, customer, agent.session.node_id)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def _scrape(http: httpx.AsyncClient) -> Samples:
    """Every resultity_ sample of the gateway's /metrics, by name and labels."""
    answer = await http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name.startswith("resultity_"):
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_a_request_moves_the_counters_and_histograms_it_should(served: Served) -> None:
    before = await _scrape(served.http)
    answer = await served.http.post(
        CHAT,
        json={
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "Count"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert answer.status_code == 200
    usage = [line for line in answer.text.splitlines() if '"usage":{' in line][-1]
    after = await _scrape(served.http)

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    model = MODEL_ID
    # The gateway: requests by endpoint, model and status; end-to-end latency.
    assert moved("resultity_http_requests_total", endpoint=CHAT, model=model, status="200") == 1
    assert moved("resultity_http_request_duration_seconds_count", endpoint=CHAT, model=model) == 1
    # Cloud: the request, its latencies and its tokens.
    assert (
        moved(
            "resultity_inference_requests_total",
            operation="chat",
            model=model,
            outcome="completed",
        )
        == 1
    )
    for histogram in (
        "resultity_time_to_first_token_seconds_count",
        "resultity_inter_token_latency_seconds_count",
    ):
        assert moved(histogram, model=model) == 1, histogram
    assert moved("resultity_request_duration_seconds_count", operation="chat", model=model) == 1
    assert f'"completion_tokens":{moved("resultity_completion_tokens_total", model=model):.0f}' in (
        usage
    )
    assert f'"prompt_tokens":{moved("resultity_prompt_tokens_total", model=model):.0f}' in usage
    assert moved("resultity_settlements_total", path="applied") == 1
    # The ledger: one hold taken and settled.
    assert moved("resultity_holds_created_total") == 1
    assert moved("resultity_holds_settled_total") == 1
    # The network: one job finished, one routing decision, a first turn no node caches.
    assert moved("resultity_network_jobs_total", model=model, outcome="finished") == 1
    assert moved("resultity_routing_decision_seconds_count", result="picked") == 1
    assert moved("resultity_routing_affinity_total", model=model, outcome="miss") == 1
    # Every gRPC service's calls: cloud's stream, the ledger's hold, and the job
    # (a message of cloud's RunJobs stream) as the RunJob call it stands for.
    assert (
        moved(
            "resultity_grpc_server_handled_total",
            grpc_service="resultity.cloud.v1.InferenceService",
            grpc_method="StreamChatCompletion",
            grpc_code="OK",
        )
        == 1
    )
    assert (
        moved(
            "resultity_grpc_server_handled_total",
            grpc_service="resultity.account.v1.LedgerService",
            grpc_method="CreateHold",
            grpc_code="OK",
        )
        == 1
    )
    assert (
        moved(
            "resultity_grpc_server_handled_total",
            grpc_service="resultity.network.v1.DispatchService",
            grpc_method="RunJob",
            grpc_code="OK",
        )
        == 1
    )
    # The agent: the job, its tokens.
    assert moved("resultity_agent_jobs_total", model=model, outcome="done") == 1
    assert moved("resultity_agent_generated_tokens_total", model=model) == 5
    assert moved("resultity_agent_time_to_first_token_seconds_count", model=model) == 1
    # The scripted runtime caches nothing: it evaluated the whole prompt.
    prompt_tokens = moved("resultity_agent_prompt_tokens_total", model=model)
    cache = "resultity_agent_prompt_cache_tokens_total"
    assert prompt_tokens > 0
    assert moved(cache, model=model, result="evaluated") == prompt_tokens
    assert moved(cache, model=model, result="reused") == 0
    # Gauges read when scraped: the node and its (now finished) jobs.
    assert _value(after, "resultity_nodes", state="ready", model=model, region="undeclared") == 1
    assert _value(after, "resultity_node_jobs", node=served.node_id, state="active") == 0
    assert _value(after, "resultity_agent_jobs_in_progress", state="active") == 0


async def test_a_refusal_is_counted_by_its_status_without_a_model(
    served: Served,
) -> None:
    before = await _scrape(served.http)
    answer = await served.http.post(
        CHAT,
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}]},
        headers={"authorization": "Bearer rsk_not-a-key"},
    )
    assert answer.status_code == 401
    after = await _scrape(served.http)
    # Cloud refused the key before it resolved the model: no model label.
    labels = {"endpoint": CHAT, "model": "", "status": "401"}
    assert (
        _value(after, "resultity_http_requests_total", **labels)
        - _value(before, "resultity_http_requests_total", **labels)
        == 1
    )


async def test_labels_stay_bounded_whatever_callers_send(served: Served) -> None:
    """Over a thousand distinct models, keys and paths from callers make a few series."""
    hostile = [uuid.uuid4().hex for _ in range(1_200)]

    async def unknown_model(name: str) -> int:
        answer = await served.http.post(
            CHAT, json={"model": name, "messages": [{"role": "user", "content": "x"}]}
        )
        return answer.status_code

    async def unknown_key(secret: str) -> int:
        answer = await served.http.get(
            "/v1/models", headers={"authorization": f"Bearer rsk_{secret}"}
        )
        return answer.status_code

    async def unknown_path(path: str) -> int:
        return (await served.http.get(f"/v1/{path}")).status_code

    for calls in (
        [unknown_model(name) for name in hostile],
        [unknown_key(secret) for secret in hostile[:300]],
        [unknown_path(path) for path in hostile[:300]],
    ):
        for batch in range(0, len(calls), 50):
            statuses = await asyncio.gather(*calls[batch : batch + 50])
            assert set(statuses) <= {401, 404}, statuses

    samples = await _scrape(served.http)
    label_values = {value for _, labels in samples for _, value in labels}
    assert len(samples) < 1_000
    assert not label_values & set(hostile)
    assert not any(value.startswith("rsk_") for value in label_values)
