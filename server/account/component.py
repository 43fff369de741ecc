"""The account server as a component: pool, migrations, servicers, sweeper."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import asyncpg
import grpc
import structlog
from resultity.account.v1 import (
    account_service_pb2_grpc,
    api_key_service_pb2_grpc,
    ledger_service_pb2_grpc,
)

from server.account.service import AccountService
from server.account.servicer import AccountServicer, ApiKeyServicer, LedgerServicer
from server.account.store import PostgresAccountStore
from server.common.database import apply_migrations, create_pool, load_migrations

log = structlog.get_logger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


class AccountComponent:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], service: AccountService) -> None:
        self._pool = pool
        self._service = service
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, dsn: str, *, hold_sweep_interval_s: float = 30.0) -> AccountComponent:
        """Connects, migrates, and starts releasing expired holds in the background."""
        pool = await create_pool(dsn)
        try:
            await apply_migrations(pool, load_migrations("account", MIGRATIONS))
        except BaseException:
            await pool.close()
            raise
        component = cls(pool, AccountService(PostgresAccountStore(pool)))
        component._sweeper = asyncio.create_task(
            component._sweep(hold_sweep_interval_s), name="account-hold-sweeper"
        )
        log.info("account component started")
        return component

    @property
    def service(self) -> AccountService:
        return self._service

    def register(self, server: grpc.aio.Server) -> None:
        account_service_pb2_grpc.add_AccountServiceServicer_to_server(
            AccountServicer(self._service), server
        )
        api_key_service_pb2_grpc.add_ApiKeyServiceServicer_to_server(
            ApiKeyServicer(self._service), server
        )
        ledger_service_pb2_grpc.add_LedgerServiceServicer_to_server(
            LedgerServicer(self._service), server
        )

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self._pool.close()
        log.info("account component stopped")

    async def _sweep(self, interval_s: float) -> None:
        while True:
            try:
                await self._service.release_expired_holds()
            except Exception:
                # A failed sweep (database restarting, ...) is retried next round.
                log.exception("releasing expired holds failed")
            await asyncio.sleep(interval_s)
