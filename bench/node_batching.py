"""Node batching: one llama.cpp runtime's throughput, memory and follow-up TTFT by slots.

Each configuration runs in a fresh process (bench/node_batching_run.py), so its
peak RSS is its own: the runtime with 1 slot, with ``--slots`` slots batched in
one context, optionally the same with the weights converted to Q8_0 (llama.cpp
has batched matmul kernels for Q8_0 on x86, none for the bundled Q4_1), and
with ``--baseline REV`` that commit's runtime with 1 slot. Rounds run every
configuration in turn and record the machine's load (bench/machine_load.py);
the report gives medians over the rounds without foreign load.

    python -m bench.node_batching --baseline main --rounds 3

Method and results: bench/README.md, "Node batching".
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as llama_lib

from agent.runtime.models import smollm2_gguf_path
from bench.ledger import baseline_checkout
from bench.machine_load import MARKS, LoadSample, MachineLoad, cell, clean_or_all

REPO = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("node_batching_run.py")


@dataclass
class Config:
    name: str
    tree: Path
    slots: int
    model: Path | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    samples: list[LoadSample] = field(default_factory=list)


def _q8_0_copy(folder: Path) -> Path:
    """The bundled GGUF with its weights converted to Q8_0 (llama.cpp's quantize)."""
    target = folder / "smollm2-q8_0.gguf"
    params = llama_lib.llama_model_quantize_default_params()
    params.ftype = llama_lib.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    code = llama_lib.llama_model_quantize(
        str(smollm2_gguf_path()).encode(), str(target).encode(), ctypes.byref(params)
    )
    if code != 0:
        raise SystemExit(f"converting the weights to Q8_0 failed ({code})")
    return target


def _run(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{config.tree}{os.pathsep}{config.tree / 'generated'}"}
    command = [
        sys.executable,
        str(RUNNER),
        "--slots",
        str(config.slots),
        "--threads",
        str(args.threads),
        "--max-tokens",
        str(args.max_tokens),
        "--streams",
        *(str(n) for n in args.streams),
    ]
    if config.model is not None:
        command += ["--model", str(config.model)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{config.name} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _rate(result: dict[str, Any], streams: int, key: str = "tokens_per_s") -> float:
    rate: float = next(r[key] for r in result["throughput"] if r["streams"] == streams)
    return rate


def _report(configs: list[Config], args: argparse.Namespace, load: MachineLoad) -> str:
    lines = [
        f"node batching: SmolLM2-135M-Instruct, {args.threads} llama.cpp thread(s), "
        f"greedy, {args.max_tokens} tokens per stream, {len(configs[0].results)} rounds",
        "",
        "| configuration | "
        + " | ".join(f"tokens/s, {n} stream(s)" for n in args.streams)
        + f" | CPU ms/token, {max(args.streams)} streams"
        + " | TTFT cold (s) | TTFT follow-up (s) | peak RSS (MB) |",
        "|---" * (len(args.streams) + 5) + "|",
    ]
    for config in configs:
        row = [config.name]
        row += [cell([_rate(r, n) for r in config.results], config.samples) for n in args.streams]
        most = max(args.streams)
        cpu = [_rate(r, most, "cpu_ms_per_token") for r in config.results]
        row.append(cell(cpu, config.samples))
        for key, number in (
            ("ttft_cold_s", "{:.2f}"),
            ("ttft_follow_up_s", "{:.2f}"),
            ("peak_rss_mb", "{:.0f}"),
        ):
            row.append(cell([r[key] for r in config.results], config.samples, number))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", MARKS, "", *_ratios(configs, args), "", load.summary()]
    return "\n".join(lines)


def _median(config: Config, value: Any) -> float:
    spread, _ = clean_or_all([value(r) for r in config.results], config.samples)
    return spread.median


def _ratios(configs: list[Config], args: argparse.Namespace) -> list[str]:
    """Medians' ratios: each configuration's throughput at the most streams to the
    reference's (the baseline commit, else this runtime's 1 slot), its peak RSS to
    the 1 slot's, and its follow-up TTFT to its cold TTFT."""
    streams = max(args.streams)
    reference = configs[0]
    one_slot = next(c for c in configs if c.name == "1 slot")
    lines = []
    for config in configs[1:]:
        rate = _median(config, lambda r: _rate(r, streams))
        base = _median(reference, lambda r: _rate(r, streams))
        cpu = _median(reference, lambda r: _rate(r, streams, "cpu_ms_per_token")) / _median(
            config, lambda r: _rate(r, streams, "cpu_ms_per_token")
        )
        peak = _median(config, lambda r: r["peak_rss_mb"])
        rss = peak / _median(one_slot, lambda r: r["peak_rss_mb"])
        rss_reference = peak / _median(reference, lambda r: r["peak_rss_mb"])
        ttft = _median(config, lambda r: r["ttft_follow_up_s"]) / _median(
            config, lambda r: r["ttft_cold_s"]
        )
        lines.append(
            f"{config.name}: {rate / base:.2f}x the tokens/s of {reference.name} at {streams} "
            f"streams ({cpu:.2f}x its tokens per CPU second); peak RSS {rss:.2f}x 1 slot's "
            f"({rss_reference:.2f}x {reference.name}'s); "
            f"follow-up TTFT {ttft:.2f}x cold"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.node_batching", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama.cpp threads (1: on a shared machine, more threads wait on each other)",
    )
    parser.add_argument("--baseline", metavar="REV", help="also measure this commit, 1 slot")
    parser.add_argument("--no-q8", action="store_true", help="skip the Q8_0 weights")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        configs = []
        if args.baseline:
            commit, folder = stack.enter_context(baseline_checkout(args.baseline))
            configs.append(Config(f"baseline {commit}, 1 slot", folder, 1))
        configs += [Config("1 slot", REPO, 1), Config(f"{args.slots} slots", REPO, args.slots)]
        if not args.no_q8:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rs-q8-")))
            q8 = _q8_0_copy(scratch)
            configs.append(Config(f"{args.slots} slots, Q8_0 weights", REPO, args.slots, q8))
        load = MachineLoad()
        for round_number in range(1, args.rounds + 1):
            for config in configs:
                load.wait_for_quiet()
                started = load.start()
                result = _run(config, args)
                config.samples.append(load.stop(started, f"{config.name} #{round_number}"))
                config.results.append(result)
                print(f"round {round_number}: {config.name}: {json.dumps(result)}", flush=True)
        print(_report(configs, args, load))
        if args.json is not None:
            data = {c.name: c.results for c in configs}
            args.json.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
