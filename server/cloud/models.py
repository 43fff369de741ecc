"""The network's model catalog as the cloud sees it, cached briefly."""

from __future__ import annotations

import asyncio
import time

from server.cloud.ports import NetworkPort
from server.common.errors import ModelNotFound
from server.common.inference import CatalogModel


class ModelDirectory:
    """The network's catalog, refreshed at most every ``ttl_s`` seconds."""

    def __init__(self, network: NetworkPort, *, ttl_s: float = 2.0) -> None:
        self._network = network
        self._ttl_s = ttl_s
        self._models: dict[str, CatalogModel] = {}
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def all(self) -> list[CatalogModel]:
        if time.monotonic() >= self._expires:
            async with self._lock:
                if time.monotonic() >= self._expires:
                    models = await self._network.list_models()
                    self._models = {model.id: model for model in models}
                    self._expires = time.monotonic() + self._ttl_s
        return list(self._models.values())

    async def get(self, model_id: str) -> CatalogModel:
        for model in await self.all():
            if model.id == model_id:
                return model
        raise ModelNotFound(model_id)
