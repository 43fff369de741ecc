"""`python -m bench.presence_publish`: what publishing presence costs Redis.

``RedisPresence`` driven directly, in a namespace of its own: ``--nodes``
records of 3 replicas (64 cached fingerprints each, as a busy node
advertises), each replica publishing its own. Per round, in a fresh
namespace: a first publish of every record, then a renewal (the heartbeat
after) in which ``--changed`` percent of the records changed. Redis's time is
the growth of ``INFO commandstats``'s script time (EVAL and EVALSHA) over a
publish, so a Redis nobody else uses gives exact numbers; the wall time is the
client's (JSON, digests and the round trips included). The script imports the
presence adapter from ``PYTHONPATH``, so one file measures two checkouts
(method and results: bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace

import redis.asyncio as redis

from core.namespace import RedisNames
from server.network.nodes import NodeState
from server.network.presence import NodePresence
from server.network.presence_redis import RedisPresence

REPLICAS = 3
PREFIXES = 64


def fleet(nodes: int, now: float) -> list[NodePresence]:
    rng = random.Random(7)
    return [
        NodePresence(
            node_id=f"node-{i:05d}",
            replica_id=f"replica-{i % REPLICAS}",
            replica_address=f"replica-{i % REPLICAS}.internal:50051",
            state=NodeState.READY,
            models=("qwen2.5-7b-instruct", "smollm2-135m-instruct"),
            region=("eu-west", "us-east", "ap-south")[i % 3],
            operator_account_id=f"operator-{i % 97}",
            reputation=0.9,
            verified=True,
            active_jobs=i % 3,
            max_concurrent_jobs=4,
            recent_tokens_per_second=31.5,
            connected_at=now - 3_600 + i / 1_000,
            published_at=now,
            expires_at=now + 15,
            cached_prefixes=tuple(rng.getrandbits(64) for _ in range(PREFIXES)),
            node_name=f"node {i}",
            agent_version="0.9.0",
            config_version=3,
        )
        for i in range(nodes)
    ]


def renewal(records: list[NodePresence], changed_percent: float) -> list[NodePresence]:
    now = time.time()
    every = max(1, round(100 / changed_percent)) if changed_percent else len(records) + 1
    return [
        replace(
            r,
            published_at=now,
            expires_at=now + 15,
            active_jobs=r.active_jobs + 1 if i % every == 0 else r.active_jobs,
        )
        for i, r in enumerate(records)
    ]


async def script_usec(client: redis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("usec", 0)) for name in ("eval", "evalsha"))


async def publish(
    client: redis.Redis, store: RedisPresence, records: list[NodePresence]
) -> tuple[float, float]:
    """Redis's and the client's milliseconds to publish ``records``, replica by replica."""
    before, started = await script_usec(client), time.perf_counter()
    for replica in range(REPLICAS):
        await store.publish([r for r in records if r.replica_id == f"replica-{replica}"])
    wall_ms = (time.perf_counter() - started) * 1000
    return (await script_usec(client) - before) / 1000, wall_ms


async def run(url: str, nodes: int, changed: float, rounds: int) -> None:
    client = redis.Redis.from_url(url)
    for _ in range(rounds):
        namespace = f"bench-{uuid.uuid4().hex[:8]}"
        store = RedisPresence(client, RedisNames(namespace))
        try:
            records = fleet(nodes, time.time())
            first = await publish(client, store, records)
            renewed = await publish(client, store, renewal(records, changed))
            print(
                f"first publish: redis {first[0]:.0f} ms, wall {first[1]:.0f} ms; "
                f"renewal: redis {renewed[0]:.0f} ms, wall {renewed[1]:.0f} ms",
                flush=True,
            )
        finally:
            keys = [key async for key in client.scan_iter(f"{namespace}:*")]
            for start in range(0, len(keys), 1_000):
                await client.delete(*keys[start : start + 1_000])
    await client.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.presence_publish", description=__doc__)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--nodes", type=int, default=7_500)
    parser.add_argument("--changed", type=float, default=1.0, help="percent changed per renewal")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    asyncio.run(run(args.redis_url, args.nodes, args.changed, args.rounds))


if __name__ == "__main__":
    main()
