"""A job in flight: what its node reports and what the caller sees."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum

from server.common.inference import FinishReason, Usage


class FailureKind(StrEnum):
    INVALID_REQUEST = "invalid_request"
    MODEL_UNAVAILABLE = "model_unavailable"
    RUNTIME_ERROR = "runtime_error"


# Reports from the node, fed into the job's queue by the node's session.
@dataclass(frozen=True, slots=True)
class ChunkReport:
    text: str
    token_count: int
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class DoneReport:
    finish_reason: FinishReason
    usage: Usage


@dataclass(frozen=True, slots=True)
class FailedReport:
    kind: FailureKind
    message: str


@dataclass(frozen=True, slots=True)
class NodeLost:
    reason: str


NodeReport = ChunkReport | DoneReport | FailedReport | NodeLost


@dataclass(eq=False, slots=True)
class ActiveJob:
    job_id: str
    epoch: int
    node_id: str
    reports: asyncio.Queue[NodeReport]

    def accepts(self, node_id: str, epoch: int) -> bool:
        """Fencing: only the current assignment's node may report."""
        return node_id == self.node_id and epoch == self.epoch
