"""The generation request and its parts (messages, sampling, logprobs, usage, finish
reason), shared by every contract that carries a job."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from resultity.common.v1 import inference_pb2 as pb

from core.errors import InvalidArgument
from core.inference import (
    ChatMessage,
    ChatRole,
    FinishReason,
    FunctionTool,
    GenerationSpec,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
    TokenLogprob,
    ToolCall,
    ToolChoiceMode,
    ToolUse,
    TopLogprob,
    Usage,
)

_ROLE_TO_PB = {
    ChatRole.SYSTEM: pb.CHAT_ROLE_SYSTEM,
    ChatRole.USER: pb.CHAT_ROLE_USER,
    ChatRole.ASSISTANT: pb.CHAT_ROLE_ASSISTANT,
    ChatRole.DEVELOPER: pb.CHAT_ROLE_DEVELOPER,
    ChatRole.TOOL: pb.CHAT_ROLE_TOOL,
}
_ROLE_FROM_PB = {value: key for key, value in _ROLE_TO_PB.items()}
_FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}
_FINISH_FROM_PB = {value: key for key, value in _FINISH_TO_PB.items()}
_FORMAT_TO_PB = {
    ResponseFormatType.TEXT: pb.RESPONSE_FORMAT_TYPE_TEXT,
    ResponseFormatType.JSON_OBJECT: pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    ResponseFormatType.JSON_SCHEMA: pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}
_FORMAT_FROM_PB = {value: key for key, value in _FORMAT_TO_PB.items()}
_TOOL_CHOICE_TO_PB = {
    ToolChoiceMode.NONE: pb.TOOL_CHOICE_MODE_NONE,
    ToolChoiceMode.AUTO: pb.TOOL_CHOICE_MODE_AUTO,
    ToolChoiceMode.REQUIRED: pb.TOOL_CHOICE_MODE_REQUIRED,
    ToolChoiceMode.FUNCTION: pb.TOOL_CHOICE_MODE_FUNCTION,
}
_TOOL_CHOICE_FROM_PB = {value: key for key, value in _TOOL_CHOICE_TO_PB.items()}


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
        converted.append(
            ChatMessage(
                role,
                message.content,
                tool_calls_from_pb(message.tool_calls),
                message.tool_call_id,
                message.name,
            )
        )
    return tuple(converted)


def message_to_pb(message: ChatMessage) -> pb.ChatMessage:
    return pb.ChatMessage(
        role=_ROLE_TO_PB[message.role],
        content=message.content,
        tool_calls=tool_calls_to_pb(message.tool_calls),
        tool_call_id=message.tool_call_id,
        name=message.name,
    )


def messages_to_pb(messages: tuple[ChatMessage, ...]) -> list[pb.ChatMessage]:
    return [message_to_pb(message) for message in messages]


def tool_calls_to_pb(calls: tuple[ToolCall, ...]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments) for call in calls]


def tool_calls_from_pb(calls: Iterable[pb.ToolCall]) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(call.id, call.name, call.arguments) for call in calls)


def tools_to_pb(tools: tuple[FunctionTool, ...]) -> list[pb.FunctionTool]:
    return [
        pb.FunctionTool(name=tool.name, description=tool.description, parameters=tool.parameters)
        for tool in tools
    ]


def tools_from_pb(tools: Iterable[pb.FunctionTool]) -> tuple[FunctionTool, ...]:
    return tuple(FunctionTool(tool.name, tool.description, tool.parameters) for tool in tools)


def tool_choice_to_pb(mode: ToolChoiceMode, function: str = "") -> pb.ToolChoice:
    return pb.ToolChoice(mode=_TOOL_CHOICE_TO_PB[mode], function_name=function)


def tool_choice_from_pb(choice: pb.ToolChoice) -> ToolChoiceMode | None:
    """None when unset (the caller's default applies)."""
    return _TOOL_CHOICE_FROM_PB.get(choice.mode)


def tool_use_to_pb(tool_use: ToolUse | None) -> pb.ToolUse | None:
    if tool_use is None:
        return None
    return pb.ToolUse(
        tools=tools_to_pb(tool_use.tools),
        choice=tool_choice_to_pb(tool_use.mode, tool_use.function),
        parallel_calls=tool_use.parallel_calls,
    )


def tool_use_from_pb(tool_use: pb.ToolUse) -> ToolUse | None:
    """None for no tools, or tools offered with mode NONE."""
    mode = tool_choice_from_pb(tool_use.choice) or ToolChoiceMode.AUTO
    if not tool_use.tools or mode is ToolChoiceMode.NONE:
        return None
    return ToolUse(
        tools_from_pb(tool_use.tools),
        mode,
        tool_use.choice.function_name,
        tool_use.parallel_calls,
    )


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


def logit_bias_from_pb(logit_bias: Mapping[int, float]) -> tuple[tuple[int, float], ...]:
    """The biases in token order (a map's order on the wire is unspecified)."""
    return tuple(sorted(logit_bias.items()))


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
            logit_bias=dict(sampling.logit_bias),
        ),
        max_prompt_tokens=spec.max_prompt_tokens,
        prompt=spec.prompt,
        embed=spec.embed,
        tool_use=tool_use_to_pb(spec.tool_use),
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
            logit_bias=logit_bias_from_pb(sampling.logit_bias),
        ),
        max_prompt_tokens=spec.max_prompt_tokens,
        prompt=spec.prompt if spec.HasField("prompt") else None,
        embed=spec.embed,
        tool_use=tool_use_from_pb(spec.tool_use),
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
