"""Bounds on schemas and prompts, checked before any node does work for them."""

from __future__ import annotations

import json

import pytest
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.common.v1 import inference_pb2 as common_pb

from agent.assignments import generation_request
from core.convert.job_events import assign_from_pb
from core.errors import InvalidArgument
from core.inference import ChatMessage, ChatRole, ResponseFormat, ResponseFormatType
from core.request_limits import (
    MAX_LOGIT_BIAS_TOKENS,
    PROMPT_LIMITS,
    SCHEMA_FIELD,
    SCHEMA_LIMITS,
    check_messages,
    parse_json_schema,
)
from server.cloud.requests import ChatRequest, EmbeddingRequest, TextRequest, validate


def _nested(depth: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


HOSTILE_SCHEMAS = [
    # The request that crashed llama.cpp's grammar parser.
    {"type": "array", "items": {"type": "integer"}, "maxItems": 100_000},
    {"type": "array", "items": {"type": "integer"}, "minItems": 100_000},
    {"type": "string", "maxLength": 100_000},
    {"type": "string", "minLength": 1_000},
    {"type": "object", "maxProperties": 10_000},
    {"type": "string", "pattern": "^a{1,100000}$"},
    {"type": "string", "pattern": "^a{5000}$"},
    {"type": "string", "pattern": "^" + "a" * 1_000 + "$"},
    {"type": "array", "maxItems": -1},
    {"type": "array", "maxItems": 2.5},
    {"type": "array", "maxItems": True},
    _nested(40),
    {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(300)}},
    {"enum": list(range(300))},
    {"$ref": "https://example.com/schema.json"},
    {"$ref": "other.json#/definitions/x"},
    {"type": "object", "description": "x" * 20_000},
]


@pytest.mark.parametrize("schema", HOSTILE_SCHEMAS)
def test_hostile_schemas_are_refused_naming_the_schema(schema: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_json_schema(json.dumps(schema))
    assert raised.value.metadata == {"field": SCHEMA_FIELD}


@pytest.mark.parametrize("text", ["[1]", "1", "not json", "[" * 10_000 + "]" * 10_000])
def test_a_schema_must_be_a_json_object(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_json_schema(text)


def test_ordinary_schemas_pass() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 64},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 10},
            "kind": {"enum": ["a", "b", "c"]},
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{1,6}$"},
        },
        "required": ["name"],
        "$defs": {"tag": {"type": "string", "minLength": 1}},
    }
    assert parse_json_schema(json.dumps(schema)) == schema
    assert parse_json_schema(json.dumps(_nested(SCHEMA_LIMITS.max_depth // 2 - 1)))


def _user(*contents: str) -> list[ChatMessage]:
    return [ChatMessage(ChatRole.USER, content) for content in contents]


def test_many_empty_messages_are_refused_without_templating() -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_messages(_user(*[""] * 100_000))
    assert raised.value.metadata == {"field": "messages"}


def test_more_messages_than_prompt_tokens_cannot_fit() -> None:
    check_messages(_user(*[""] * 10), max_prompt_tokens=10)
    with pytest.raises(InvalidArgument):
        check_messages(_user(*[""] * 11), max_prompt_tokens=10)


def test_prompt_bytes_are_bounded() -> None:
    check_messages(_user("x" * PROMPT_LIMITS.max_bytes))
    with pytest.raises(InvalidArgument):
        check_messages(_user("x" * PROMPT_LIMITS.max_bytes, "y"))


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            ChatRequest(model="m", messages=(ChatMessage(ChatRole.USER, ""),) * 100_000),
            "messages",
        ),
        (
            ChatRequest(
                model="m",
                messages=(ChatMessage(ChatRole.USER, "hi"),),
                response_format=ResponseFormat(
                    ResponseFormatType.JSON_SCHEMA,
                    '{"type":"array","items":{"type":"integer"},"maxItems":100000}',
                ),
            ),
            SCHEMA_FIELD,
        ),
        (TextRequest(model="m", prompts=("x" * (PROMPT_LIMITS.max_bytes + 1),)), "prompt"),
        (
            TextRequest(
                model="m",
                prompts=("hi",),
                logit_bias=tuple((token, 1.0) for token in range(MAX_LOGIT_BIAS_TOKENS + 1)),
            ),
            "logit_bias",
        ),
        (TextRequest(model="m", prompts=("hi",), logit_bias=((5, 100.5),)), "logit_bias"),
        (TextRequest(model="m", prompts=("hi",), logit_bias=((5, float("nan")),)), "logit_bias"),
        (TextRequest(model="m", prompts=("hi",), logit_bias=((-1, 1.0),)), "logit_bias"),
        (EmbeddingRequest(model="m", inputs=("x" * (PROMPT_LIMITS.max_bytes + 1),)), "input"),
    ],
)
def test_cloud_refuses_hostile_requests_naming_the_field(
    request_: ChatRequest | TextRequest | EmbeddingRequest, field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate(request_)
    assert raised.value.metadata == {"field": field}


def _assignment(**fields: object) -> common_pb.GenerationSpec:
    spec = common_pb.GenerationSpec(
        model="m",
        messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
        sampling=common_pb.SamplingParams(max_tokens=8),
        max_prompt_tokens=100,
    )
    for name, value in fields.items():
        if name == "messages":
            del spec.messages[:]
            spec.messages.extend(value)  # type: ignore[arg-type]
        elif name == "logit_bias":
            spec.sampling.logit_bias.update(value)  # type: ignore[call-overload]
        elif name == "schema":
            spec.sampling.response_format.type = common_pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
            spec.sampling.response_format.json_schema = str(value)
        else:
            setattr(spec, name, value)
    return spec


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        (
            _assignment(schema='{"type":"array","items":{"type":"integer"},"maxItems":100000}'),
            SCHEMA_FIELD,
        ),
        (
            _assignment(
                messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER)] * 101,
            ),
            "messages",
        ),
        (_assignment(prompt="x" * (PROMPT_LIMITS.max_bytes + 1)), "prompt"),
        (_assignment(logit_bias={token: -100 for token in range(1000)}), "logit_bias"),
        (_assignment(logit_bias={3: 1e9}), "logit_bias"),
    ],
)
def test_the_agent_refuses_hostile_assignments_before_its_runtime(
    spec: common_pb.GenerationSpec, param: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        generation_request(assign_from_pb(agent_pb.AssignJob(job_id="j", epoch=1, spec=spec)))
    assert raised.value.metadata.get("field") == param
