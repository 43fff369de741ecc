"""What a node signs, and checking it: shared by the agent and the network.

A node's identity is an Ed25519 key pair. It signs two things:

- its hello, as the exact serialized bytes it sends (``SignedHello``), bound
  to the stream's challenge nonce and the network's id;
- each job's result (``JobDone`` / ``JobFailed``), over a digest of
  everything it streamed for that job and epoch (``result_payload``): text,
  token ids, logprobs and embedding values, in a byte encoding of their own
  (independent of any protobuf library).

Chunks are not signed one by one: a signature per chunk would cost more than
generating a token of a small model, and one signature at the end commits the
node to the whole output it streamed (the network recomputes the digest from
what it relayed and refuses a result that does not match).
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from core.inference import TokenLogprob

PUBLIC_KEY_BYTES = 32
# v2: the digest covers logprobs and embeddings too.
RESULT_DOMAIN = "resultity-result-v2"


def node_id_of(public_key: bytes) -> str:
    """The node's id: the first 16 bytes of SHA-256 of its raw public key, in hex."""
    return hashlib.sha256(public_key).digest()[:16].hex()


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        _public_key(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# A network checks every result of its nodes against their few keys: each is loaded
# once (a key that fails to load raises, and is not kept).
@functools.lru_cache(maxsize=4096)
def _public_key(public_key: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(public_key)


@dataclass(slots=True)
class OutputDigest:
    """Running digest of what was streamed for one job and epoch: text, token ids,
    logprobs and embedding values, each hashed apart (see ResultDigest)."""

    _text: hashlib._Hash = field(default_factory=hashlib.sha256)
    _ids: hashlib._Hash = field(default_factory=hashlib.sha256)
    _logprobs: hashlib._Hash = field(default_factory=hashlib.sha256)
    _embedding: hashlib._Hash = field(default_factory=hashlib.sha256)

    def add(
        self,
        text: str,
        token_ids: Sequence[int] = (),
        logprobs: Sequence[TokenLogprob] = (),
        embedding: Sequence[float] = (),
    ) -> None:
        self._text.update(text.encode())
        if token_ids:
            self._ids.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
        for item in logprobs:
            self._logprobs.update(
                _alternative(item.token, item.token_bytes, item.logprob)
                + struct.pack("<I", len(item.top_logprobs))
            )
            for top in item.top_logprobs:
                self._logprobs.update(_alternative(top.token, top.token_bytes, top.logprob))
        if embedding:
            # As sent: the wire carries float32.
            self._embedding.update(struct.pack(f"<{len(embedding)}f", *embedding))

    @property
    def text_hex(self) -> str:
        return self._text.hexdigest()

    @property
    def ids_hex(self) -> str:
        return self._ids.hexdigest()

    @property
    def logprobs_hex(self) -> str:
        return self._logprobs.hexdigest()

    @property
    def embedding_hex(self) -> str:
        return self._embedding.hexdigest()


def _alternative(token: str, token_bytes: bytes, logprob: float) -> bytes:
    """A token's text and bytes (each length-prefixed) and its logprob as a double."""
    text = token.encode()
    return (
        struct.pack("<I", len(text))
        + text
        + struct.pack("<I", len(token_bytes))
        + token_bytes
        + struct.pack("<d", logprob)
    )


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
        output.logprobs_hex,
        output.embedding_hex,
    )
    return "\n".join(lines).encode()
