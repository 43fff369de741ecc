"""The console session backend's contract (gateway/console/sessions.py), held by every
adapter: a test module subclasses ``SessionBackendContract`` and provides two
fixtures, ``backend`` and ``other_gateway`` (a second backend over the same storage,
as another gateway replica has)."""

from __future__ import annotations

import asyncio

from gateway.console.sessions import (
    Identity,
    SealedSession,
    SessionBackend,
    SessionStore,
    csrf_matches,
)

IDENTITY = Identity("acct", "Ada Lovelace", admin=True, key_prefix="rsk_abc")
KEY = "rsk_" + "k" * 40


def sealed(last_seen_at: float = 2.0) -> SealedSession:
    return SealedSession(IDENTITY, b"\x00sealed-key\xff", b"", "csrf-token", 1.0, last_seen_at)


class SessionBackendContract:
    async def test_a_session_is_read_back_as_stored(self, backend: SessionBackend) -> None:
        stored = sealed()
        await backend.put("h1", stored, ttl_s=60)
        assert await backend.get("h1") == stored
        assert await backend.get("h2") is None

    async def test_a_newer_session_replaces_the_older(self, backend: SessionBackend) -> None:
        await backend.put("h1", sealed(2.0), ttl_s=60)
        await backend.put("h1", sealed(3.0), ttl_s=60)
        found = await backend.get("h1")
        assert found is not None
        assert found.last_seen_at == 3.0

    async def test_a_deleted_session_is_gone(self, backend: SessionBackend) -> None:
        await backend.put("h1", sealed(), ttl_s=60)
        await backend.delete("h1")
        await backend.delete("never-stored")
        assert await backend.get("h1") is None

    async def test_a_session_is_gone_once_its_ttl_passed(self, backend: SessionBackend) -> None:
        await backend.put("h1", sealed(), ttl_s=0.05)
        async with asyncio.timeout(10):  # bounds a broken test only
            while await backend.get("h1") is not None:  # noqa: ASYNC110 - the store expires it
                await asyncio.sleep(0.02)

    async def test_another_gateway_serves_the_same_browser(
        self, backend: SessionBackend, other_gateway: SessionBackend
    ) -> None:
        signed_in_here, elsewhere = SessionStore(backend), SessionStore(other_gateway)
        session_id = await signed_in_here.create(IDENTITY, KEY)
        found = await elsewhere.get(session_id)
        assert found is not None
        assert (found.identity, found.api_key) == (IDENTITY, KEY)
        assert csrf_matches(found, found.csrf_token)
        await elsewhere.show_once(session_id, found, "rsk_new_secret")
        again = await signed_in_here.get(session_id)
        assert again is not None
        assert await signed_in_here.take_new_secret(session_id, again) == "rsk_new_secret"
        await elsewhere.end(session_id)
        assert await signed_in_here.get(session_id) is None
