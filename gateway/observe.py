"""What the gateway reports of each HTTP request: metrics by endpoint, model and
status, and (when tracing is on) the request's span, the root of its trace
unless the caller sent a `traceparent` of its own.

Labels stay bounded: the endpoint is the route's template (`/v1/models/{model}`),
"other" for paths no route serves; the model is the one the body named only when
the status shows cloud resolved it (an answer, or a refusal that comes after the
model was found: no funds, rate limited, no capacity), and then at most
``MODEL_LABELS`` distinct ones; ids and keys are never labels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from starlette.types import Scope

from core import tracing
from core.metrics import LATENCY_BUCKETS, NO_METRICS, OTHER, LabelGuard, MetricsFactory

MODEL_LABELS = 64
# Statuses that cloud gives only once the model resolved to a catalog model.
_MODEL_KNOWN = frozenset({429, 503})
# The key request state holds the body's model under, for the labels and the span.
MODEL_STATE = "model"
# GenAI operation of each endpoint (the span's gen_ai.operation.name).
_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    # A response is a chat completion in another shape (gateway/responses_convert.py).
    "/v1/responses": "chat",
    "/v1/embeddings": "embeddings",
}


class GatewayMetrics:
    def __init__(self, metrics: MetricsFactory = NO_METRICS) -> None:
        self._requests = metrics.counter(
            "resultity_http_requests_total",
            "HTTP requests answered, by endpoint (route template), model and status.",
            ("endpoint", "model", "status"),
        )
        self._duration = metrics.histogram(
            "resultity_http_request_duration_seconds",
            "Time from receiving an HTTP request to the end of its response (a stream's "
            "last byte): the end-to-end latency a caller sees.",
            ("endpoint", "model"),
            LATENCY_BUCKETS,
        )
        self._models = LabelGuard(MODEL_LABELS)

    def request(self, scope: Scope, status: int | None, seconds: float) -> None:
        endpoint = _endpoint(scope)
        code = status or 500
        model = ""
        if code < 400 or code in _MODEL_KNOWN:
            model = self._models(str(scope.get("state", {}).get(MODEL_STATE, "")))
        self._requests.inc(endpoint, model, str(code))
        self._duration.observe(seconds, endpoint, model)


def _endpoint(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else OTHER


@contextlib.contextmanager
def request_span(scope: Scope) -> Iterator[tracing.Span | None]:
    """The request's server span, current while it is handled; None when tracing is
    off (then this costs one check)."""
    if not tracing.enabled():
        yield None
        return
    headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
    path = scope["path"]
    attributes: tracing.Attributes = {"http.request.method": scope["method"], "url.path": path}
    with tracing.server_span(scope["method"], headers, attributes) as span:
        yield span


def end_span(span: tracing.Span, scope: Scope, status: int | None) -> None:
    """The request's outcome and GenAI request attributes on its span."""
    attributes: dict[str, tracing.AttributeValue] = {
        "http.response.status_code": status or 500,
        "http.route": _endpoint(scope),
    }
    operation = _OPERATIONS.get(_endpoint(scope))
    model = scope.get("state", {}).get(MODEL_STATE)
    if operation is not None:
        attributes[tracing.GEN_AI_OPERATION] = operation
        attributes[tracing.GEN_AI_PROVIDER] = tracing.PROVIDER
    if model:
        attributes[tracing.GEN_AI_REQUEST_MODEL] = str(model)
    span.set_attributes(attributes)
    span.update_name(f"{scope['method']} {attributes['http.route']}")
    if status is None or status >= 500:
        tracing.fail(span, f"HTTP {status or 500}")
