"""The OpenAPI document the gateway publishes at /openapi.json.

Routes read their bodies themselves (to bound their size and to shape errors
as OpenAI does), so FastAPI cannot infer the schemas; this module states each
operation's request and response bodies from the same pydantic models the
routes use.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway import job_schemas, responses_schemas, schemas
from gateway.jobs import MAX_PAGE_SIZE, MAX_UNIX_SECONDS

_REF = "#/components/schemas/{model}"

# path -> method -> (request body model or None, success model, is an SSE stream possible)
_OPERATIONS: dict[str, dict[str, tuple[type[BaseModel] | None, type[BaseModel], bool]]] = {
    "/v1/chat/completions": {
        "post": (schemas.ChatCompletionRequest, schemas.ChatCompletion, True),
    },
    "/v1/completions": {"post": (schemas.CompletionRequest, schemas.TextCompletion, True)},
    "/v1/responses": {
        "post": (responses_schemas.ResponseRequest, responses_schemas.ResponseObject, True)
    },
    "/v1/embeddings": {"post": (schemas.EmbeddingRequest, schemas.EmbeddingList, False)},
    "/v1/models": {"get": (None, schemas.ModelList, False)},
    "/v1/models/{model}": {"get": (None, schemas.ModelCard, False)},
    "/v1/jobs": {"get": (None, job_schemas.JobList, False)},
    "/v1/jobs/{job_id}": {"get": (None, job_schemas.Job, False)},
}
# Streamed events: chat chunks, text completion chunks and the Responses API's events.
_STREAM_MODELS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": schemas.ChatCompletionChunk,
    "/v1/completions": schemas.TextCompletion,
    "/v1/responses": responses_schemas.ResponseStreamEvent,
}
_STREAM_FRAMING = "With stream=true: `data: <chunk JSON>` events, then `data: [DONE]`."
_EVENT_FRAMING = "With stream=true: `event: <type>` and `data: <event JSON>` per event."
_ERRORS = {
    "400": "Invalid request (param names the field)",
    "401": "Missing or invalid API key",
    "403": "The key may not do this or use this model",
    "404": "Unknown model, or a job the key may not see",
    "413": "Request body too large",
    "429": "Rate limited or out of credits",
    "503": "No node can serve the model right now",
}


# Optional request header: run only on nodes declared in this region.
REGION_HEADER = "x-resultity-region"


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_TEXT = {"type": "string", "maxLength": 256}
_UNIX = {"type": "integer", "minimum": 0, "maximum": MAX_UNIX_SECONDS}
# Query and path parameters of the GET operations that take any.
_PARAMETERS: dict[str, list[dict[str, Any]]] = {
    "/v1/models/{model}": [
        {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    ],
    "/v1/jobs": [
        _query("account_id", _TEXT, "Only this account's jobs (admin keys; default: all)."),
        _query("model", _TEXT, "Only jobs of this model."),
        {
            **_query(
                "outcome",
                {
                    "type": "array",
                    "items": {
                        "type": "string",
                        "enum": ["running", "finished", "failed", "cancelled"],
                    },
                },
                "Only jobs with one of these statuses (repeatable).",
            ),
            "style": "form",
            "explode": True,
        },
        _query("request_id", _TEXT, "Only the jobs of this request (its x-request-id)."),
        _query("created_after", _UNIX, "Created at or after (Unix seconds)."),
        _query("created_before", _UNIX, "Created before (Unix seconds)."),
        _query(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": 20},
            "Jobs per page.",
        ),
        _query("page_token", {"type": "string", "maxLength": 1024}, "A next_page_token."),
    ],
    "/v1/jobs/{job_id}": [
        {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}},
        _query(
            "with_log",
            {"type": "boolean", "default": False},
            "Also the log of the job's request, if its account opted in.",
        ),
    ],
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _components() -> dict[str, Any]:
    models: list[type[BaseModel]] = [schemas.ErrorEnvelope, *_STREAM_MODELS.values()]
    for methods in _OPERATIONS.values():
        for request, response, _ in methods.values():
            models.extend(m for m in (request, response) if m is not None)
    inputs = {
        schemas.ChatCompletionRequest,
        schemas.CompletionRequest,
        schemas.EmbeddingRequest,
        responses_schemas.ResponseRequest,
    }
    _, top = models_json_schema(
        [(model, "validation" if model in inputs else "serialization") for model in models],
        ref_template=_REF,
    )
    defs: dict[str, Any] = top.get("$defs", {})
    return defs


def _operation(
    path: str, body: type[BaseModel] | None, result: type[BaseModel], stream: bool
) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _ref(result)}}
    if stream:
        content["text/event-stream"] = {
            "schema": {"type": "string"},
            "description": _EVENT_FRAMING if path == "/v1/responses" else _STREAM_FRAMING,
            "x-event-schema": _ref(_STREAM_MODELS[path]),
        }
    responses: dict[str, Any] = {"200": {"description": "Success", "content": content}}
    for status, description in _ERRORS.items():
        responses[status] = {
            "description": description,
            "content": {"application/json": {"schema": _ref(schemas.ErrorEnvelope)}},
        }
    operation: dict[str, Any] = {"responses": responses}
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
        operation["parameters"] = [
            {
                "name": REGION_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": "^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$"},
                "description": "Run only on nodes declared in this region, e.g. eu-west.",
            }
        ]
    if path in _PARAMETERS:
        operation["parameters"] = _PARAMETERS[path]
    operation["security"] = [{"bearer": []}]
    return operation


def document(app: FastAPI) -> dict[str, Any]:
    spec = get_openapi(title=app.title, version=app.version, routes=[])
    spec["paths"] = {
        path: {
            method: _operation(path, body, result, stream)
            for method, (body, result, stream) in methods.items()
        }
        for path, methods in _OPERATIONS.items()
    }
    spec["components"] = {
        "schemas": _components(),
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    }
    return spec


def describe(app: FastAPI) -> None:
    """Makes ``app`` serve :func:`document` (built once, on first request)."""
    built: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not built:
            built.update(document(app))
        return built

    app.openapi = openapi  # type: ignore[method-assign]
