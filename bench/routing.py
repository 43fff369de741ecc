"""Routing decision time at 100, 1,000 and 10,000 simulated nodes (`python -m bench.routing`).

No network: NodeSessions are built in memory and registered with the
network's Router. Each decision is one ``Router.pick`` for a job (filters,
scorers, round-robin bookkeeping); the picked node's load is then changed
the way an assignment and a later completion change it, so loads vary during
the run. Nodes serve one of four models (a quarter of the fleet each) except
``--one-model``, where every node serves the same model; a tenth of the nodes
are draining or suspect and must be skipped.

Each operator runs ten nodes, each node declares one of four regions;
reputations are spread over [0.6, 1] and one node in twenty has failed a
canary. Each size is measured with three kinds of requests: no requirements,
one region (a quarter of the nodes), and a subcloud's rules (5 operators, so
50 nodes whatever the fleet's size, two regions, reputation at least 0.7,
verified only: about 18 eligible nodes, four or five per model). A decision
that finds no eligible node counts as a miss (it is timed too).

``--replicas N`` spreads the fleet over N network replicas and measures one of
them: it holds its share as local sessions and the rest as remote nodes built
from the other replicas' presence records (in-process presence, followed by
``RemoteNodes.update`` as a heartbeat-cadence refresh does); a remote pick is
reserved the way a forwarded job reserves it. Every 1,000 decisions the view
reads every record again (a full refresh: a replica's first, or one after its
cursor was lost) and then, once ``--changed`` percent of the remote records
changed, only those (a delta refresh: every other one). Both are timed apart
from the decisions, the view's update alone: reading the records from Redis
costs their decoding on top, for as many records as the refresh reads.

``--conversations`` makes every request a chat turn carrying the fingerprints
of its CONVERSATION_MESSAGES messages' prefixes, and every node advertise
MAX_ADVERTISED_PREFIXES cached conversations; half the requests continue a
conversation one node of their model holds (its first CONVERSATION_MESSAGES
- 1 messages), so the prefix scorer finds a hit on that node, a candidate
whatever the pool's size (the router adds the holders of a request's longest
prefixes to its sample), and misses on every other node. For those continued
turns the run counts how affinity fared (routing.Affinity): hit, passed over
(the holder was busier, or had no free slot) or miss (the holder is draining,
suspect or outside the request's rules). Fingerprinting a request's messages
(once per job, in dispatch) is timed apart.

The decisions of each case and size are split in ``--rounds`` rounds, each with
the machine's load (bench/machine_load.py): p50/p99 over all decisions, then
each round's across rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from bench.machine_load import MARKS, LoadSample, MachineLoad, cell
from core.inference import ChatMessage, ChatRole, GenerationSpec, NodeRequirements, Sampling
from core.prompt_prefixes import MAX_ADVERTISED_PREFIXES
from server.network.nodes import ModelStatus, ModelValidation, NodeHello, NodeModel, NodeSession
from server.network.presence import InProcessPresence, NodePresence
from server.network.remote_nodes import RemoteNode, RemoteNodes
from server.network.routable import RoutableNode
from server.network.routing import (
    NO_REQUIREMENTS,
    Affinity,
    Router,
    RouteRequest,
    job_prefixes,
)

MODELS = ("model-a", "model-b", "model-c", "model-d")
REGIONS = ("eu-west", "us-east", "us-west", "ap-south")
NODES_PER_OPERATOR = 10
SUSPECT_AFTER_S = 15.0
# Messages of a --conversations request, and how many different ones there are.
CONVERSATION_MESSAGES = 8
CONVERSATIONS = 1_000
CASES = {
    "any node": NO_REQUIREMENTS,
    "one region": NodeRequirements(regions=frozenset({"eu-west"})),
    "subcloud": NodeRequirements(
        operator_account_ids=frozenset(f"op-{i}" for i in range(5)),
        regions=frozenset({"eu-west", "us-east"}),
        min_reputation=0.7,
        verified_only=True,
    ),
}


def _fleet(size: int, models: Sequence[str], rng: random.Random) -> list[NodeSession]:
    now = time.monotonic()
    nodes = []
    for index in range(size):
        model = models[index % len(models)]
        hello = NodeHello(
            f"n{index}",
            "bench",
            (NodeModel(model, "rt", 4096),),
            rng.choice((1, 2, 4)),
            region=rng.choice(REGIONS),
        )
        operator = f"op-{index // NODES_PER_OPERATOR}"
        node = NodeSession(node_id=f"node-{index}", hello=hello, operator_account_id=operator)
        node.recent_tokens_per_second = rng.uniform(5.0, 80.0)
        node.standing.reputation = rng.uniform(0.6, 1.0)
        node.standing.failed_canary = rng.random() < 0.05
        if index % 20 == 0:
            node.draining = True
        elif index % 20 == 1:
            node.last_seen = now - SUSPECT_AFTER_S - 1
        nodes.append(node)
    return nodes


def _record(node: NodeSession, replica: int, now: float) -> NodePresence:
    """The presence record replica ``replica`` would publish for ``node``."""
    for model in node.models:
        node.model_status[model] = ModelStatus(ModelValidation.UNCHECKED)
    return NodePresence(
        node_id=node.node_id,
        replica_id=f"replica-{replica}",
        replica_address=f"replica-{replica}:50051",
        state=node.state(time.monotonic(), SUSPECT_AFTER_S),
        models=tuple(sorted(node.models)),
        region=node.region,
        operator_account_id=node.operator_account_id,
        reputation=node.standing.reputation,
        verified=node.verified,
        active_jobs=0,
        max_concurrent_jobs=node.hello.max_concurrent_jobs,
        recent_tokens_per_second=node.recent_tokens_per_second,
        connected_at=now,
        published_at=now,
        expires_at=now + 3600,
        cached_prefixes=tuple(node.cached_prefixes),
    )


def _conversation(index: int) -> tuple[ChatMessage, ...]:
    roles = (ChatRole.USER, ChatRole.ASSISTANT)
    return tuple(
        ChatMessage(roles[turn % 2], f"conversation {index}, message {turn}: " + "words " * 60)
        for turn in range(CONVERSATION_MESSAGES)
    )


def _requests(
    nodes: Sequence[NodeSession],
    models: Sequence[str],
    requirements: NodeRequirements,
    conversations: bool,
    rng: random.Random,
) -> tuple[list[RouteRequest], list[float]]:
    """The requests the decisions cycle through, and with --conversations the
    time (µs) fingerprinting each one's messages took."""
    if not conversations:
        return [RouteRequest(model, requirements=requirements) for model in models], []
    for node in nodes:
        node.cached_prefixes = frozenset(
            rng.getrandbits(64) for _ in range(MAX_ADVERTISED_PREFIXES)
        )
    serving = {model: [node for node in nodes if model in node.models] for model in models}
    requests, timings = [], []
    for index in range(CONVERSATIONS):
        model = models[index % len(models)]
        spec = GenerationSpec(model, _conversation(index), Sampling(max_tokens=64), 4096)
        started = time.perf_counter_ns()
        prefixes = job_prefixes(spec)
        timings.append((time.perf_counter_ns() - started) / 1000)
        if _continued(index):
            holder = rng.choice(serving[model])
            held = set(holder.cached_prefixes)
            held.pop()
            holder.cached_prefixes = frozenset({*held, prefixes[-2]})
        requests.append(RouteRequest(model, requirements=requirements, prefixes=prefixes))
    return requests, timings


def _continued(position: int) -> bool:
    """Whether the --conversations request at ``position`` continues a conversation
    a node holds."""
    return position % 2 == 1


@dataclass(frozen=True)
class Round:
    p50_us: float
    p99_us: float
    load: LoadSample


def measure(
    size: int,
    decisions: int,
    models: Sequence[str],
    requirements: NodeRequirements = NO_REQUIREMENTS,
    seed: int = 1,
    replicas: int = 1,
    rounds: int = 1,
    load: MachineLoad | None = None,
    conversations: bool = False,
    changed: float = 1.0,
) -> tuple[dict[str, float], list[Round]]:
    """Decision times over all ``decisions`` and per round (``decisions / rounds``
    each, with the machine's load); with ``replicas`` above 1, as seen by one of them,
    ``changed`` percent of the remote records changing between two delta refreshes."""
    load = load or MachineLoad()
    rng = random.Random(seed)
    router = Router(suspect_after_s=SUSPECT_AFTER_S, rng=random.Random(seed))
    records = []
    wall_now = time.time()
    beating: list[NodeSession] = []  # this replica's nodes that are not meant to be suspect
    fleet = _fleet(size, models, rng)
    requests, fingerprinting = _requests(fleet, models, requirements, conversations, rng)
    for index, node in enumerate(fleet):
        if index % replicas == 0:
            router.add(node)
            if index % 20 != 1:
                beating.append(node)
        else:
            records.append(_record(node, index % replicas, wall_now))
    remote = RemoteNodes(router, "replica-0", is_local=lambda node_id: False)
    presence = InProcessPresence()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(presence.publish(records))
    full: list[float] = []
    delta: list[float] = []
    changing = random.Random(seed + 1)  # apart from ``rng``: the decisions stay as they were

    def refresh() -> None:
        """A full refresh, then a delta one after ``changed`` percent of the records changed."""
        changes = loop.run_until_complete(presence.changes(None))
        started = time.perf_counter_ns()
        remote.update(changes)
        full.append((time.perf_counter_ns() - started) / 1e6)
        for index in changing.sample(range(len(records)), round(len(records) * changed / 100)):
            record = records[index]
            records[index] = replace(record, active_jobs=1 - record.active_jobs)
            loop.run_until_complete(presence.publish([records[index]]))
        changes = loop.run_until_complete(presence.changes(remote.cursor))
        started = time.perf_counter_ns()
        remote.update(changes)
        delta.append((time.perf_counter_ns() - started) / 1e6)

    refresh()
    running: list[tuple[RoutableNode, str]] = []
    timings: list[float] = []
    per_round: list[Round] = []
    ends = {decisions * r // rounds for r in range(1, rounds)}  # where each round ends
    misses = 0
    affinity = Counter[Affinity]()  # of the continued conversations' turns
    load.wait_for_quiet()
    round_began, first = load.start(), 0
    for index in range(decisions):
        if index in ends:
            per_round.append(_round(timings[first:], load.stop(round_began)))
            load.wait_for_quiet()
            round_began, first = load.start(), index
        if index % 1_000 == 999:
            # Heartbeats: a slow run (a loaded machine) must not age the fleet into
            # suspicion (SUSPECT_AFTER_S) and turn decisions into misses.
            for node in beating:
                node.last_seen = time.monotonic()
            if records:
                refresh()
        position = index % len(requests)
        request = requests[position]
        now = time.monotonic()
        started = time.perf_counter_ns()
        route = router.pick(request, now)
        timings.append((time.perf_counter_ns() - started) / 1000)
        if route is None:
            misses += 1
            continue
        if conversations and _continued(position):
            affinity[route.affinity] += 1
        picked = route.node
        job = f"job-{index}"
        if isinstance(picked, RemoteNode):
            picked.reserve()
        else:
            assert isinstance(picked, NodeSession)
            picked.active_jobs.add(job)
        running.append((picked, job))
        if len(running) > size:  # jobs finish: keep about one per node in flight
            done_node, done_job = running.pop(rng.randrange(len(running)))
            if isinstance(done_node, RemoteNode):
                done_node.active_jobs = max(0, done_node.active_jobs - 1)
            else:
                assert isinstance(done_node, NodeSession)
                done_node.active_jobs.discard(done_job)
    per_round.append(_round(timings[first:], load.stop(round_began)))
    loop.close()
    timings.sort()
    pooled = {
        "p50_us": timings[len(timings) // 2],
        "p99_us": timings[len(timings) * 99 // 100],
        "max_us": timings[-1],
        "mean_us": statistics.fmean(timings),
        "misses": misses,
        "refresh_ms": max(full) if records else 0.0,
        "delta_ms": max(delta) if records else 0.0,
        "fingerprint_us": statistics.median(fingerprinting) if fingerprinting else 0.0,
        **{
            f"{outcome}_pct": 100 * affinity[outcome] / max(1, affinity.total())
            for outcome in (Affinity.HIT, Affinity.PASSED_OVER, Affinity.MISS)
        },
    }
    return pooled, per_round


def _round(timings: Sequence[float], load: LoadSample) -> Round:
    ordered = sorted(timings)
    return Round(ordered[len(ordered) // 2], ordered[len(ordered) * 99 // 100], load)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__)
    parser.add_argument("--decisions", type=int, default=20_000, help="per case and size")
    parser.add_argument("--rounds", type=int, default=5, help="the decisions split in rounds")
    parser.add_argument("--one-model", action="store_true", help="every node serves one model")
    parser.add_argument(
        "--replicas", type=int, default=1, help="network replicas the fleet is spread over"
    )
    parser.add_argument(
        "--conversations",
        action="store_true",
        help="chat turns against nodes advertising cached conversations",
    )
    parser.add_argument(
        "--changed",
        type=float,
        default=1.0,
        help="with --replicas: percent of the remote records a delta refresh reads",
    )
    args = parser.parse_args(argv)
    models = MODELS[:1] if args.one_model else MODELS
    if args.rounds < 1 or args.decisions < args.rounds:
        raise SystemExit("--rounds must be positive and at most --decisions")
    print(
        f"routing decisions ({len(models)} model(s), {args.decisions} decisions per size in "
        f"{args.rounds} rounds, {args.replicas} replica(s)"
        f"{f', {args.changed:g}% of remote records changed per delta' if args.replicas > 1 else ''}"
        f"{', chat turns of cached conversations' if args.conversations else ''}); "
        "p50/p99 over all decisions, then across rounds"
    )
    print(
        f"{'requests':<11} {'nodes':>7} {'p50 µs':>8} {'p99 µs':>8} {'max µs':>8} misses "
        "refresh ms delta ms | p50 µs across rounds | p99 µs across rounds"
        f"{' | continued turns % hit/passed over/miss' if args.conversations else ''}"
    )
    load = MachineLoad()
    for case, requirements in CASES.items():
        for size in (100, 1_000, 10_000):
            result, rounds = measure(
                size,
                args.decisions,
                models,
                requirements,
                replicas=args.replicas,
                rounds=args.rounds,
                load=load,
                conversations=args.conversations,
                changed=args.changed,
            )
            loads = [r.load for r in rounds]
            load.samples += [(f"{case}@{size:,} r{i + 1}", r.load) for i, r in enumerate(rounds)]
            print(
                f"{case:<11} {size:>7,} {result['p50_us']:>8.1f} {result['p99_us']:>8.1f} "
                f"{result['max_us']:>8.1f} {result['misses']:>6.0f} "
                f"{result['refresh_ms']:>10.1f} {result['delta_ms']:>8.2f}"
                f" | {cell([r.p50_us for r in rounds], loads, '{:.0f}')} "
                f"| {cell([r.p99_us for r in rounds], loads, '{:.0f}')}"
                + (
                    f" | {result['hit_pct']:.0f}/{result['passed_over_pct']:.0f}/"
                    f"{result['miss_pct']:.0f}"
                    if args.conversations
                    else ""
                ),
                flush=True,
            )
            fingerprint_us = result["fingerprint_us"]
    if args.conversations:
        print(
            f"fingerprinting a request's {CONVERSATION_MESSAGES} messages "
            f"(once per job, in dispatch): p50 {fingerprint_us:.1f} µs"
        )
    print(MARKS)
    print(load.summary())


if __name__ == "__main__":
    main()
