"""The ledger benchmark's load, as a process: ``python bench/ledger_worker.py DSN``.

Runs the account layer's BillingService (in process, no gRPC) on the database
DSN names. It reads one JSON request a line from stdin and answers each with
one JSON line on stdout; the first line it writes says which checkout's code
it runs:

- ``{"prepare": N}``: starts an account component and funds N accounts and an
  operator (not measured);
- ``{"measure": S}``: N concurrent clients do hold + capture pairs for S
  seconds, each on its own account, every capture split between the operator
  and the platform; the answer ``{"pairs": P, "elapsed": T}`` comes once the
  ledger events of those pairs are relayed, so that relaying them does not
  spill into the next measurement;
- ``{"release": true}``: stops the component, closing its connections. The
  bench samples the machine's load before it: the database backends of a
  stopped component have exited, and their CPU time with them.

bench/ledger.py starts one worker for this checkout's code and, with
``--baseline``, one for another commit's: the worker imports only the ledger's
API (``AccountComponent``, ``BillingService``), so it runs either on the import
path it is given.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass

import asyncpg

from core import event_loop
from core.logging import configure_logging
from server.account import component as account_component
from server.account.authz import Principal
from server.account.component import AccountComponent
from server.account.ledger import SettlementLine
from server.secrets import PlatformSecrets

ADMIN = Principal.service()
POOL_SIZE = 32  # as many connections as the most clients measured


@dataclass
class Prepared:
    component: AccountComponent
    accounts: list[str]
    line: list[SettlementLine]


async def prepare(dsn: str, clients: int) -> Prepared:
    component = await AccountComponent.start(
        dsn, PlatformSecrets.generate(), hold_sweep_interval_s=3600, pool_size=POOL_SIZE
    )
    operator = (await component.service.create_account(ADMIN, "bench-operator")).account_id
    accounts = []
    for _ in range(clients):
        account = str((await component.service.create_account(ADMIN, "bench")).account_id)
        await component.billing.top_up(ADMIN, account, 10**15, uuid.uuid4().hex)
        accounts.append(account)
    line = [SettlementLine(operator, "bench-node", "bench-model", 100)]
    return Prepared(component, accounts, line)


async def pairs(prepared: Prepared, seconds: float) -> tuple[int, float]:
    """Hold + capture pairs done by the prepared clients in ``seconds``."""
    billing = prepared.component.billing
    deadline = time.perf_counter() + seconds
    done = 0

    async def client(account: str) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            hold = await billing.create_hold(ADMIN, account, 10_000, uuid.uuid4().hex, None)
            await billing.settle_hold(ADMIN, str(hold.hold_id), 7_000, prepared.line)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(account) for account in prepared.accounts))
    return done, time.perf_counter() - started


async def relayed(dsn: str, polls: int = 1200) -> None:
    """Returns once the outbox holds no unpublished event (polled every 0.1 s)."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(polls):
            if not await conn.fetchval(
                "SELECT EXISTS (SELECT FROM ledger_outbox WHERE published_at IS NULL)"
            ):
                return
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def serve(dsn: str) -> None:
    _answer({"ready": True, "code": account_component.__file__})
    prepared: Prepared | None = None
    try:
        while line := await asyncio.to_thread(sys.stdin.readline):
            asked = json.loads(line)
            if "prepare" in asked:
                prepared = await prepare(dsn, asked["prepare"])
                _answer({"prepared": True})
            elif "measure" in asked and prepared is not None:
                done, elapsed = await pairs(prepared, asked["measure"])
                await relayed(dsn)
                _answer({"pairs": done, "elapsed": elapsed})
            elif "release" in asked and prepared is not None:
                await prepared.component.stop()
                prepared = None
                _answer({"released": True})
            else:
                raise SystemExit(f"unexpected request: {asked}")
    finally:
        if prepared is not None:
            await prepared.component.stop()


def _answer(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    configure_logging("warning")
    event_loop.run(serve(sys.argv[1]))
