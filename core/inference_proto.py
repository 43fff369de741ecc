"""Conversions between the inference protos and the domain shapes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from resultity.common.v1 import inference_pb2 as pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb

from core.errors import InvalidArgument
from core.inference import (
    ChatMessage,
    ChatRole,
    FinishReason,
    GenerationSpec,
    JobOrigin,
    ModelPrice,
    NodeRequirements,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from core.regions import validate_region

_ROLE_TO_PB = {
    ChatRole.SYSTEM: pb.CHAT_ROLE_SYSTEM,
    ChatRole.USER: pb.CHAT_ROLE_USER,
    ChatRole.ASSISTANT: pb.CHAT_ROLE_ASSISTANT,
}
_ROLE_FROM_PB = {value: key for key, value in _ROLE_TO_PB.items()}
_FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
_FINISH_FROM_PB = {value: key for key, value in _FINISH_TO_PB.items()}
_FORMAT_TO_PB = {
    ResponseFormatType.TEXT: pb.RESPONSE_FORMAT_TYPE_TEXT,
    ResponseFormatType.JSON_OBJECT: pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    ResponseFormatType.JSON_SCHEMA: pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}
_FORMAT_FROM_PB = {value: key for key, value in _FORMAT_TO_PB.items()}


def role_to_pb(role: ChatRole) -> pb.ChatRole.ValueType:
    return _ROLE_TO_PB[role]


def messages_from_pb(
    messages: list[pb.ChatMessage] | tuple[pb.ChatMessage, ...], field: str = "messages"
) -> tuple[ChatMessage, ...]:
    converted = []
    for index, message in enumerate(messages):
        role = _ROLE_FROM_PB.get(message.role)
        if role is None:
            raise InvalidArgument("message role must be set", field=f"{field}.{index}.role")
        converted.append(ChatMessage(role, message.content))
    return tuple(converted)


def messages_to_pb(messages: tuple[ChatMessage, ...]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=_ROLE_TO_PB[m.role], content=m.content) for m in messages]


def finish_reason_to_pb(reason: FinishReason) -> pb.FinishReason.ValueType:
    return _FINISH_TO_PB[reason]


def finish_reason_from_pb(reason: pb.FinishReason.ValueType) -> FinishReason:
    converted = _FINISH_FROM_PB.get(reason)
    if converted is None:
        raise InvalidArgument("finish reason must be set", field="finish_reason")
    return converted


def response_format_to_pb(response_format: ResponseFormat | None) -> pb.ResponseFormat | None:
    if response_format is None:
        return None
    return pb.ResponseFormat(
        type=_FORMAT_TO_PB[response_format.type], json_schema=response_format.json_schema
    )


def response_format_from_pb(response_format: pb.ResponseFormat) -> ResponseFormat | None:
    """None for an unset format (free text)."""
    kind = _FORMAT_FROM_PB.get(response_format.type)
    if kind is None:
        return None
    return ResponseFormat(kind, response_format.json_schema)


def spec_to_pb(spec: GenerationSpec) -> pb.GenerationSpec:
    sampling = spec.sampling
    return pb.GenerationSpec(
        model=spec.model,
        messages=messages_to_pb(spec.messages),
        sampling=pb.SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=list(sampling.stop),
            seed=sampling.seed,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            logprobs=sampling.logprobs,
            top_logprobs=sampling.top_logprobs,
            response_format=response_format_to_pb(sampling.response_format),
        ),
        max_prompt_tokens=spec.max_prompt_tokens,
        prompt=spec.prompt,
        embed=spec.embed,
    )


def _optional(message: pb.SamplingParams, field: str) -> float | None:
    return getattr(message, field) if message.HasField(field) else None  # type: ignore[arg-type]


def spec_from_pb(spec: pb.GenerationSpec) -> GenerationSpec:
    sampling = spec.sampling
    return GenerationSpec(
        model=spec.model,
        messages=messages_from_pb(list(spec.messages)),
        sampling=Sampling(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature if sampling.HasField("temperature") else None,
            top_p=sampling.top_p if sampling.HasField("top_p") else None,
            stop=tuple(sampling.stop),
            seed=sampling.seed if sampling.HasField("seed") else None,
            presence_penalty=_optional(sampling, "presence_penalty"),
            frequency_penalty=_optional(sampling, "frequency_penalty"),
            logprobs=sampling.logprobs,
            top_logprobs=sampling.top_logprobs,
            response_format=response_format_from_pb(sampling.response_format),
        ),
        max_prompt_tokens=spec.max_prompt_tokens,
        prompt=spec.prompt if spec.HasField("prompt") else None,
        embed=spec.embed,
    )


def logprobs_to_pb(logprobs: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token=item.token,
            bytes=item.token_bytes,
            logprob=item.logprob,
            top_logprobs=[
                pb.TopLogprob(token=top.token, bytes=top.token_bytes, logprob=top.logprob)
                for top in item.top_logprobs
            ],
        )
        for item in logprobs
    ]


def logprobs_from_pb(logprobs: Iterable[pb.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(
            item.token,
            item.bytes,
            item.logprob,
            tuple(TopLogprob(top.token, top.bytes, top.logprob) for top in item.top_logprobs),
        )
        for item in logprobs
    )


def usage_to_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)


def usage_from_pb(usage: pb.Usage) -> Usage:
    return Usage(usage.prompt_tokens, usage.completion_tokens)


def price_to_pb(price: ModelPrice) -> pb.ModelPrice:
    return pb.ModelPrice(
        prompt_micro_credits_per_token=price.prompt,
        completion_micro_credits_per_token=price.completion,
    )


def price_from_pb(price: pb.ModelPrice) -> ModelPrice:
    return ModelPrice(
        price.prompt_micro_credits_per_token, price.completion_micro_credits_per_token
    )


class RequirementsMessage(Protocol):
    """The fields shared by network NodeRequirements and cloud NodeRules."""

    @property
    def operator_account_ids(self) -> Iterable[str]: ...
    @property
    def regions(self) -> Iterable[str]: ...
    @property
    def min_reputation(self) -> float: ...
    @property
    def verified_only(self) -> bool: ...


def requirements_fields(requirements: NodeRequirements) -> dict[str, Any]:
    """Keyword arguments for either message type, in a stable order."""
    return {
        "operator_account_ids": sorted(requirements.operator_account_ids),
        "regions": sorted(requirements.regions),
        "min_reputation": requirements.min_reputation,
        "verified_only": requirements.verified_only,
    }


def requirements_to_pb(requirements: NodeRequirements) -> dispatch_pb.NodeRequirements:
    return dispatch_pb.NodeRequirements(**requirements_fields(requirements))


def requirements_from_pb(
    message: RequirementsMessage, *, field: str = "requirements"
) -> NodeRequirements:
    """The domain rules; rejects out-of-range reputations and malformed regions."""
    if not 0.0 <= message.min_reputation <= 1.0:
        raise InvalidArgument(
            f"{field}.min_reputation must be between 0 and 1", field=f"{field}.min_reputation"
        )
    return NodeRequirements(
        operator_account_ids=frozenset(message.operator_account_ids),
        regions=frozenset(
            validate_region(region, field=f"{field}.regions") for region in message.regions
        ),
        min_reputation=message.min_reputation,
        verified_only=message.verified_only,
    )


def origin_to_pb(origin: JobOrigin) -> dispatch_pb.JobOrigin:
    return dispatch_pb.JobOrigin(
        request_id=origin.request_id,
        account_id=origin.account_id,
        subcloud_id=origin.subcloud_id,
    )


def origin_from_pb(message: dispatch_pb.JobOrigin) -> JobOrigin:
    return JobOrigin(message.request_id, message.account_id, message.subcloud_id)
