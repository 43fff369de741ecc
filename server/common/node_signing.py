"""What a node signs, and checking it: shared by the agent and the network.

A node's identity is an Ed25519 key pair. It signs two things:

- its hello, as the exact serialized bytes it sends (``SignedHello``), bound
  to the stream's challenge nonce and the network's id;
- each job's result (``JobDone`` / ``JobFailed``), over a digest of
  everything it streamed for that job and epoch (``result_payload``).

Chunks are not signed one by one: a signature per chunk would cost more than
generating a token of a small model, and one signature at the end commits the
node to the whole output it streamed (the network recomputes the digest from
what it relayed and refuses a result that does not match).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

PUBLIC_KEY_BYTES = 32
RESULT_DOMAIN = "resultity-result-v1"


def node_id_of(public_key: bytes) -> str:
    """The node's id: the first 16 bytes of SHA-256 of its raw public key, in hex."""
    return hashlib.sha256(public_key).digest()[:16].hex()


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(slots=True)
class OutputDigest:
    """Running digest of the text and token ids streamed for one job and epoch."""

    _text: hashlib._Hash = field(default_factory=hashlib.sha256)
    _ids: hashlib._Hash = field(default_factory=hashlib.sha256)

    def add(self, text: str, token_ids: tuple[int, ...] | list[int] = ()) -> None:
        self._text.update(text.encode())
        if token_ids:
            self._ids.update(struct.pack(f"<{len(token_ids)}i", *token_ids))

    @property
    def text_hex(self) -> str:
        return self._text.hexdigest()

    @property
    def ids_hex(self) -> str:
        return self._ids.hexdigest()


def result_payload(
    *,
    job_id: str,
    epoch: int,
    done: bool,
    reason: int,
    prompt_tokens: int,
    completion_tokens: int,
    output: OutputDigest,
) -> bytes:
    """The bytes a result signature covers (see agent_service.proto ResultDigest)."""
    lines = (
        RESULT_DOMAIN,
        job_id,
        str(epoch),
        "done" if done else "failed",
        str(reason),
        str(prompt_tokens),
        str(completion_tokens),
        output.text_hex,
        output.ids_hex,
    )
    return "\n".join(lines).encode()
