"""The model catalog: which models the network serves and at what price.

Only catalog models are routed: a price must be known before a job is admitted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from server.common.errors import ModelNotFound
from server.common.inference import CatalogModel, ModelPrice

SMOLLM2_135M = CatalogModel(
    id="smollm2-135m-instruct",
    owned_by="huggingface",
    price=ModelPrice(prompt=1, completion=2),
    context_length=2048,
    # SmolLM2's template adds a default system prompt and role markers.
    chat_template_overhead_tokens=64,
)

DEFAULT_CATALOG: tuple[CatalogModel, ...] = (SMOLLM2_135M,)


class Catalog:
    def __init__(self, models: Iterable[CatalogModel]) -> None:
        self._models = {model.id: model for model in models}

    def get(self, model_id: str) -> CatalogModel:
        model = self._models.get(model_id)
        if model is None:
            raise ModelNotFound(model_id)
        return model

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def __iter__(self) -> Iterator[CatalogModel]:
        return iter(self._models.values())
