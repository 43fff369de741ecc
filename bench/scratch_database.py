"""A throwaway PostgreSQL database for a benchmark's servers."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from server.common.database import EmbeddedPostgres


def _with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


@contextlib.asynccontextmanager
async def scratch_database(base: str | None = None) -> AsyncIterator[str]:
    """A new database on the server of ``base``, else of RESULTITY_DATABASE_URL, else on an
    embedded one; dropped after."""
    base = base or os.environ.get("RESULTITY_DATABASE_URL")
    async with contextlib.AsyncExitStack() as stack:
        if base is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="resultity-bench-"))
            embedded = EmbeddedPostgres(Path(tmp) / "pg")
            base = await embedded.start("postgres")
            stack.push_async_callback(embedded.stop)
        scratch = f"resultity_bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(base)
        stack.push_async_callback(admin.close)
        await admin.execute(f'CREATE DATABASE "{scratch}"')
        try:
            yield _with_database(base, scratch)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
