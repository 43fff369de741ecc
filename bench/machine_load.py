"""The whole machine's load during a benchmark's rounds, and the spread of a measure.

Every benchmark brackets each round with ``MachineLoad.start()`` and ``stop()``
and gets a ``LoadSample``: how many cores the whole machine was busy (from
/proc/stat, so every process counts, not only the benchmark's), how many of them
the benchmark's own processes used (this process and its descendants, extra
roots such as a detached PostgreSQL, and the PostgreSQL backends of its own
databases), how many the shared services it says it uses (the PostgreSQL
server's own processes, which collect the time of backends that ended, and the
Redis and RabbitMQ servers: other users' work on them included), and the rest:
*foreign* load, other people's work. A round whose foreign load averaged
over ``RESULTITY_BENCH_FOREIGN_CORES`` (default 0.25 cores) is flagged; with
``RESULTITY_BENCH_QUIET_WAIT_S`` set, a round waits up to that long for a quiet
second before it starts (``wait_for_quiet``).

``Spread`` states a measure across rounds: median [min..max], standard deviation.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

FOREIGN_CORES_ENV = "RESULTITY_BENCH_FOREIGN_CORES"
QUIET_WAIT_ENV = "RESULTITY_BENCH_QUIET_WAIT_S"
DEFAULT_FOREIGN_CORES = 0.25
QUIET_WINDOW_S = 1.0
# Process names of the shared services a benchmark may declare it uses.
POSTGRES, REDIS, RABBITMQ = "postgres", "redis-server", "beam.smp"
# A PostgreSQL backend's process title names its client: "host(port)" or "[local]";
# the server's own processes (checkpointer, WAL writer, ...) name none.
_BACKEND_TITLE = re.compile(r"\(\d+\)|\[local\]")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_s(stat: Path = Path("/proc/stat")) -> float:
    """CPU seconds the whole machine has been busy since boot, every core together:
    user, nice, system, irq, softirq and steal (guest time is part of user)."""
    fields = stat.read_text().split("\n", 1)[0].split()
    if fields[0] != "cpu":
        raise RuntimeError(f"unexpected first line of {stat}")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


@dataclass(frozen=True)
class _Process:
    role: str  # "own" or "service"
    pid: int
    ppid: int
    cpu_s: float  # its own and its reaped children's


@dataclass(frozen=True)
class Snapshot:
    """The machine when a round starts or ends: busy time, load average, and the CPU
    seconds so far of the processes that count, by (pid, start time)."""

    at: float
    busy_s: float
    loadavg: float
    processes: dict[tuple[int, float], _Process]


@dataclass(frozen=True)
class LoadSample:
    """The machine during one round; cores are CPU seconds per second of the round."""

    wall_s: float
    busy_cores: float
    own_cores: float
    service_cores: float
    loadavg: tuple[float, float]  # 1-minute load average at the start and at the end
    cpus: int
    threshold_cores: float

    @property
    def foreign_cores(self) -> float:
        return max(0.0, self.busy_cores - self.own_cores - self.service_cores)

    @property
    def foreign(self) -> bool:
        return self.foreign_cores > self.threshold_cores

    def describe(self) -> str:
        flag = "  FOREIGN LOAD" if self.foreign else ""
        return (
            f"machine {self.busy_cores:.2f}/{self.cpus} cores busy: own {self.own_cores:.2f}, "
            f"services {self.service_cores:.2f}, foreign {self.foreign_cores:.2f}; load average "
            f"{self.loadavg[0]:.1f}->{self.loadavg[1]:.1f}{flag}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3),
            "busy_cores": round(self.busy_cores, 3),
            "own_cores": round(self.own_cores, 3),
            "service_cores": round(self.service_cores, 3),
            "foreign_cores": round(self.foreign_cores, 3),
            "loadavg_1m": list(self.loadavg),
            "foreign": self.foreign,
        }


@dataclass
class MachineLoad:
    """Measures rounds; ``roots`` are process trees outside this one's that are the
    benchmark's own, ``databases`` the PostgreSQL databases whose backends are,
    ``services`` the process names of the shared services it uses."""

    roots: set[int] = field(default_factory=set)
    databases: set[str] = field(default_factory=set)
    services: frozenset[str] = frozenset()
    threshold_cores: float = field(
        default_factory=lambda: _env_float(FOREIGN_CORES_ENV, DEFAULT_FOREIGN_CORES)
    )
    quiet_wait_s: float = field(default_factory=lambda: _env_float(QUIET_WAIT_ENV, 0.0))
    samples: list[tuple[str, LoadSample]] = field(default_factory=list)

    def start(self) -> Snapshot:
        return self._usage()

    def stop(self, started: Snapshot, label: str = "") -> LoadSample:
        """The sample since ``started``; kept in ``samples`` under ``label`` if given."""
        ended = self._usage()
        wall = max(ended.at - started.at, 1e-9)
        sample = LoadSample(
            wall_s=wall,
            busy_cores=(ended.busy_s - started.busy_s) / wall,
            own_cores=_delta(started.processes, ended.processes, "own") / wall,
            service_cores=_delta(started.processes, ended.processes, "service") / wall,
            loadavg=(started.loadavg, ended.loadavg),
            cpus=psutil.cpu_count() or 1,
            threshold_cores=self.threshold_cores,
        )
        if label:
            self.samples.append((label, sample))
        return sample

    def wait_for_quiet(self) -> None:
        """Up to ``quiet_wait_s`` (0: not at all), until a second passes with foreign
        load under the threshold."""
        deadline = time.monotonic() + self.quiet_wait_s
        while time.monotonic() < deadline:
            started = self.start()
            time.sleep(QUIET_WINDOW_S)
            if not self.stop(started).foreign:
                return

    def flagged(self) -> list[str]:
        return [label for label, sample in self.samples if sample.foreign]

    def summary(self) -> str:
        """One paragraph on the load over every labelled round so far."""
        if not self.samples:
            return "machine load: no rounds recorded"
        foreign = Spread.of(s.foreign_cores for _, s in self.samples)
        own = Spread.of(s.own_cores for _, s in self.samples)
        loads = [v for _, s in self.samples for v in s.loadavg]
        flagged = self.flagged()
        lines = [
            f"machine load over {len(self.samples)} rounds ({self.samples[0][1].cpus} cores): "
            f"foreign {foreign.render('{:.2f}')} cores, own {own.render('{:.2f}')} cores, "
            f"1-min load average {min(loads):.1f}-{max(loads):.1f}",
            f"rounds under foreign load (over {self.threshold_cores:g} cores): "
            + (f"{len(flagged)}: {_listed(flagged)}" if flagged else "none"),
        ]
        return "\n".join(lines)

    def _usage(self) -> Snapshot:
        counted: dict[tuple[int, float], _Process] = {}
        children: dict[int, list[int]] = {}
        processes: dict[int, psutil.Process] = {}
        for process in psutil.process_iter(["ppid", "name", "create_time"]):
            processes[process.pid] = process
            children.setdefault(process.info["ppid"] or 0, []).append(process.pid)
        mine = _descendants({os.getpid(), *self.roots}, children)
        for pid, process in processes.items():
            role = "own" if pid in mine else self._service_role(process)
            if role is None:
                continue
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue  # exited meanwhile
            # A reaped child's time moves to its parent's children's time: see _delta.
            seconds = times.user + times.system + times.children_user + times.children_system
            key = (pid, float(process.info["create_time"] or 0.0))
            counted[key] = _Process(role, pid, int(process.info["ppid"] or 0), seconds)
        return Snapshot(time.monotonic(), machine_busy_s(), os.getloadavg()[0], counted)

    def _service_role(self, process: psutil.Process) -> str | None:
        """ "own" for a backend of one of our databases, "service" for a shared
        service's process, None for anyone else's."""
        name = process.info["name"] or ""
        if name != POSTGRES:
            return "service" if name in self.services else None
        role = postgres_role(process, self.databases)
        if role == "backend":
            return "own"
        return "service" if role == "server" and POSTGRES in self.services else None


def postgres_role(process: psutil.Process, databases: Collection[str]) -> str | None:
    """Of a PostgreSQL server process: "backend" when it serves a client of one of
    ``databases``, "server" for the server itself and its workers, None otherwise."""
    try:
        title = " ".join(process.cmdline())
    except psutil.Error:
        return None
    if not _BACKEND_TITLE.search(title):
        return "server"
    return "backend" if any(database in title for database in databases) else None


def _listed(labels: Sequence[str], shown: int = 8) -> str:
    more = f", and {len(labels) - shown} more" if len(labels) > shown else ""
    return ", ".join(labels[:shown]) + more


def _descendants(roots: set[int], children: dict[int, list[int]]) -> set[int]:
    found, pending = set(), list(roots)
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending.extend(children.get(pid, ()))
    return found


def _delta(
    before: dict[tuple[int, float], _Process], after: dict[tuple[int, float], _Process], role: str
) -> float:
    """CPU seconds of ``role``'s processes between two snapshots. A process started
    since counts whole. One that ended since was reaped by its parent, if that is
    counted too (a PostgreSQL backend by the server, a child by this process): its
    whole time reappears in the parent's, so the part counted before is taken off
    there; one whose parent is not counted is lost for its last interval."""
    total = sum(p.cpu_s - _seconds(before.get(key)) for key, p in after.items() if p.role == role)
    parents = {p.pid: p.role for p in after.values()}
    for key, process in before.items():
        if key not in after and parents.get(process.ppid) == role:
            total -= process.cpu_s
    return total


def _seconds(process: _Process | None) -> float:
    return 0.0 if process is None else process.cpu_s


@dataclass(frozen=True)
class Spread:
    """A measure across rounds."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        collected = tuple(values)
        if not collected:
            raise ValueError("no values")
        return cls(collected)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def render(self, number: str = "{:.1f}") -> str:
        """``median [min..max] sd stdev``; one round: its value."""
        if len(self.values) == 1:
            return number.format(self.median)
        low, high = number.format(self.low), number.format(self.high)
        return f"{number.format(self.median)} [{low}..{high}] sd {number.format(self.stdev)}"

    def as_json(self) -> dict[str, float]:
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "stdev": self.stdev,
            "n": len(self.values),
        }


def clean_or_all(values: Sequence[float], samples: Sequence[LoadSample]) -> tuple[Spread, str]:
    """The spread over the rounds without foreign load, or over all of them (said so)
    when every round had it."""
    clean = [value for value, sample in zip(values, samples, strict=True) if not sample.foreign]
    if clean and len(clean) < len(values):
        return Spread.of(clean), f"{len(clean)} of {len(values)} rounds, without foreign load"
    if clean:
        return Spread.of(clean), f"{len(values)} rounds"
    return Spread.of(values), f"{len(values)} rounds, ALL under foreign load"


def worse(*samples: LoadSample) -> LoadSample:
    """The sample of a pair (or more) of measurements that stands for all of them: under
    foreign load if any of them was."""
    return max(samples, key=lambda sample: sample.foreign_cores - sample.threshold_cores)


# What ``cell`` appends to a spread.
MARKS = "* rounds under foreign load left out; ! every round under foreign load"


def cell(values: Sequence[float], samples: Sequence[LoadSample], number: str = "{:.1f}") -> str:
    """``clean_or_all``'s spread for a table cell, marked as MARKS says."""
    spread, said = clean_or_all(values, samples)
    mark = "!" if "ALL" in said else ("*" if " of " in said else "")
    return spread.render(number) + mark


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {text!r}") from None
