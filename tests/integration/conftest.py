"""Integration tests: real services as separate processes, on the PostgreSQL, Redis
and RabbitMQ named by RESULTITY_DATABASE_URL, RESULTITY_REDIS_URL and
RESULTITY_AMQP_URL (loopback defaults).

They are left out of the ordinary run (marker ``integration``; `make
test-integration` runs them). A service that does not answer fails the run: an
integration test that skips proves nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
import redis.asyncio as redis

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
async def redis_url() -> str:
    url = os.environ.get("RESULTITY_REDIS_URL", DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url)
    try:
        await client.ping()
    except (redis.RedisError, OSError) as error:
        pytest.fail(f"Redis at {url} is unreachable ({error}); start it or set RESULTITY_REDIS_URL")
    finally:
        await client.aclose()
    return url


@pytest.fixture(scope="session")
async def amqp_url() -> str:
    url = os.environ.get("RESULTITY_AMQP_URL", DEFAULT_AMQP_URL)
    try:
        connection = await aio_pika.connect(url, timeout=5)
    except Exception as error:
        pytest.fail(
            f"RabbitMQ at {url} is unreachable ({error}); start it or set RESULTITY_AMQP_URL"
        )
    await connection.close()
    return url


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
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
