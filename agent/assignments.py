"""What an assigned job asks of the runtime, and the assignments the agent refuses."""

from __future__ import annotations

from agent.runtime.base import WAITING_REPORT_S, GenerationRequest
from core.agent_messages import AssignCommand
from core.errors import InvalidArgument
from core.inference import GenerationSpec, ResponseFormatType
from core.request_limits import (
    check_logit_bias,
    check_messages,
    check_prompt_bytes,
    check_tool_sampling,
    check_tool_use,
    parse_json_schema,
)

# Waiting reports within one stall timeout of the network: a late report (a busy
# event loop, a slow link) still leaves others before the network gives up.
WAITING_REPORTS_PER_STALL = 4


def waiting_report_s(stall_timeout_s: float) -> float:
    """How often a job held back by the runtime's scheduler is reported waiting under
    a network that gives up a started job silent for ``stall_timeout_s`` (0: it did
    not say): WAITING_REPORTS_PER_STALL times within it, and at least every
    WAITING_REPORT_S. The network's stall timeout thus cannot undercut the reports,
    however short it is set."""
    if stall_timeout_s <= 0:
        return WAITING_REPORT_S
    return min(WAITING_REPORT_S, stall_timeout_s / WAITING_REPORTS_PER_STALL)


def check_bounds(spec: GenerationSpec) -> None:
    """The bounds cloud checked (core/request_limits.py), again, before the runtime
    templates, tokenizes or compiles anything: a node does not trust its caller."""
    if spec.prompt is not None:
        check_prompt_bytes(len(spec.prompt.encode()), "prompt")
    else:
        tools = spec.tool_use.tools if spec.tool_use is not None else ()
        check_messages(spec.messages, spec.max_prompt_tokens, tools=tools)
    if spec.tool_use is not None:
        if spec.prompt is not None or spec.embed:
            raise InvalidArgument("tools are offered in chat jobs only", field="tools")
        check_tool_use(spec.tool_use)
        check_tool_sampling(spec.sampling)
    response_format = spec.sampling.response_format
    if response_format is not None and response_format.type is ResponseFormatType.JSON_SCHEMA:
        parse_json_schema(response_format.json_schema)
    check_logit_bias(spec.sampling.logit_bias)


def generation_request(
    assign: AssignCommand, waiting_report_s: float = WAITING_REPORT_S
) -> GenerationRequest:
    """Raises InvalidArgument (its field: the request field at fault) for a job the
    agent cannot run as given. A held-back job is reported waiting every
    ``waiting_report_s``."""
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
        tool_use=spec.tool_use,
        waiting_report_s=waiting_report_s,
    )
