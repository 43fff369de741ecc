"""OpenTelemetry traces of every process, on when OTEL_EXPORTER_OTLP_ENDPOINT is set.

``configure_tracing`` (called once by each process's entry point) installs a
tracer provider exporting spans over OTLP/gRPC to that endpoint (the standard
OTEL_* variables apply: headers, timeouts, the batch processor's delays). Without
the variable nothing is configured and nothing of OpenTelemetry is imported: the
gRPC servers and channels get no interceptors, the gateway opens no span, and
the other calls here return at once.

A request's trace crosses processes as W3C trace context: in gRPC metadata
(``traceparent``), put there and read by OpenTelemetry's gRPC interceptors, and,
where one long stream outlives any request, in the message that starts the job:
from the network to an agent in the job's assignment (``AssignJob.trace_context``),
from cloud to the network in RunJobs' start (``RunJobRequest.trace_context``),
under spans named as RunJob's (``stream_call_span``, ``stream_server_span``).

Spans carry OpenTelemetry's GenAI attributes (``GEN_AI_*`` below) where a
process knows them: the gateway the request, cloud and the network the model and
the usage, the agent its own job.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from core.job_streams import RUN_JOBS_METHOD
from core.trace_context import UNTRACED, Carrier, TraceContext

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    _UnaryStreamInterceptor = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
else:  # not subscriptable at run time
    _UnaryStreamInterceptor = grpc.aio.UnaryStreamClientInterceptor

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"

# OpenTelemetry's semantic conventions for generative AI.
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_CHOICES = "gen_ai.request.choice.count"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
PROVIDER = "resultity"

AttributeValue = str | bool | int | float | Sequence[str]
Attributes = Mapping[str, AttributeValue]

# The agent's session stream lasts as long as the agent, a cloud replica's job
# stream as long as the replica: a span of either would span days and parent
# nothing. Their jobs carry their trace context in their assignments and starts.
_UNTRACED_METHODS = (
    "/resultity.agent.v1.AgentService/Connect",
    RUN_JOBS_METHOD,
    "/grpc.health.v1.Health/",
)

_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def configure_tracing(service: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Traces this process as ``resultity-<service>`` if an OTLP endpoint is set;
    returns whether it does."""
    global _provider, _tracer
    endpoint = environ.get(TRACES_ENDPOINT_ENV) or environ.get(ENDPOINT_ENV)
    if not endpoint:
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_NAMESPACE, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(
        resource=Resource.create(
            {SERVICE_NAME: f"resultity-{service}", SERVICE_NAMESPACE: "resultity"}
        )
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    _provider = provider
    _tracer = provider.get_tracer("resultity")
    return True


def shutdown_tracing() -> None:
    """Exports the spans still buffered (at exit)."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None


def enabled() -> bool:
    return _tracer is not None


def server_interceptors() -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    """A server span per call, continuing the caller's trace; none when off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    interceptor: grpc.aio.ServerInterceptor[Any, Any] = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=_provider, filter_=_traced
    )
    return [interceptor]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """A client span per call, its trace context sent along; none when off."""
    if _provider is None or _tracer is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call]
        tracer_provider=_provider, filter_=_traced
    )
    # OpenTelemetry's server-streaming interceptor ends its span only when the
    # responses are read to their end, and a caller that stops after the message
    # it waited for (a job's last event) and cancels the call would leave it open.
    streaming: Any = _ServerStreamingSpans(_tracer)
    return [
        streaming if isinstance(each, grpc.aio.UnaryStreamClientInterceptor) else each
        for each in interceptors
    ]


class _ServerStreamingSpans(_UnaryStreamInterceptor):
    """A client span per server-streaming call, ended when the call ends however it
    ends (read to its end, failed, or cancelled by its caller)."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if not _traced(details):
            return await continuation(details, request)
        from opentelemetry.propagate import inject
        from opentelemetry.trace import SpanKind, set_span_in_context

        span = self._tracer.start_span(
            method, kind=SpanKind.CLIENT, attributes=_rpc_attributes(method)
        )
        carrier: dict[str, str] = {}
        inject(carrier, context=set_span_in_context(span))
        details = grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*(details.metadata or ()), *carrier.items()),
            details.credentials,
            details.wait_for_ready,
        )
        call = await continuation(details, request)
        call.add_done_callback(lambda done: _end_call_span(span, done))
        return call


def _rpc_attributes(method: str) -> Attributes:
    service, _, name = method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _end_call_span(span: Any, call: Any) -> None:
    """Ends a call's span with its status code (a caller's cancel is no error)."""
    import asyncio

    async def end() -> None:
        _end_span(span, await call.code())

    task = asyncio.ensure_future(end())
    _ending.add(task)
    task.add_done_callback(_ending.discard)


def _end_span(span: Any, code: grpc.StatusCode) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


@contextlib.contextmanager
def stream_call_span(method: str) -> Iterator[Carrier]:
    """The client span of a call that travels as messages of a longer stream (a job
    on DispatchService.RunJobs), named, parented and ended as the call's own span
    would be; yields the trace context to send in the call's place, () when off. The
    span is not made current: the block may be an async generator's, which yields."""
    if _tracer is None:
        yield ()
        return
    from opentelemetry.propagate import inject
    from opentelemetry.trace import SpanKind, set_span_in_context

    span = _tracer.start_span(method, kind=SpanKind.CLIENT, attributes=_rpc_attributes(method))
    carrier: dict[str, str] = {}
    inject(carrier, context=set_span_in_context(span))
    code = grpc.StatusCode.OK
    try:
        yield tuple(sorted(carrier.items()))
    except grpc.aio.AioRpcError as error:
        code = error.code()
        raise
    except BaseException:
        code = grpc.StatusCode.CANCELLED  # the caller left (closed or cancelled)
        raise
    finally:
        _end_span(span, code)


@contextlib.contextmanager
def stream_server_span(method: str, parent: Mapping[str, str]) -> Iterator[None]:
    """The current span while a call that travels as messages of a longer stream is
    served (a job on DispatchService.RunJobs), as the server interceptor's span of
    the call would be: child of the span whose trace context ``parent`` carries. A
    block that raises an error (not a cancellation) marks it failed. Nothing when off."""
    if _tracer is None:
        yield
        return
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    with _tracer.start_as_current_span(
        method, context=extract(parent), kind=SpanKind.SERVER, attributes=_rpc_attributes(method)
    ):
        yield


# Span endings in flight (a task is only weakly held by the loop).
_ending: set[Any] = set()


def _traced(details: Any) -> bool:
    method = details.method
    if isinstance(method, bytes):
        method = method.decode()
    return not str(method).startswith(_UNTRACED_METHODS)


def current_carrier() -> Carrier:
    """The current span's W3C trace context, to hand to another process; () when off."""
    if _tracer is None:
        return ()
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return tuple(sorted(carrier.items()))


class _OtelTraceContext:
    def current(self) -> Carrier:
        return current_carrier()

    def decoy(self) -> Carrier:
        # What a sampled span's context looks like, of a trace nobody records.
        return (("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"),)


def trace_context() -> TraceContext:
    """The job trace context port (core/trace_context.py) of this process."""
    return _OtelTraceContext() if _tracer is not None else UNTRACED


def annotate(attributes: Attributes) -> None:
    """Adds ``attributes`` to the current span (none when off)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(attributes)


class Span(Protocol):
    def set_attributes(self, attributes: Attributes) -> None: ...

    def update_name(self, name: str) -> None: ...

    def end(self) -> None: ...


def start_span(name: str, parent: Mapping[str, str], attributes: Attributes) -> Span | None:
    """A span of work that is no call's (an agent's job), child of the span whose
    trace context ``parent`` carries; the caller ends it. None when off."""
    if _tracer is None:
        return None
    from opentelemetry.propagate import extract

    span: Span = _tracer.start_span(name, context=extract(parent), attributes=attributes)
    return span


def fail(span: Span, description: str) -> None:
    """Marks ``span`` as failed."""
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, description))  # type: ignore[attr-defined]


@contextlib.contextmanager
def server_span(name: str, headers: Mapping[str, str], attributes: Attributes) -> Iterator[Span]:
    """The current span while an HTTP request is handled, continuing the trace its
    headers carry (``traceparent``); only called when tracing is on."""
    assert _tracer is not None
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    with _tracer.start_as_current_span(
        name, context=extract(headers), kind=SpanKind.SERVER, attributes=attributes
    ) as span:
        yield span
