"""What the network and a node's agent tell each other, as domain shapes.

The network sends commands about jobs; the agent reports on its jobs (starts, chunks,
signed results) and on itself (heartbeats, draining, applied configuration).
Both ends convert these with core/convert/job_events.py and agent_reports.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from core.inference import Continuation, FinishReason, GenerationSpec, TokenLogprob, Usage


@dataclass(frozen=True, slots=True)
class AssignCommand:
    job_id: str
    epoch: int
    spec: GenerationSpec
    # Set when the job continues what another node started.
    continuation: Continuation | None = None
    # W3C trace context of the dispatch (traceparent, tracestate); empty untraced.
    trace_context: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class CancelCommand:
    job_id: str
    epoch: int


class FailureKind(StrEnum):
    INVALID_REQUEST = "invalid_request"
    MODEL_UNAVAILABLE = "model_unavailable"
    RUNTIME_ERROR = "runtime_error"


@dataclass(frozen=True, slots=True)
class StartedReport:
    """The job left the node's queue and runs (its first chunk implies as much)."""

    job_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class WaitingReport:
    """The started job waits on the node's scheduler, which works (preempted for, or
    waiting for, cache cells); repeated while it waits. Progress without output."""

    job_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class ChunkReport:
    job_id: str
    epoch: int
    text: str
    token_count: int
    # The first chunk carries the prompt size, for billing a cancelled job.
    prompt_tokens: int
    # Vocabulary ids of the chunk's tokens; empty when the runtime has none.
    token_ids: tuple[int, ...] = ()
    # One per token when the job asked for logprobs.
    logprobs: tuple[TokenLogprob, ...] = ()
    # An embedding job's vector.
    embedding: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class DoneReport:
    job_id: str
    epoch: int
    finish_reason: FinishReason
    usage: Usage
    # The node's signature over the result (core/node_signing.py) and the finish
    # reason as the wire enum number it covers.
    signature: bytes = b""
    reason_code: int = 0


@dataclass(frozen=True, slots=True)
class FailedReport:
    job_id: str
    epoch: int
    kind: FailureKind
    message: str
    usage: Usage = field(default_factory=Usage)
    # As DoneReport's: the signature and the failure reason's wire enum number.
    signature: bytes = b""
    reason_code: int = 0
    # For INVALID_REQUEST: the request field at fault, as the API names it.
    param: str = ""


JobReport = StartedReport | WaitingReport | ChunkReport | DoneReport | FailedReport


@dataclass(frozen=True, slots=True)
class Heartbeat:
    active_jobs: int
    queued_jobs: int
    recent_tokens_per_second: float
    free_memory_bytes: int = 0
    # Fingerprints of the conversations the node holds (core/prompt_prefixes.py),
    # newest first; at most MAX_ADVERTISED_PREFIXES once read from the wire.
    cached_prefixes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Draining:
    """The node takes no new jobs; it finishes its own and then closes."""


@dataclass(frozen=True, slots=True)
class ConfigApplied:
    version: int


AgentReport = Heartbeat | Draining | ConfigApplied | JobReport
