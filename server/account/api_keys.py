"""API key format: generation, offline validation, hashing.

A key is ``rsk_`` + 43 base62 characters of secret (256 bits) + a 6-character
base62 CRC32 of everything before it. The checksum lets malformed or mistyped
keys be rejected without touching the database; CRC32 catches every
single-character change. Keys are stored only as SHA-256 hex: they carry 256
bits of entropy, so a slow password hash would add nothing.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from server.common.errors import InvalidApiKey

KEY_PREFIX = "rsk_"
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SECRET_CHARS = 43  # 62**43 > 2**256
CHECKSUM_CHARS = 6  # 62**6 > 2**32
KEY_LENGTH = len(KEY_PREFIX) + SECRET_CHARS + CHECKSUM_CHARS
DISPLAY_PREFIX_CHARS = 12

_BASE62_SET = frozenset(BASE62)


@dataclass(frozen=True)
class ApiKey:
    """A stored key, as the account server describes it (never the secret)."""

    api_key_id: UUID
    account_id: UUID
    name: str
    prefix: str
    created_at: datetime


@dataclass(frozen=True)
class GeneratedKey:
    # repr=False so that logging or printing the object never shows the secret.
    secret: str = field(repr=False)
    prefix: str
    key_hash: str


@dataclass(frozen=True)
class IssuedApiKey:
    """A key just created: the only time its secret exists outside the caller."""

    api_key: ApiKey
    secret: str = field(repr=False)


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


def generate_api_key() -> GeneratedKey:
    body = KEY_PREFIX + _base62(secrets.randbits(256), SECRET_CHARS)
    secret = body + _checksum(body)
    return GeneratedKey(secret=secret, prefix=display_prefix(secret), key_hash=hash_api_key(secret))


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


def hash_api_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    return secret[:DISPLAY_PREFIX_CHARS]
