"""The trace context of a job, as the code dispatching it sees it: no tracing library.

The network hands each assignment the W3C trace context of the dispatch that
made it (core/tracing.py implements this port when tracing is on), so that the
node's spans of the job join the request's trace. A job the network runs for its
own ends (a benchmark, a disguised canary) gets a ``decoy``: a fresh trace
context of the same form, so that a node cannot tell such a job by its missing
or shared trace.
"""

from __future__ import annotations

from typing import Protocol

# W3C trace context fields (traceparent, tracestate), sorted by name.
Carrier = tuple[tuple[str, str], ...]


class TraceContext(Protocol):
    def current(self) -> Carrier:
        """The current span's context; () when untraced."""
        ...

    def decoy(self) -> Carrier:
        """A new trace's context, linked to no span; () when untraced."""
        ...


class Untraced:
    def current(self) -> Carrier:
        return ()

    def decoy(self) -> Carrier:
        return ()


UNTRACED: TraceContext = Untraced()
