"""What an assigned job asks of the runtime, and the assignments the agent refuses."""

from __future__ import annotations

from agent.runtime.base import GenerationRequest
from core.agent_messages import AssignCommand
from core.errors import InvalidArgument
from core.inference import GenerationSpec, ResponseFormatType
from core.request_limits import check_messages, check_prompt_bytes, parse_json_schema


def check_bounds(spec: GenerationSpec) -> None:
    """The bounds cloud checked (core/request_limits.py), again, before the runtime
    templates, tokenizes or compiles anything: a node does not trust its caller."""
    if spec.prompt is not None:
        check_prompt_bytes(len(spec.prompt.encode()), "prompt")
    else:
        check_messages([m.content for m in spec.messages], spec.max_prompt_tokens)
    response_format = spec.sampling.response_format
    if response_format is not None and response_format.type is ResponseFormatType.JSON_SCHEMA:
        parse_json_schema(response_format.json_schema)


def generation_request(assign: AssignCommand) -> GenerationRequest:
    """Raises InvalidArgument (its field: the request field at fault) for a job the
    agent cannot run as given."""
    spec = assign.spec
    if not spec.messages and spec.prompt is None:
        raise InvalidArgument("a job needs messages or a prompt", field="messages")
    check_bounds(spec)
    if spec.embed and spec.prompt is None:
        raise InvalidArgument("an embedding job needs a prompt")
    # A continuation may have nothing left to generate but held-back text; an
    # embedding generates nothing.
    if spec.sampling.max_tokens < (0 if assign.continuation is not None or spec.embed else 1):
        raise InvalidArgument("max_tokens must be positive")
    return GenerationRequest(
        model=spec.model,
        messages=spec.messages,
        sampling=spec.sampling,
        max_prompt_tokens=spec.max_prompt_tokens,
        continuation=assign.continuation,
        prompt=spec.prompt,
        embed=spec.embed,
    )
