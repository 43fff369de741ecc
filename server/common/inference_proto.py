"""Conversions between the inference protos and the domain shapes."""

from __future__ import annotations

from resultity.common.v1 import inference_pb2 as pb

from server.common.errors import InvalidArgument
from server.common.inference import (
    ChatMessage,
    ChatRole,
    FinishReason,
    GenerationSpec,
    ModelPrice,
    Sampling,
    Usage,
)

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
        ),
        max_prompt_tokens=spec.max_prompt_tokens,
    )


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
        ),
        max_prompt_tokens=spec.max_prompt_tokens,
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
