"""Conversions between the agent protocol and the runtime's types."""

from __future__ import annotations

from resultity.agent.v1 import agent_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb

from agent.runner import FailureKind
from agent.runtime.base import (
    Continuation,
    GenerationRequest,
    Message,
    OutputFormat,
    Role,
    Sampling,
    StopReason,
    TokenLogprob,
)
from core import inference
from core.errors import InvalidArgument
from core.request_limits import check_messages, check_prompt_bytes, parse_json_schema

_ROLES = {
    common_pb.CHAT_ROLE_SYSTEM: Role.SYSTEM,
    common_pb.CHAT_ROLE_USER: Role.USER,
    common_pb.CHAT_ROLE_ASSISTANT: Role.ASSISTANT,
}
_STOP_REASONS = {
    StopReason.STOP: common_pb.FINISH_REASON_STOP,
    StopReason.LENGTH: common_pb.FINISH_REASON_LENGTH,
}
_OUTPUT_FORMATS = {
    common_pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: OutputFormat.JSON_OBJECT,
    common_pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: OutputFormat.JSON_SCHEMA,
}
_FAILURES = {
    FailureKind.INVALID_REQUEST: pb.JOB_FAILURE_REASON_INVALID_REQUEST,
    FailureKind.MODEL_UNAVAILABLE: pb.JOB_FAILURE_REASON_MODEL_UNAVAILABLE,
    FailureKind.RUNTIME_ERROR: pb.JOB_FAILURE_REASON_RUNTIME_ERROR,
}


class InvalidAssignment(ValueError):
    """An assignment the node refuses; ``param`` names the request field at fault."""

    def __init__(self, message: str, param: str = "") -> None:
        super().__init__(message)
        self.param = param


def check_bounds(spec: common_pb.GenerationSpec) -> None:
    """The bounds cloud checked (core/request_limits.py), again, before the runtime
    templates, tokenizes or compiles anything: a node does not trust its caller."""
    try:
        if spec.HasField("prompt"):
            check_prompt_bytes(len(spec.prompt.encode()), "prompt")
        else:
            check_messages([m.content for m in spec.messages], spec.max_prompt_tokens)
        response_format = spec.sampling.response_format
        if response_format.type == common_pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
            parse_json_schema(response_format.json_schema)
    except InvalidArgument as error:
        raise InvalidAssignment(error.message, error.metadata.get("field", "")) from error


def generation_request(
    spec: common_pb.GenerationSpec, continuation: pb.Continuation | None = None
) -> GenerationRequest:
    messages = []
    for message in spec.messages:
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidAssignment("message without a role")
        messages.append(Message(role, message.content))
    if not messages and not spec.HasField("prompt"):
        raise InvalidAssignment("a job needs messages or a prompt", "messages")
    check_bounds(spec)
    sampling = spec.sampling
    if spec.embed and not spec.HasField("prompt"):
        raise InvalidAssignment("an embedding job needs a prompt")
    # A continuation may have nothing left to generate but held-back text; an
    # embedding generates nothing.
    if sampling.max_tokens < (0 if continuation is not None or spec.embed else 1):
        raise InvalidAssignment("max_tokens must be positive")
    return GenerationRequest(
        model=spec.model,
        messages=tuple(messages),
        sampling=Sampling(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature if sampling.HasField("temperature") else None,
            top_p=sampling.top_p if sampling.HasField("top_p") else None,
            stop=tuple(sampling.stop),
            seed=sampling.seed if sampling.HasField("seed") else None,
            presence_penalty=(
                sampling.presence_penalty if sampling.HasField("presence_penalty") else None
            ),
            frequency_penalty=(
                sampling.frequency_penalty if sampling.HasField("frequency_penalty") else None
            ),
            top_logprobs=sampling.top_logprobs if sampling.logprobs else None,
            output_format=_OUTPUT_FORMATS.get(sampling.response_format.type),
            json_schema=sampling.response_format.json_schema,
        ),
        max_prompt_tokens=spec.max_prompt_tokens,
        prompt=spec.prompt if spec.HasField("prompt") else None,
        embed=spec.embed,
        continuation=None
        if continuation is None
        else Continuation(
            text=continuation.text,
            token_count=continuation.token_count,
            token_ids=tuple(continuation.token_ids),
        ),
    )


def finish_reason(reason: StopReason) -> common_pb.FinishReason.ValueType:
    return _STOP_REASONS[reason]


def failure_reason(kind: FailureKind) -> pb.JobFailureReason.ValueType:
    return _FAILURES[kind]


def _token(piece: bytes) -> str:
    # A token may end inside a UTF-8 character; its exact bytes travel alongside.
    return piece.decode("utf-8", errors="replace")


def delivered_logprobs(logprobs: tuple[TokenLogprob, ...]) -> tuple[inference.TokenLogprob, ...]:
    """The runtime's logprobs as they are sent (and signed): text and exact bytes."""
    return tuple(
        inference.TokenLogprob(
            token=_token(item.piece),
            token_bytes=item.piece,
            logprob=item.logprob,
            top_logprobs=tuple(
                inference.TopLogprob(_token(top.piece), top.piece, top.logprob) for top in item.top
            ),
        )
        for item in logprobs
    )
