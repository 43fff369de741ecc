"""The node's identity: an Ed25519 key generated on first start, kept in the data dir."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from resultity.agent.v1 import agent_service_pb2 as pb

from core.node_signing import node_id_of

KEY_FILE = "node-key.pem"


class NodeIdentity:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.node_id = node_id_of(self.public_key)

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: Path) -> NodeIdentity:
        """The key in ``data_dir`` (created, mode 0600, if missing)."""
        path = data_dir / KEY_FILE
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 key")
            return cls(key)
        data_dir.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        return cls(key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def signed_hello(
    identity: NodeIdentity,
    hello: pb.Hello,
    challenge: pb.Challenge,
    node_token: str,
    *,
    signed_at: datetime | None = None,
) -> pb.ConnectRequest:
    """``hello`` bound to ``challenge`` and signed: the session's first message."""
    bound = pb.Hello()
    bound.CopyFrom(hello)
    bound.public_key = identity.public_key
    bound.node_token = node_token
    bound.nonce = challenge.nonce
    bound.network_id = challenge.network_id
    bound.signed_at.FromDatetime(signed_at or datetime.now(UTC))
    raw = bound.SerializeToString()
    return pb.ConnectRequest(signed_hello=pb.SignedHello(hello=raw, signature=identity.sign(raw)))
