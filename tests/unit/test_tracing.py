"""Tracing is off, at no cost, unless an OTLP endpoint is configured."""

from __future__ import annotations

import re

from core import tracing
from core.trace_context import UNTRACED


def test_without_an_endpoint_nothing_is_traced() -> None:
    assert not tracing.configure_tracing("test", environ={})
    assert not tracing.enabled()
    assert tracing.server_interceptors() == []
    assert tracing.client_interceptors() == []
    assert tracing.current_carrier() == ()
    assert tracing.trace_context() is UNTRACED
    assert tracing.start_span("work", {}, {}) is None
    tracing.annotate({"gen_ai.request.model": "m"})  # no span: nothing happens


def test_a_decoy_trace_context_looks_like_any_sampled_span_of_a_new_trace() -> None:
    decoys = [tracing._OtelTraceContext().decoy() for _ in range(2)]
    for decoy in decoys:
        [(name, value)] = decoy
        assert name == "traceparent"
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", value)
    assert decoys[0] != decoys[1]
