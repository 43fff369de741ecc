"""Fixtures shared by all tests.

PostgreSQL is real everywhere: the server named by RESULTITY_DATABASE_URL when
set (CI points it at the machine's PostgreSQL), otherwise an embedded server
started for the test session. Each session works in a fresh database.

Redis is needed only by tests marked ``integration`` (`make test-integration`):
the server named by RESULTITY_REDIS_URL, loopback by default. Unreachable, those
tests fail; they never skip. Each test keeps to a namespace of its own there
(``namespace``; tests/namespaces.py).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis
from hypothesis import settings

from core import event_loop
from server.common.database import EmbeddedPostgres
from tests.namespaces import new_namespace

# Hypothesis's per-example deadline is a timing threshold: on a shared machine
# a slow example is load, not a bug.
settings.register_profile("resultity", deadline=None)
settings.load_profile("resultity")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on the event loop every process of the platform runs on."""
    return {"event_loop": event_loop.new_event_loop}


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis of integration tests; fails the test when it does not answer."""
    url = os.environ.get("RESULTITY_REDIS_URL", DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as error:
        pytest.fail(f"Redis at {url} is unreachable ({error}); start it or set RESULTITY_REDIS_URL")
    finally:
        client.close()
    return url


@pytest.fixture
def namespace() -> str:
    """The test's own namespace in the shared Redis and RabbitMQ."""
    return new_namespace()


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
async def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """DSN of a new, empty database, dropped when the session ends."""
    database = f"resultity_test_{uuid.uuid4().hex[:12]}"
    base = os.environ.get("RESULTITY_DATABASE_URL")
    embedded: EmbeddedPostgres | None = None
    if base is None:
        embedded = EmbeddedPostgres(Path(tmp_path_factory.mktemp("pg")) / "data")
        base = await embedded.start("postgres")
    admin = await asyncpg.connect(base)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    try:
        yield _with_database(base, database)
    finally:
        admin = await asyncpg.connect(base)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()
        if embedded is not None:
            await embedded.stop()
