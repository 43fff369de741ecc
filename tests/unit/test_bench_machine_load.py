"""The benchmarks' record of machine load (bench/machine_load.py): whole-machine busy
time, own against foreign CPU, flagged rounds and the spread across rounds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.machine_load import LoadSample, MachineLoad, Spread, clean_or_all, machine_busy_s


def _sample(busy: float, own: float, services: float = 0.0) -> LoadSample:
    return LoadSample(
        wall_s=1.0,
        busy_cores=busy,
        own_cores=own,
        service_cores=services,
        loadavg=(1.0, 1.2),
        cpus=2,
        threshold_cores=0.25,
    )


def test_machine_busy_time_counts_every_state_but_idle_and_iowait(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(f"cpu  {ticks} {ticks} {ticks} 99999 99999 {ticks} {ticks} {ticks} 7 7\n")
    assert machine_busy_s(stat) == pytest.approx(6.0)


def test_load_outside_the_benchmark_and_its_services_is_foreign() -> None:
    quiet = _sample(busy=1.5, own=1.3, services=0.1)
    loaded = _sample(busy=1.9, own=1.3, services=0.1)

    assert quiet.foreign_cores == pytest.approx(0.1)
    assert not quiet.foreign
    assert loaded.foreign_cores == pytest.approx(0.5)
    assert loaded.foreign
    assert "FOREIGN LOAD" in loaded.describe()
    assert "FOREIGN LOAD" not in quiet.describe()


def test_cpu_of_this_process_and_of_a_reaped_child_is_own() -> None:
    load = MachineLoad(threshold_cores=0.25)
    started = load.start()
    began = time.process_time()
    while time.process_time() - began < 0.2:
        pass
    # A child that burns CPU and is reaped within the round counts once.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass",
        ],
        check=True,
    )
    sample = load.stop(started, "round 1")

    assert sample.own_cores * sample.wall_s >= 0.35
    assert sample.own_cores <= sample.busy_cores + 0.05
    assert [label for label, _ in load.samples] == ["round 1"]


def test_the_spread_states_median_range_and_deviation() -> None:
    spread = Spread.of([3.0, 1.0, 2.0])

    assert (spread.median, spread.low, spread.high) == (2.0, 1.0, 3.0)
    assert spread.stdev == pytest.approx(1.0)
    assert spread.render() == "2.0 [1.0..3.0] sd 1.0"
    assert Spread.of([5.0]).render("{:.0f}") == "5"


def test_the_spread_leaves_out_rounds_under_foreign_load_unless_all_were() -> None:
    quiet, loaded = _sample(1.0, 1.0), _sample(2.0, 1.0)

    spread, said = clean_or_all([10.0, 50.0, 12.0], [quiet, loaded, quiet])
    assert spread.values == (10.0, 12.0)
    assert said == "2 of 3 rounds, without foreign load"

    spread, said = clean_or_all([10.0, 50.0], [loaded, loaded])
    assert spread.values == (10.0, 50.0)
    assert "ALL under foreign load" in said
