"""The LLM throughput report: medians, ratios, checks, the table and the JSON.

Sides: direct (llama.cpp in this process), platform (`resultity up`), and, unless
skipped, peer (llama-cpp-python's OpenAI server)."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform as host
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.clients import Sample
from bench.machine_load import LoadSample

METRICS: dict[str, Callable[[Sample], float]] = {
    "ttft_ms": lambda s: s.ttft_s * 1000,
    "decode_tokens_per_s": lambda s: s.decode_tokens_per_s,
    "end_to_end_tokens_per_s": lambda s: s.end_to_end_tokens_per_s,
    "total_ms": lambda s: s.total_s * 1000,
    "tail_ms": lambda s: (s.total_s - s.last_token_s) * 1000,
}
# Which end of a metric's range is its best case (least disturbed by other load).
BEST = {
    "ttft_ms": "min",
    "decode_tokens_per_s": "max",
    "end_to_end_tokens_per_s": "max",
    "total_ms": "min",
    "tail_ms": "min",
}
# Near zero on the direct side: the table shows platform - direct instead of a ratio.
DIFFERENCE_ONLY = {"tail_ms"}
LABELS = {
    "ttft_ms": "TTFT (ms)",
    "decode_tokens_per_s": "decode tokens/s (first->last token)",
    "end_to_end_tokens_per_s": "end-to-end tokens/s (whole request)",
    "total_ms": "request time (ms)",
    "tail_ms": "last token -> end of response (ms)",
}


@dataclass
class Rounds:
    """What the interleaved rounds measured, side by side."""

    direct: list[Sample] = field(default_factory=list)
    platform: list[Sample] = field(default_factory=list)
    direct_cpu: list[dict[str, float]] = field(default_factory=list)
    platform_cpu: list[dict[str, float]] = field(default_factory=list)
    warmup: dict[str, Sample] = field(default_factory=dict)
    idle_waits_s: list[float] = field(default_factory=list)
    direct_load: list[LoadSample] = field(default_factory=list)
    platform_load: list[LoadSample] = field(default_factory=list)
    peer: list[Sample] = field(default_factory=list)
    peer_cpu: list[dict[str, float]] = field(default_factory=list)
    peer_load: list[LoadSample] = field(default_factory=list)

    def counted(self) -> tuple[list[int], str]:
        """Indices of the rounds the medians use: those whose two sides ran without
        foreign load, or every round when none did (and what was used, in words)."""
        every = list(range(len(self.platform)))
        sides = [self.direct_load, self.platform_load] + ([self.peer_load] if self.peer else [])
        clean = [i for i in every if not any(side[i].foreign for side in sides)]
        if not clean:
            return every, f"all {len(every)} rounds, EVERY ONE UNDER FOREIGN LOAD"
        if len(clean) < len(every):
            return clean, f"{len(clean)} of {len(every)} rounds (the others under foreign load)"
        return every, f"all {len(every)} rounds (none under foreign load)"


def _summary(samples: list[Sample]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, metric in METRICS.items():
        values = [metric(sample) for sample in samples]
        out[name] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return out


def build_report(config: dict[str, Any], rounds: Rounds) -> dict[str, Any]:
    """Medians, ranges and ratios over the rounds ``Rounds.counted`` picks; the checks
    over every round."""
    used, used_said = rounds.counted()
    direct = _summary([rounds.direct[i] for i in used])
    platform = _summary([rounds.platform[i] for i in used])
    ratios = {name: _ratio(platform[name]["median"], direct[name]["median"]) for name in METRICS}
    best = {name: _ratio(platform[name][BEST[name]], direct[name][BEST[name]]) for name in METRICS}
    # Every side of a round got the same prompt (cold rounds differ from each other).
    sides = [side for side in (rounds.direct, rounds.platform, rounds.peer) if side]
    each_round = list(zip(*sides, strict=True))
    prompt_tokens = sorted({s.prompt_tokens for s in rounds.platform if s.prompt_tokens})
    checks = {
        "completion_tokens_direct": sorted({s.completion_tokens for s in rounds.direct}),
        "completion_tokens_platform": sorted({s.completion_tokens for s in rounds.platform}),
        "completion_tokens_match": all(
            len({s.completion_tokens for s in samples}) == 1 for samples in each_round
        ),
        "prompt_tokens_platform": prompt_tokens,
        "prompt_tokens_match": prompt_tokens == [config["prompt_tokens_direct"]],
        "same_text_each_round": all(len({s.text for s in samples}) == 1 for samples in each_round),
        "distinct_texts": len({s.text for s in rounds.platform}),
        "platform_content_deltas": sorted({s.content_deltas for s in rounds.platform}),
    }
    cpu = {
        "direct": _cpu_summary([rounds.direct_cpu[i] for i in used]),
        "platform": _cpu_summary([rounds.platform_cpu[i] for i in used]),
    }
    peer: dict[str, Any] = {}
    if rounds.peer:
        peer_median = _summary([rounds.peer[i] for i in used])
        checks["completion_tokens_peer"] = sorted({s.completion_tokens for s in rounds.peer})
        cpu["peer"] = _cpu_summary([rounds.peer_cpu[i] for i in used])
        peer = {
            "peer": {"median": peer_median, "samples": [_sample_json(s) for s in rounds.peer]},
            "ratio_platform_to_peer": {
                name: _ratio(platform[name]["median"], peer_median[name]["median"])
                for name in METRICS
            },
        }
    return {
        "benchmark": "llm_throughput",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": config,
        "rounds_completed": len(rounds.platform),
        "rounds_used": used_said,
        "machine_load": {
            "direct": [load.as_json() for load in rounds.direct_load],
            "platform": [load.as_json() for load in rounds.platform_load],
            "peer": [load.as_json() for load in rounds.peer_load],
        },
        "direct": {"median": direct, "samples": [_sample_json(s) for s in rounds.direct]},
        "platform": {"median": platform, "samples": [_sample_json(s) for s in rounds.platform]},
        "warmup": {name: _sample_json(s) for name, s in rounds.warmup.items()},
        "ratio_platform_to_direct": ratios,
        "ratio_best_case": best,
        "ttft_overhead_ms": platform["ttft_ms"]["median"] - direct["ttft_ms"]["median"],
        "checks": checks,
        "cpu_seconds_per_completion": cpu,
        "max_idle_wait_s": max(rounds.idle_waits_s, default=0.0),
        **peer,
    }


def _ratio(platform: float, direct: float) -> float:
    return platform / direct if direct else math.nan


def _cpu_summary(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Median CPU seconds of each role (and of all together) per completion."""
    totals = [{**used, "total": sum(used.values())} for used in rounds]
    return {role: statistics.median(used[role] for used in totals) for role in totals[0]}


def _sample_json(sample: Sample) -> dict[str, Any]:
    fields = asdict(sample)
    fields.pop("text")
    fields["decode_tokens_per_s"] = sample.decode_tokens_per_s
    fields["end_to_end_tokens_per_s"] = sample.end_to_end_tokens_per_s
    return fields


def _machine() -> dict[str, Any]:
    cpu = host.processor() or host.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "commit": _commit(),
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)),
        "system": host.platform(),
        "python": host.python_version(),
        "llama_cpp_python": metadata.version("llama_cpp_python"),
    }


def _commit() -> str | None:
    """The checked-out commit, marked ``-dirty`` when the tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def render(report: dict[str, Any]) -> str:
    config, checks = report["config"], report["checks"]
    machine = report["machine"]
    lines = [
        f"LLM throughput: platform vs llama.cpp direct"
        f"{' and its OpenAI server (peer)' if 'peer' in report else ''} ({report['date']})",
        f"  model     {config['model_id']} ({config['model_file']}), greedy, "
        f"max_tokens {config['max_tokens']}, prompt {config['prompt_tokens_direct']} tokens",
        f"  cache     {config['cache']}: {config['cache_conditions']}",
        f"  llama.cpp n_threads {config['n_threads']}, n_threads_batch "
        f"{config['n_threads_batch']}, n_ctx {config['n_ctx']}, cpu_repack "
        f"{config['cpu_repack']}, 1 slot",
        f"  machine   {machine['cpus']} CPUs ({machine['cpu']}), llama-cpp-python "
        f"{machine['llama_cpp_python']}, commit {machine['commit']}",
        f"  rounds    {report['rounds_completed']} per side (+{config['warmup']} warm-up), "
        f"interleaved; median [min..max] over {report['rounds_used']}",
        "",
        f"{'metric':38}{'direct':>26}{'platform':>26}{'ratio':>8}{'best':>7}"
        + (f"{'peer':>26}{'p/peer':>8}" if "peer" in report else ""),
    ]
    for name, label in LABELS.items():
        d, p = report["direct"]["median"][name], report["platform"]["median"][name]
        if name in DIFFERENCE_ONLY:
            ratios = f"{p['median'] - d['median']:>+8.1f}{p[BEST[name]] - d[BEST[name]]:>+7.1f}"
        else:
            ratios = (
                f"{report['ratio_platform_to_direct'][name]:>8.3f}"
                f"{report['ratio_best_case'][name]:>7.3f}"
            )
        if "peer" in report:
            peer = report["peer"]["median"][name]
            versus = (
                f"{p['median'] - peer['median']:>+8.1f}"
                if name in DIFFERENCE_ONLY
                else f"{report['ratio_platform_to_peer'][name]:>8.3f}"
            )
            ratios += f"{_cell(peer):>26}{versus}"
        lines.append(f"{label:38}{_cell(d):>26}{_cell(p):>26}{ratios}")
    lines += [
        "ratio = platform/direct of the medians; best = of the best cases (min time, max rate);",
        "for the time after the last token (about 0 direct) the difference in ms instead",
        *(
            [
                "peer = llama-cpp-python's OpenAI server, p/peer = platform/peer of the medians",
                "(for the time after the last token, platform - peer in ms)",
            ]
            if "peer" in report
            else []
        ),
        "",
        f"TTFT overhead (median difference): {report['ttft_overhead_ms']:+.1f} ms",
        f"completion tokens: direct {checks['completion_tokens_direct']} (streamed chunks), "
        f"platform {checks['completion_tokens_platform']} (usage) -> "
        f"{'match in every round' if checks['completion_tokens_match'] else 'DIFFER'}",
        f"prompt tokens: direct {config['prompt_tokens_direct']}, platform "
        f"{checks['prompt_tokens_platform']} -> "
        f"{'match' if checks['prompt_tokens_match'] else 'DIFFER'}",
        f"generated text identical on every side in each round: "
        f"{'yes' if checks['same_text_each_round'] else 'NO'} "
        f"({checks['distinct_texts']} distinct texts over the rounds)",
        f"platform SSE content deltas per completion: {checks['platform_content_deltas']}",
        *(
            [f"completion tokens, peer (streamed chunks): {checks['completion_tokens_peer']}"]
            if "peer" in report
            else []
        ),
        _render_cpu(report["cpu_seconds_per_completion"]),
        f"disguised canaries the network sent the node during the run: "
        f"{config['platform_canaries']}; longest wait for an idle platform before a round: "
        f"{report['max_idle_wait_s']:.1f} s",
        f"platform started in {config['platform_start_s']} s; whole run {report['wall_s']} s",
    ]
    return "\n".join(lines)


def _render_cpu(cpu: dict[str, dict[str, float]]) -> str:
    direct, platform = cpu["direct"], cpu["platform"]
    parts = ", ".join(
        f"{role} {platform[role]:.2f}"
        for role in ("agent", "up", "postgres", "bench")
        if role in platform
    )
    ratio = platform["total"] / direct["total"] if direct["total"] else math.nan
    peer = (
        f"; peer {cpu['peer']['total']:.2f} (server {cpu['peer']['peer']:.2f} + HTTP client)"
        if "peer" in cpu
        else ""
    )
    return (
        f"CPU s per completion (median): direct {direct['total']:.2f} (this process); "
        f"platform {platform['total']:.2f} = {parts} (bench = HTTP client) -> {ratio:.2f}x{peer}"
    )


def _cell(stats: dict[str, float]) -> str:
    return f"{stats['median']:.1f} [{stats['min']:.1f}..{stats['max']:.1f}]"
