"""The model catalog: which models the network serves, at what price, and the
known-answer canaries that verify a node serves the model it claims.

Only catalog models are routed: a price must be known before a job is admitted.
A model without canaries (no reference output recorded) is validated by the
benchmark alone and gets no in-service canaries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from importlib import resources

from core.errors import ModelNotFound
from core.inference import CatalogModel, ModelPrice
from server.network.validation import Canary

SMOLLM2_135M = CatalogModel(
    id="smollm2-135m-instruct",
    owned_by="huggingface",
    price=ModelPrice(prompt=1, completion=2),
    context_length=2048,
    # SmolLM2's template adds a default system prompt and role markers.
    chat_template_overhead_tokens=64,
)

DEFAULT_CATALOG: tuple[CatalogModel, ...] = (SMOLLM2_135M,)


def load_canaries() -> tuple[Canary, ...]:
    """The recorded canaries (canaries.json next to this module)."""
    data = json.loads(resources.files(__package__).joinpath("canaries.json").read_text())
    return tuple(
        Canary(item["model"], item["prompt"], item["expected"], int(item["max_tokens"]))
        for item in data["canaries"]
    )


DEFAULT_CANARIES = load_canaries()


class Catalog:
    def __init__(
        self, models: Iterable[CatalogModel], canaries: Iterable[Canary] = DEFAULT_CANARIES
    ) -> None:
        self._models = {model.id: model for model in models}
        self._canaries: dict[str, tuple[Canary, ...]] = {}
        for canary in canaries:
            self._canaries[canary.model] = (*self._canaries.get(canary.model, ()), canary)

    def canaries(self, model_id: str) -> tuple[Canary, ...]:
        """Known-answer canaries of the model; empty when none are recorded."""
        return self._canaries.get(model_id, ())

    def get(self, model_id: str) -> CatalogModel:
        model = self._models.get(model_id)
        if model is None:
            raise ModelNotFound(model_id)
        return model

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def __iter__(self) -> Iterator[CatalogModel]:
        return iter(self._models.values())
