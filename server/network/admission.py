"""Admitting a node: its signed hello, bound to this session's challenge, and its token.

The stream opens with a challenge (a random nonce and the network's id). The
agent answers with a hello it signed with its Ed25519 key, echoing both and
saying when it signed. The network checks, in order: the nonce is one it
issued and not yet used (each is used once, used or not it is spent), the
network id is its own, the signature verifies with the hello's public key,
the signing time is within the clock window, and the node token resolves to
an operator account. The node's id is the fingerprint of its public key.

Without a token verifier (a network run on its own, for development) tokens
are not checked and nodes have no operator: they can serve, never earn.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from core.errors import InvalidArgument, InvalidNodeCredentials
from core.node_signing import PUBLIC_KEY_BYTES, node_id_of, verify
from server.network.nodes import NodeHello

NONCE_BYTES = 32
# What a hello may hold: a node is a stranger's device, and what it declares is
# stored, indexed and logged.
MAX_NODE_NAME_LENGTH = 64
MAX_AGENT_VERSION_LENGTH = 32
MAX_NODE_MODELS = 64
MAX_MODEL_ID_LENGTH = 256
MAX_RUNTIME_LENGTH = 32
MAX_NODE_TOKEN_LENGTH = 256
MAX_NETWORK_ID_LENGTH = 64


class NodeTokenVerifier(Protocol):
    async def operator_of(self, node_token: str) -> str:
        """The operator account the token was issued to; raises InvalidNodeCredentials."""
        ...


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    # Identifies this network in challenges; a hello signed for another is refused.
    network_id: str = "resultity-local"
    # How far the hello's signing time may be from the network's clock.
    clock_window_s: float = 120.0
    # How long a new stream may take to send its signed hello before it is closed.
    hello_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Admitted:
    node_id: str
    operator_account_id: str


class NodeAdmission:
    def __init__(
        self,
        settings: AdmissionSettings,
        tokens: NodeTokenVerifier | None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self._tokens = tokens
        self._clock = clock
        # Issued, unused nonces and when they were issued (monotonic).
        self._issued: dict[bytes, float] = {}

    def challenge(self) -> bytes:
        """A fresh nonce for one session's hello."""
        self._forget_expired()
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._issued[nonce] = time.monotonic()
        return nonce

    def withdraw(self, nonce: bytes) -> None:
        """The session ended before its hello: the nonce can never be used."""
        self._issued.pop(nonce, None)

    async def admit(
        self, hello: NodeHello, raw_hello: bytes, signature: bytes, session_nonce: bytes
    ) -> Admitted:
        issued = self._issued.pop(session_nonce, None)
        check_hello_bounds(hello)
        if issued is None or hello.nonce != session_nonce:
            raise InvalidNodeCredentials("the hello does not answer this session's challenge")
        if hello.network_id != self.settings.network_id:
            raise InvalidNodeCredentials("the hello was signed for another network")
        if len(hello.public_key) != PUBLIC_KEY_BYTES:
            raise InvalidNodeCredentials("the hello has no Ed25519 public key")
        if not verify(hello.public_key, signature, raw_hello):
            raise InvalidNodeCredentials("the hello's signature does not verify")
        if hello.signed_at is None or (
            abs((self._clock() - hello.signed_at).total_seconds()) > self.settings.clock_window_s
        ):
            raise InvalidNodeCredentials(
                "the hello's signing time is outside the network's clock window"
            )
        operator = ""
        if self._tokens is not None:
            if not hello.node_token:
                raise InvalidNodeCredentials("the hello carries no node token")
            operator = await self._tokens.operator_of(hello.node_token)
        return Admitted(node_id_of(hello.public_key), operator)

    def _forget_expired(self) -> None:
        expired = time.monotonic() - self.settings.clock_window_s
        for nonce, issued in list(self._issued.items()):
            if issued >= expired:
                break  # insertion order is issue order
            del self._issued[nonce]


def check_hello_bounds(hello: NodeHello) -> None:
    """Refuses a hello with a field longer or a list larger than a real agent sends."""
    for value, limit, field in (
        (hello.name, MAX_NODE_NAME_LENGTH, "node_name"),
        (hello.agent_version, MAX_AGENT_VERSION_LENGTH, "agent_version"),
        (hello.node_token, MAX_NODE_TOKEN_LENGTH, "node_token"),
        (hello.network_id, MAX_NETWORK_ID_LENGTH, "network_id"),
        (hello.nonce, NONCE_BYTES, "nonce"),
    ):
        if len(value) > limit:
            raise InvalidArgument(f"{field} must be at most {limit} long", field=field)
    if len(hello.models) > MAX_NODE_MODELS:
        raise InvalidArgument(f"at most {MAX_NODE_MODELS} models per node", field="models")
    for model in hello.models:
        if len(model.model) > MAX_MODEL_ID_LENGTH or len(model.runtime) > MAX_RUNTIME_LENGTH:
            raise InvalidArgument(
                f"model ids must be at most {MAX_MODEL_ID_LENGTH} characters and runtimes"
                f" at most {MAX_RUNTIME_LENGTH}",
                field="models",
            )
