"""HEAD on the gateway's routes: what the GET of the URL would answer, status and
headers, without the body."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import grpc
import httpx
import pytest
from fastapi import FastAPI
from grpc_health.v1 import health_pb2
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.cloud.v1 import job_service_pb2

from core.errors import DomainError, ModelNotFound, NotFound
from core.grpc_errors import to_status
from core.prometheus import PrometheusMetrics
from gateway.app import MAX_API_KEY_LENGTH, create_app
from gateway.console import ConsoleTargets
from tests.doubles.one_replica import one_replica

_KEY = {"authorization": "Bearer sk-test"}
# Differ between any two answers.
_PER_RESPONSE = ("x-request-id", "x-resultity-overhead-ms")


class _Call:
    """A unary cloud call that has its answer (or its error) already."""

    def __init__(self, answer: object) -> None:
        self._answer = answer

    def __await__(self) -> Generator[Any, None, object]:
        if isinstance(self._answer, DomainError):
            status = to_status(self._answer)
            raise grpc.aio.AioRpcError(
                status.code,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(*status.trailing_metadata),
                details=status.details,
            )
        return self._answer
        yield  # a generator, as __await__ must be

    async def initial_metadata(self) -> tuple[()]:
        return ()

    def cancel(self) -> bool:
        return False


class _Service:
    """A cloud service whose methods answer as ``answers`` says, by method name."""

    def __init__(self, **answers: object) -> None:
        self._answers = answers

    def __getattr__(self, method: str) -> Any:
        return lambda request, **_: _Call(self._answers[method])


def _app() -> FastAPI:
    targets = ConsoleTargets("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1")
    app = create_app("127.0.0.1:1", console=targets, metrics=PrometheusMetrics())
    app.state.cloud = one_replica(
        _Service(
            ListModels=pb.ListModelsResponse(models=[pb.Model(id="m", owned_by="resultity")]),
            GetModel=ModelNotFound("The model 'nope' does not exist."),
        )
    )
    app.state.jobs = one_replica(
        _Service(ListJobs=job_service_pb2.ListJobsResponse(), GetJob=NotFound("No job 'j-1'."))
    )
    app.state.cloud_health = one_replica(
        _Service(
            Check=health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        )
    )
    return app


async def _get_and_head(
    app: FastAPI, path: str, headers: dict[str, str]
) -> tuple[httpx.Response, httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        get = await client.get(path, headers=headers)
        head = await client.head(path, headers=headers)
    return get, head


def _headers(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name not in _PER_RESPONSE}


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/v1/models", {}, 401),
        ("/v1/models", {"authorization": "Bearer " + "k" * (MAX_API_KEY_LENGTH + 1)}, 401),
        ("/v1/models", _KEY, 200),
        ("/v1/models/nope", {}, 401),
        ("/v1/models/nope", _KEY, 404),
        ("/v1/jobs", {}, 401),
        ("/v1/jobs", _KEY, 200),
        ("/v1/jobs?limit=0", _KEY, 400),
        ("/v1/jobs/j-1", _KEY, 404),
        ("/health", {}, 200),
        ("/ready", {}, 200),
        ("/openapi.json", {}, 200),
        ("/console/sign-in", {}, 200),
        ("/console", {}, 303),
        ("/console/usage", {}, 303),
        ("/console/keys", {}, 303),
        ("/console/static/console.css", {}, 200),
        ("/console/static/nope.css", {}, 404),
        ("/no/such/route", {}, 404),
        ("/v1/chat/completions", _KEY, 405),
    ],
)
async def test_head_answers_as_the_get_without_its_body(
    path: str, headers: dict[str, str], status: int
) -> None:
    get, head = await _get_and_head(_app(), path, headers)

    assert get.status_code == status
    assert head.status_code == status
    assert _headers(head) == _headers(get)
    assert head.content == b""


async def test_head_of_metrics_answers_as_the_get() -> None:
    # Each request adds to the metrics, so the two bodies' lengths differ.
    get, head = await _get_and_head(_app(), "/metrics", {})

    assert (head.status_code, head.headers["content-type"]) == (200, get.headers["content-type"])
    assert head.content == b""
