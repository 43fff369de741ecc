"""Integration tests: real services as separate processes, on the PostgreSQL,
Redis and RabbitMQ named by RESULTITY_DATABASE_URL, RESULTITY_REDIS_URL and
RESULTITY_AMQP_URL (loopback defaults; Redis's fixture is in tests/conftest.py).

They are left out of the ordinary run (marker ``integration``; `make
test-integration` runs them). A service that does not answer fails the run: an
integration test that skips proves nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from core.namespace import AmqpNames, RedisNames
from tests.namespaces import forget_amqp, forget_redis

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# AMQP 0-9-1's protocol header; a broker answers it with Connection.Start.
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The broker of integration tests; fails the test when it does not speak AMQP."""
    url = os.environ.get("RESULTITY_AMQP_URL", DEFAULT_AMQP_URL)
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 5672), timeout=5) as conn:
            conn.sendall(_AMQP_HEADER)
            frame = conn.recv(7)
    except OSError as error:
        pytest.fail(
            f"RabbitMQ at {url} is unreachable ({error}); start it or set RESULTITY_AMQP_URL"
        )
    # A method frame (type 1) on channel 0: Connection.Start.
    if frame[:3] != b"\x01\x00\x00":
        pytest.fail(f"{url} does not answer as an AMQP 0-9-1 broker")
    return url


@pytest.fixture(scope="session", autouse=True)
def services(redis_url: str, amqp_url: str) -> None:
    """Every service the integration tests may use answers, or the run fails here
    (PostgreSQL: when a test asks for a database)."""


@pytest.fixture
async def redis_names(redis_url: str, namespace: str) -> AsyncIterator[RedisNames]:
    """The Redis names of the test's own namespace, its keys deleted afterwards."""
    yield RedisNames(namespace)
    await forget_redis(redis_url, namespace)


@pytest.fixture
async def amqp_names(amqp_url: str, namespace: str) -> AsyncIterator[AmqpNames]:
    """The RabbitMQ names of the test's own namespace, its queues and exchanges
    deleted afterwards."""
    names = AmqpNames(namespace)
    yield names
    await forget_amqp(amqp_url, names)


@contextlib.asynccontextmanager
async def _fresh_database() -> AsyncIterator[str]:
    """A new, empty database on the real PostgreSQL, dropped afterwards."""
    base = os.environ.get("RESULTITY_DATABASE_URL", DEFAULT_DATABASE_URL)
    name = f"resultity_it_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(base, timeout=5)
    except (OSError, asyncpg.PostgresError) as error:
        pytest.fail(
            f"PostgreSQL at {base} is unreachable ({error}); start it or set RESULTITY_DATABASE_URL"
        )
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(base)._replace(path=f"/{name}"))
    finally:
        admin = await asyncpg.connect(base)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    """A database of the test's own."""
    async with _fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
async def integration_database() -> AsyncIterator[str]:
    """A database for a module's platform, shared by its tests."""
    async with _fresh_database() as url:
        yield url
