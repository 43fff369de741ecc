"""Connected nodes and the commands the network sends them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from core.agent_messages import AssignCommand, CancelCommand
from core.errors import DomainError
from server.network.advertised import AdvertisesPrefixes, PrefixListener
from server.network.config import NetworkConfig


@dataclass(frozen=True, slots=True)
class NodeModel:
    model: str
    runtime: str
    context_length: int


@dataclass(frozen=True, slots=True)
class NodeHello:
    name: str
    agent_version: str
    models: tuple[NodeModel, ...]
    max_concurrent_jobs: int
    # Identity and credentials (see admission.py); the signature is checked
    # over the hello's serialized bytes.
    public_key: bytes = b""
    node_token: str = ""
    nonce: bytes = b""
    network_id: str = ""
    signed_at: datetime | None = None
    # Where the node runs, as its operator declares it; empty: undeclared.
    region: str = ""


@dataclass(frozen=True, slots=True)
class SignedHello:
    """A session's opening: the hello, its serialized bytes as signed, and the signature."""

    hello: NodeHello
    raw: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class DisconnectCommand:
    """Ends the node's session with this explanation (and this error, if it is one)."""

    reason: str
    error: DomainError | None = None


@dataclass(frozen=True, slots=True)
class ReconnectCommand:
    """Ends the node's session cleanly: the server is going away, come back later."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConfigCommand:
    """The current network configuration, for the agent to apply and acknowledge."""

    config: NetworkConfig


NodeCommand = AssignCommand | CancelCommand | DisconnectCommand | ReconnectCommand | ConfigCommand


class NodeState(StrEnum):
    READY = "ready"
    SUSPECT = "suspect"
    DRAINING = "draining"
    QUARANTINED = "quarantined"
    # Running its join-time benchmark and canaries; serves no model yet.
    VALIDATING = "validating"


class ModelValidation(StrEnum):
    """Where a node stands with one model it offers."""

    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"
    # Join validation is off: the model is served unchecked.
    UNCHECKED = "unchecked"


@dataclass(slots=True)
class ModelStatus:
    validation: ModelValidation = ModelValidation.PENDING
    # Measured by the join-time benchmark; 0 until then.
    time_to_first_token_ms: float = 0.0
    tokens_per_second: float = 0.0
    reason: str = ""

    @property
    def serving(self) -> bool:
        return self.validation in (ModelValidation.PASSED, ModelValidation.UNCHECKED)


@dataclass(slots=True)
class NodeStanding:
    """What the network remembers of a node (by its key) from one session to the next,
    so that reconnecting does not wipe a record of wrong answers."""

    # In [0, 1]: an average of canary results, recent ones weighing more.
    reputation: float = 1.0
    # Some canary (join-time or in service) got a wrong answer.
    failed_canary: bool = False
    # Set when the node is taken out of service; it gets no jobs, and cannot
    # join again, until an operator releases it.
    quarantine_reason: str = ""


@dataclass(eq=False)
class NodeSession(AdvertisesPrefixes):
    """A connected node: what it serves, its load, and its outgoing queue."""

    node_id: str
    hello: NodeHello
    # The operator account the node's token belongs to; empty without a token.
    operator_account_id: str = ""
    connected_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_heartbeat_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Monotonic clock of the last message, for liveness.
    last_seen: float = field(default_factory=time.monotonic)
    active_jobs: set[str] = field(default_factory=set)
    queued_jobs: int = 0
    recent_tokens_per_second: float = 0.0
    free_memory_bytes: int = 0
    # Fingerprints of the conversations the node holds (core/prompt_prefixes.py),
    # as its last heartbeat advertised them (``cached_prefixes``): the router
    # prefers it for their next turns.
    _advertised: frozenset[int] = field(default=frozenset(), init=False, repr=False)
    prefix_listeners: list[PrefixListener] = field(default_factory=list, init=False, repr=False)
    # The agent is shutting down: it finishes its jobs and gets no new ones.
    draining: bool = False
    # The configuration version the agent last acknowledged.
    config_version: int = 0
    # Per offered model: join validation and benchmark figures.
    model_status: dict[str, ModelStatus] = field(default_factory=dict)
    # Shared with the network's record of the node: it outlives the session.
    standing: NodeStanding = field(default_factory=NodeStanding)
    outbox: asyncio.Queue[NodeCommand] = field(default_factory=asyncio.Queue)

    @property
    def models(self) -> frozenset[str]:
        return frozenset(model.model for model in self.hello.models)

    @property
    def region(self) -> str:
        return self.hello.region

    @property
    def verified(self) -> bool:
        """Admitted with an operator's node token, no failed canary on record."""
        return bool(self.operator_account_id) and not self.standing.failed_canary

    @property
    def load(self) -> float:
        """Share of the node's concurrency in use; above 1 means jobs queue."""
        return len(self.active_jobs) / max(1, self.hello.max_concurrent_jobs)

    @property
    def validating(self) -> bool:
        """No model is served yet and some are still being validated."""
        statuses = self.model_status.values()
        return not any(s.serving for s in statuses) and any(
            s.validation is ModelValidation.PENDING for s in statuses
        )

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def state(self, now: float, suspect_after_s: float) -> NodeState:
        if self.standing.quarantine_reason:
            return NodeState.QUARANTINED
        if self.draining:
            return NodeState.DRAINING
        if self.validating:
            return NodeState.VALIDATING
        if now - self.last_seen > suspect_after_s:
            return NodeState.SUSPECT
        return NodeState.READY
