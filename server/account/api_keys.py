"""API key format: generation, offline validation, keyed hashing, scopes.

A key is ``rsk_`` + 43 base62 characters of secret (256 bits) + a 6-character
base62 CRC32 of everything before it. The checksum lets malformed or mistyped
keys be rejected without touching the database; CRC32 catches every
single-character change. Keys are stored only as HMAC-SHA256 under a server
secret: a leaked table alone cannot be used to test candidate keys, and the
keys' 256 bits of entropy make a slow password hash unnecessary. Lookups go
by the hash (an index probe); the presented key's hash is then compared with
the stored one in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from uuid import UUID

from core.errors import InvalidApiKey, InvalidArgument
from server.common.inference_logging import LOGGING_OFF, InferenceLogging
from server.common.rate_limits import NO_LIMITS, RateLimits, validate_rate_limits

KEY_PREFIX = "rsk_"
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SECRET_CHARS = 43  # 62**43 > 2**256
CHECKSUM_CHARS = 6  # 62**6 > 2**32
KEY_LENGTH = len(KEY_PREFIX) + SECRET_CHARS + CHECKSUM_CHARS
DISPLAY_PREFIX_CHARS = 12
MAX_ALLOWED_MODELS = 100
MAX_MODEL_ID_LENGTH = 200

_BASE62_SET = frozenset(BASE62)


class Scope(StrEnum):
    """What a key may be used for; the values are stored in SQL."""

    INFERENCE = "inference"
    MANAGEMENT = "management"
    ADMIN = "admin"
    # A node token: lets a node join the network for the key's account, nothing else.
    NODE = "node"


@dataclass(frozen=True)
class KeyPolicy:
    """The limits a key is created with."""

    scopes: frozenset[Scope] = frozenset({Scope.INFERENCE})
    expires_at: datetime | None = None
    allowed_models: tuple[str, ...] = ()
    subcloud_id: str = ""
    rate_limits: RateLimits = NO_LIMITS


@dataclass(frozen=True)
class ApiKey:
    """A stored key, as the account server describes it (never the secret)."""

    api_key_id: UUID
    account_id: UUID
    name: str
    prefix: str
    created_at: datetime
    policy: KeyPolicy = KeyPolicy()
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class ActiveKey:
    """A key that authenticated, with the rate limits and the inference logging
    setting stored with its account."""

    api_key: ApiKey
    account_limits: RateLimits = NO_LIMITS
    account_logging: InferenceLogging = LOGGING_OFF


@dataclass(frozen=True)
class GeneratedKey:
    # repr=False so that logging or printing the object never shows the secret.
    secret: str = field(repr=False)
    prefix: str
    key_hash: str = field(repr=False)


@dataclass(frozen=True)
class IssuedApiKey:
    """A key just created: the only time its secret exists outside the caller."""

    api_key: ApiKey
    secret: str = field(repr=False)


class KeyHasher:
    """HMAC-SHA256 of keys under the server's secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the key hashing secret must be at least 32 bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return "KeyHasher(<secret>)"

    def hash(self, api_key: str) -> str:
        return hmac.new(self._secret, api_key.encode(), hashlib.sha256).hexdigest()

    def matches(self, api_key: str, stored_hash: str) -> bool:
        return hmac.compare_digest(self.hash(api_key), stored_hash)

    def generate(self) -> GeneratedKey:
        body = KEY_PREFIX + _base62(secrets.randbits(256), SECRET_CHARS)
        secret = body + _checksum(body)
        return GeneratedKey(
            secret=secret, prefix=display_prefix(secret), key_hash=self.hash(secret)
        )


def _base62(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        chars.append(BASE62[digit])
    if value:
        raise ValueError("value does not fit in the requested width")
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_CHARS)


def looks_like_api_key(credential: str) -> bool:
    return credential.startswith(KEY_PREFIX)


def validate_api_key(secret: str) -> str:
    """Returns the key if well-formed; raises InvalidApiKey otherwise.

    The error message never repeats the presented key.
    """
    if (
        len(secret) != KEY_LENGTH
        or not secret.startswith(KEY_PREFIX)
        or not _BASE62_SET.issuperset(secret[len(KEY_PREFIX) :])
    ):
        raise InvalidApiKey("Invalid API key")
    body, checksum = secret[:-CHECKSUM_CHARS], secret[-CHECKSUM_CHARS:]
    if not secrets.compare_digest(_checksum(body), checksum):
        raise InvalidApiKey("Invalid API key")
    return secret


def display_prefix(secret: str) -> str:
    return secret[:DISPLAY_PREFIX_CHARS]


def validate_policy(policy: KeyPolicy, now: datetime) -> KeyPolicy:
    if policy.expires_at is not None and policy.expires_at <= now:
        raise InvalidArgument("expires must be in the future", field="expires")
    if len(policy.allowed_models) > MAX_ALLOWED_MODELS or any(
        not model or len(model) > MAX_MODEL_ID_LENGTH for model in policy.allowed_models
    ):
        raise InvalidArgument(
            f"allowed_models: at most {MAX_ALLOWED_MODELS} non-empty model ids",
            field="allowed_models",
        )
    if len(policy.subcloud_id) > MAX_MODEL_ID_LENGTH:
        raise InvalidArgument("subcloud_id is too long", field="subcloud_id")
    return KeyPolicy(
        policy.scopes or frozenset({Scope.INFERENCE}),
        policy.expires_at,
        tuple(dict.fromkeys(policy.allowed_models)),
        policy.subcloud_id,
        validate_rate_limits(policy.rate_limits),
    )
