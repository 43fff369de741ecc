"""Catalog models and their prices, as the network lists them to cloud."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from resultity.common.v1 import inference_pb2 as pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb

from core.inference import CatalogModel, ModelPrice


def price_to_pb(price: ModelPrice) -> pb.ModelPrice:
    return pb.ModelPrice(
        prompt_micro_credits_per_token=price.prompt,
        completion_micro_credits_per_token=price.completion,
    )


def price_from_pb(price: pb.ModelPrice) -> ModelPrice:
    return ModelPrice(
        price.prompt_micro_credits_per_token, price.completion_micro_credits_per_token
    )


def catalog_model_to_pb(model: CatalogModel) -> dispatch_pb.CatalogModel:
    return dispatch_pb.CatalogModel(
        id=model.id,
        owned_by=model.owned_by,
        price=price_to_pb(model.price),
        context_length=model.context_length,
        chat_template_overhead_tokens=model.chat_template_overhead_tokens,
        ready_nodes=model.ready_nodes,
        created=_timestamp(model.created),
    )


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def catalog_model_from_pb(model: dispatch_pb.CatalogModel) -> CatalogModel:
    return CatalogModel(
        id=model.id,
        owned_by=model.owned_by,
        price=price_from_pb(model.price),
        context_length=model.context_length,
        chat_template_overhead_tokens=model.chat_template_overhead_tokens,
        ready_nodes=model.ready_nodes,
        created=model.created.ToDatetime(tzinfo=UTC) if model.HasField("created") else None,
    )


def models_to_pb(models: Iterable[CatalogModel]) -> dispatch_pb.ListModelsResponse:
    return dispatch_pb.ListModelsResponse(models=[catalog_model_to_pb(m) for m in models])


def models_from_pb(response: dispatch_pb.ListModelsResponse) -> list[CatalogModel]:
    return [catalog_model_from_pb(model) for model in response.models]
