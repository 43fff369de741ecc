"""The network's model catalog as the cloud sees it, cached briefly.

Ready-node counts depend on the node rules asked for (a subcloud's, a
region), so the catalog is cached per set of rules.
"""

from __future__ import annotations

import asyncio
import time

from core.errors import ModelNotFound
from core.inference import CatalogModel, NodeRequirements
from server.cloud.ports import NO_REQUIREMENTS, NetworkPort

# Distinct rule sets kept at once; past that the expired ones are dropped.
_MAX_RULE_SETS = 1_000


class ModelDirectory:
    """The network's catalog, refreshed at most every ``ttl_s`` seconds per rule set."""

    def __init__(self, network: NetworkPort, *, ttl_s: float = 2.0) -> None:
        self._network = network
        self._ttl_s = ttl_s
        self._catalogs: dict[NodeRequirements, tuple[float, dict[str, CatalogModel]]] = {}
        self._lock = asyncio.Lock()

    async def all(self, requirements: NodeRequirements = NO_REQUIREMENTS) -> list[CatalogModel]:
        """The catalog; ``ready_nodes`` counts the nodes meeting ``requirements``."""
        return list((await self._catalog(requirements)).values())

    async def any_servable(self) -> bool:
        """Whether some model has a ready node (with no node rules)."""
        return any(model.ready_nodes > 0 for model in await self.all())

    async def get(
        self, model_id: str, requirements: NodeRequirements = NO_REQUIREMENTS
    ) -> CatalogModel:
        model = (await self._catalog(requirements)).get(model_id)
        if model is None:
            raise ModelNotFound(model_id)
        return model

    async def _catalog(self, requirements: NodeRequirements) -> dict[str, CatalogModel]:
        cached = self._catalogs.get(requirements)
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        async with self._lock:
            cached = self._catalogs.get(requirements)
            now = time.monotonic()
            if cached is not None and now < cached[0]:
                return cached[1]
            models = await self._network.list_models(requirements)
            if len(self._catalogs) >= _MAX_RULE_SETS:
                self._catalogs = {k: v for k, v in self._catalogs.items() if v[0] > now}
            catalog = {model.id: model for model in models}
            self._catalogs[requirements] = (time.monotonic() + self._ttl_s, catalog)
            return catalog
