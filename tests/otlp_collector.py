"""A small OTLP/gRPC trace receiver for tests: what an OpenTelemetry collector is to a
deployment, keeping every span it is sent in memory.

Processes under test export to it as to any collector (OTEL_EXPORTER_OTLP_ENDPOINT),
over the real OTLP protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(item) for item in value.array_value.values)
    return getattr(value, kind) if kind else None


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class OtlpCollector(pb_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._received = asyncio.Condition()
        self._server: grpc.aio.Server | None = None
        self.endpoint = ""

    async def Export(
        self, request: pb.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name"))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service,
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            _attributes(span.attributes),
                        )
                    )
        async with self._received:
            self._received.notify_all()
        return pb.ExportTraceServiceResponse()

    async def start(self) -> str:
        """Listens on a free loopback port; returns the endpoint to export to."""
        self._server = grpc.aio.server()
        pb_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        return self.endpoint

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.trace_id == trace_id]

    async def wait_for(
        self, trace_id: str, expected: set[tuple[str, str]], *, timeout_s: float = 60.0
    ) -> list[ReceivedSpan]:
        """The trace's spans once it holds each (service, span name) of ``expected``."""

        def complete() -> bool:
            return expected <= {(span.service, span.name) for span in self.trace(trace_id)}

        try:
            async with asyncio.timeout(timeout_s), self._received:
                await self._received.wait_for(complete)
        except TimeoutError:
            received = {(span.service, span.name) for span in self.trace(trace_id)}
            raise AssertionError(
                f"spans never received: {sorted(expected - received)}; received: "
                f"{sorted(received)}; services heard from: "
                f"{sorted({span.service for span in self.spans})}"
            ) from None
        return self.trace(trace_id)
