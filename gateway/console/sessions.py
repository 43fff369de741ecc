"""Console sessions: an API key exchanged for a random session id, kept server-side.

The browser holds only the session id (an HttpOnly cookie). The store keeps, under
a hash of that id, who signed in and their key encrypted with a key derived from
the id (AES-GCM): what the store holds is useless without the cookie, so a store
shared by several gateways (Redis, sessions_redis.py; or a dump of one) reveals no
API key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# A session ends this long after its last request, and at the latest this long after
# signing in.
IDLE_TIMEOUT_S = 60 * 60
MAX_AGE_S = 12 * 60 * 60


@dataclass(frozen=True, slots=True)
class Identity:
    """Whom a session acts for, as the account layer told at sign-in."""

    account_id: str
    account_name: str
    admin: bool
    key_prefix: str


@dataclass(frozen=True, slots=True)
class Session:
    identity: Identity
    api_key: str
    # Every state-changing form carries it (security.py).
    csrf_token: str
    created_at: float
    last_seen_at: float
    # A key secret to show once on the next page (just created).
    new_secret: str = field(default="", repr=False)

    def __repr__(self) -> str:  # never the key, not even in a traceback
        return f"Session({self.identity!r})"


@dataclass(frozen=True, slots=True)
class SealedSession:
    """A session as stored: the API key and any new secret encrypted."""

    identity: Identity
    sealed_key: bytes
    sealed_new_secret: bytes
    csrf_token: str
    created_at: float
    last_seen_at: float


class SessionsUnavailable(Exception):
    """The session backend does not answer (a shared store that is down)."""


class SessionBackend(Protocol):
    """Where sealed sessions live, by the hash of their id; a backend that does not
    answer raises SessionsUnavailable."""

    async def get(self, handle: str) -> SealedSession | None: ...
    async def put(self, handle: str, sealed: SealedSession, ttl_s: float) -> None: ...
    async def delete(self, handle: str) -> None: ...
    async def close(self) -> None: ...


class MemorySessions:
    """Sessions in this process (one gateway); expired ones are dropped as they are met
    and swept when new ones are made."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._items: dict[str, tuple[SealedSession, float]] = {}
        self._clock = clock

    async def get(self, handle: str) -> SealedSession | None:
        item = self._items.get(handle)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._items[handle]
            return None
        return item[0]

    async def put(self, handle: str, sealed: SealedSession, ttl_s: float) -> None:
        now = self._clock()
        if handle not in self._items:
            self._items = {k: v for k, v in self._items.items() if v[1] > now}
        self._items[handle] = (sealed, now + ttl_s)

    async def delete(self, handle: str) -> None:
        self._items.pop(handle, None)

    async def close(self) -> None:
        self._items.clear()


class SessionStore:
    def __init__(
        self, backend: SessionBackend | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._backend = backend or MemorySessions(clock)
        self._clock = clock

    async def create(self, identity: Identity, api_key: str) -> str:
        """A new session for ``identity``; returns its id (the cookie's value)."""
        session_id = secrets.token_urlsafe(32)
        now = self._clock()
        session = Session(identity, api_key, secrets.token_urlsafe(32), now, now)
        await self._save(session_id, session)
        return session_id

    async def get(self, session_id: str) -> Session | None:
        """The live session, touched; None for an unknown, expired or forged id."""
        raw = _decode(session_id)
        if raw is None:
            return None
        handle = _handle(raw)
        sealed = await self._backend.get(handle)
        if sealed is None:
            return None
        now = self._clock()
        if now - sealed.last_seen_at > IDLE_TIMEOUT_S or now - sealed.created_at > MAX_AGE_S:
            await self._backend.delete(handle)
            return None
        try:
            session = Session(
                sealed.identity,
                _open(raw, sealed.sealed_key),
                sealed.csrf_token,
                sealed.created_at,
                now,
                _open(raw, sealed.sealed_new_secret) if sealed.sealed_new_secret else "",
            )
        except InvalidTag:
            return None
        await self._save(session_id, session)
        return session

    async def show_once(self, session_id: str, session: Session, secret: str) -> None:
        """Keeps ``secret`` for the next page only."""
        await self._save(session_id, replace(session, new_secret=secret))

    async def take_new_secret(self, session_id: str, session: Session) -> str:
        if not session.new_secret:
            return ""
        await self._save(session_id, replace(session, new_secret=""))
        return session.new_secret

    async def end(self, session_id: str) -> None:
        raw = _decode(session_id)
        if raw is not None:
            await self._backend.delete(_handle(raw))

    async def close(self) -> None:
        await self._backend.close()

    async def _save(self, session_id: str, session: Session) -> None:
        raw = _decode(session_id)
        assert raw is not None
        sealed = SealedSession(
            session.identity,
            _seal(raw, session.api_key),
            _seal(raw, session.new_secret) if session.new_secret else b"",
            session.csrf_token,
            session.created_at,
            session.last_seen_at,
        )
        remaining = min(IDLE_TIMEOUT_S, MAX_AGE_S - (session.last_seen_at - session.created_at))
        await self._backend.put(_handle(raw), sealed, max(remaining, 1.0))


def csrf_matches(session: Session, presented: str) -> bool:
    return hmac.compare_digest(session.csrf_token.encode(), presented.encode())


def _decode(session_id: str) -> bytes | None:
    if not 40 <= len(session_id) <= 64:
        return None
    try:
        raw = base64.urlsafe_b64decode(session_id + "=" * (-len(session_id) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def _handle(raw: bytes) -> str:
    return hashlib.sha256(b"resultity-console-session\0" + raw).hexdigest()


def _cipher(raw: bytes) -> AESGCM:
    return AESGCM(hashlib.sha256(b"resultity-console-key\0" + raw).digest())


def _seal(raw: bytes, text: str) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + _cipher(raw).encrypt(nonce, text.encode(), None)


def _open(raw: bytes, sealed: bytes) -> str:
    return _cipher(raw).decrypt(sealed[:12], sealed[12:], None).decode()
