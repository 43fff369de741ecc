"""PostgreSQL adapter for network configuration versions and their
acknowledgements (state_ports.ConfigStore)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from core.inference import ModelPrice
from server.network.config import ConfigModel, NetworkConfig
from server.network.state_ports import ConfigAck


def _models_to_json(models: Sequence[ConfigModel]) -> str:
    return json.dumps(
        [
            {
                "model": m.model,
                "price": {"prompt": m.price.prompt, "completion": m.price.completion},
                "context_length": m.context_length,
                "runtimes": list(m.runtimes),
            }
            for m in models
        ]
    )


def _models_from_json(text: str) -> tuple[ConfigModel, ...]:
    items: list[dict[str, Any]] = json.loads(text)
    return tuple(
        ConfigModel(
            item["model"],
            ModelPrice(item["price"]["prompt"], item["price"]["completion"]),
            item["context_length"],
            tuple(item["runtimes"]),
        )
        for item in items
    )


class PostgresConfigStore:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], network_id: str) -> None:
        self._pool = pool
        self._network_id = network_id

    async def latest_config(self) -> NetworkConfig | None:
        row = await self._pool.fetchrow(
            """SELECT version, heartbeat_interval_s, heartbeat_timeout_s, min_agent_version,
                      canary_rate, models::text AS models
               FROM network_configs WHERE network_id = $1
               ORDER BY version DESC LIMIT 1""",
            self._network_id,
        )
        if row is None:
            return None
        return NetworkConfig(
            row["version"],
            row["heartbeat_interval_s"],
            row["heartbeat_timeout_s"],
            row["min_agent_version"],
            row["canary_rate"],
            _models_from_json(row["models"]),
        )

    async def add_config(self, config: NetworkConfig) -> bool:
        inserted = await self._pool.fetchval(
            """INSERT INTO network_configs (network_id, version, heartbeat_interval_s,
                   heartbeat_timeout_s, min_agent_version, canary_rate, models)
               VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
               ON CONFLICT (network_id, version) DO NOTHING
               RETURNING true""",
            self._network_id,
            config.version,
            config.heartbeat_interval_s,
            config.heartbeat_timeout_s,
            config.min_agent_version,
            config.canary_rate,
            _models_to_json(config.models),
        )
        return bool(inserted)

    async def config_exists(self, version: int) -> bool:
        found = await self._pool.fetchval(
            "SELECT true FROM network_configs WHERE network_id = $1 AND version = $2",
            self._network_id,
            version,
        )
        return bool(found)

    async def catalog_added(self, model_ids: Sequence[str]) -> dict[str, datetime]:
        # Replicas starting together agree on the first time: one inserts, the others
        # read it (a row committed after this statement's snapshot is read again).
        rows = await self._pool.fetch(
            """WITH new AS (
                   INSERT INTO network_catalog_models (network_id, model_id)
                   SELECT $1, unnest($2::text[])
                   ON CONFLICT DO NOTHING
                   RETURNING model_id, added_at)
               SELECT model_id, added_at FROM new
               UNION ALL
               SELECT model_id, added_at FROM network_catalog_models
               WHERE network_id = $1 AND model_id = ANY($2::text[])""",
            self._network_id,
            list(model_ids),
        )
        added = {row["model_id"]: row["added_at"] for row in rows}
        if len(added) < len(set(model_ids)):
            rows = await self._pool.fetch(
                """SELECT model_id, added_at FROM network_catalog_models
                   WHERE network_id = $1 AND model_id = ANY($2::text[])""",
                self._network_id,
                list(model_ids),
            )
            added = {row["model_id"]: row["added_at"] for row in rows}
        return added

    async def save_acks(self, acks: Sequence[ConfigAck]) -> None:
        await self._pool.executemany(
            """INSERT INTO network_config_acks (network_id, version, node_id, acked_at)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (network_id, version, node_id) DO NOTHING""",
            [(self._network_id, ack.version, ack.node_id, ack.acked_at) for ack in acks],
        )

    async def list_acks(self, version: int, after_node_id: str, limit: int) -> list[ConfigAck]:
        rows = await self._pool.fetch(
            """SELECT node_id, version, acked_at FROM network_config_acks
               WHERE network_id = $1 AND version = $2 AND node_id > $3
               ORDER BY node_id LIMIT $4""",
            self._network_id,
            version,
            after_node_id,
            limit,
        )
        return [ConfigAck(row["node_id"], row["version"], row["acked_at"]) for row in rows]
