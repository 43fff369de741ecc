"""Every message family survives the wire: domain -> protobuf -> bytes -> protobuf ->
domain gives back what was sent, with the conversions both ends use (core/convert)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypeVar

import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb

from core.agent_messages import (
    AgentReport,
    AssignCommand,
    CancelCommand,
    ChunkReport,
    ConfigApplied,
    DoneReport,
    Draining,
    FailedReport,
    FailureKind,
    Heartbeat,
    StartedReport,
    WaitingReport,
)
from core.convert.agent_reports import batch_to_pb, report_from_pb, report_to_pb, reports_from_pb
from core.convert.catalog import models_from_pb, models_to_pb
from core.convert.generation import (
    finish_reason_to_pb,
    logprobs_from_pb,
    logprobs_to_pb,
    spec_from_pb,
    spec_to_pb,
)
from core.convert.job_events import (
    assign_from_pb,
    assign_to_pb,
    cancel_from_pb,
    cancel_to_pb,
    failure_to_pb,
    job_event_from_pb,
    job_event_to_pb,
    job_events_from_pb,
    job_events_to_pb,
)
from core.convert.job_records import query_from_pb, query_to_pb, record_from_pb, record_to_pb
from core.convert.requirements import requirements_from_pb, requirements_to_pb
from core.errors import ProtocolViolation
from core.inference import (
    CatalogModel,
    ChatMessage,
    ChatRole,
    Continuation,
    FinishReason,
    FunctionTool,
    GenerationSpec,
    JobAssigned,
    JobDelta,
    JobEvent,
    JobFinished,
    JobMigrated,
    JobOrigin,
    ModelPrice,
    NodeRequirements,
    NodeUsage,
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
from core.job_records import Assignment, JobOutcome, JobQuery, JobRecord
from core.prompt_prefixes import MAX_ADVERTISED_PREFIXES

_M = TypeVar("_M", bound=Message)

# Protobuf strings are UTF-8: no lone surrogates.
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
int32s = st.integers(0, 2**31 - 1)
int64s = st.integers(0, 2**63 - 1)
uint64s = st.integers(0, 2**64 - 1)
doubles = st.floats(allow_nan=False)
# Embeddings travel as float32.
float32s = st.floats(allow_nan=False, width=32)
small_tuples = {"max_size": 4}

usages = st.builds(Usage, int64s, int64s)
top_logprobs = st.builds(TopLogprob, texts, st.binary(max_size=8), doubles)
token_logprobs = st.builds(
    TokenLogprob,
    texts,
    st.binary(max_size=8),
    doubles,
    st.tuples() | st.lists(top_logprobs, **small_tuples).map(tuple),
)
logprob_tuples = st.lists(token_logprobs, **small_tuples).map(tuple)
response_formats = st.none() | st.builds(ResponseFormat, st.sampled_from(ResponseFormatType), texts)
samplings = st.builds(
    Sampling,
    max_tokens=int32s,
    temperature=st.none() | doubles,
    top_p=st.none() | doubles,
    stop=st.lists(texts, **small_tuples).map(tuple),
    seed=st.none() | int64s,
    presence_penalty=st.none() | doubles,
    frequency_penalty=st.none() | doubles,
    logprobs=st.booleans(),
    top_logprobs=st.integers(0, 20),
    response_format=response_formats,
    # Travel as a map: in token order once converted back.
    logit_bias=st.dictionaries(int32s, float32s, max_size=4).map(
        lambda m: tuple(sorted(m.items()))
    ),
)
tool_calls = st.lists(st.builds(ToolCall, texts, texts, texts), **small_tuples).map(tuple)
messages = st.builds(ChatMessage, st.sampled_from(ChatRole), texts, tool_calls, texts, texts)
# A spec offers tools or none (NONE is no tools on the wire).
tool_uses = st.none() | st.builds(
    ToolUse,
    st.lists(st.builds(FunctionTool, texts, texts, texts), min_size=1, max_size=3).map(tuple),
    st.sampled_from([mode for mode in ToolChoiceMode if mode is not ToolChoiceMode.NONE]),
    texts,
    st.booleans(),
)
specs = st.builds(
    GenerationSpec,
    model=texts,
    messages=st.lists(messages, **small_tuples).map(tuple),
    sampling=samplings,
    max_prompt_tokens=int32s,
    prompt=st.none() | texts,
    embed=st.booleans(),
    tool_use=tool_uses,
)
continuations = st.builds(Continuation, texts, int32s, st.lists(int32s, **small_tuples).map(tuple))
regions = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?\Z")
requirements = st.builds(
    NodeRequirements,
    operator_account_ids=st.frozensets(texts, max_size=3),
    regions=st.frozensets(regions, max_size=3),
    min_reputation=st.floats(0.0, 1.0),
    verified_only=st.booleans(),
)


def _wire(message: _M) -> _M:
    """The message as the other end parses it off the wire."""
    return type(message).FromString(message.SerializeToString())


# --- generation ---------------------------------------------------------------------


@given(specs)
def test_a_generation_spec_round_trips(spec: GenerationSpec) -> None:
    assert spec_from_pb(_wire(spec_to_pb(spec))) == spec


@given(logprob_tuples)
def test_logprobs_round_trip(logprobs: tuple[TokenLogprob, ...]) -> None:
    message = _wire(agent_pb.JobChunk(logprobs=logprobs_to_pb(logprobs)))
    assert logprobs_from_pb(message.logprobs) == logprobs


@given(requirements)
def test_node_requirements_round_trip(rules: NodeRequirements) -> None:
    assert requirements_from_pb(_wire(requirements_to_pb(rules))) == rules


# --- job events ---------------------------------------------------------------------


@given(texts, int64s, specs, st.none() | continuations)
def test_an_assignment_round_trips(
    job_id: str, epoch: int, spec: GenerationSpec, continuation: Continuation | None
) -> None:
    command = AssignCommand(job_id, epoch, spec, continuation)
    assert assign_from_pb(_wire(assign_to_pb(command))) == command


@given(st.builds(CancelCommand, texts, int64s))
def test_a_cancellation_round_trips(command: CancelCommand) -> None:
    assert cancel_from_pb(_wire(cancel_to_pb(command))) == command


node_usages = st.builds(NodeUsage, texts, usages, texts)
job_events = st.one_of(
    st.builds(JobAssigned, texts),
    st.builds(
        JobDelta,
        texts,
        int32s,
        int32s,
        logprob_tuples,
        st.lists(float32s, **small_tuples).map(tuple),
    ),
    st.builds(JobMigrated, texts, int64s, texts),
    st.builds(
        JobFinished,
        st.sampled_from(FinishReason),
        usages,
        st.lists(node_usages, **small_tuples).map(tuple),
    ),
)


@given(job_events)
def test_a_dispatch_stream_event_round_trips(event: JobEvent) -> None:
    assert job_event_from_pb(_wire(job_event_to_pb(event))) == event
    assert job_events_from_pb(_wire(job_event_to_pb(event))) == [event]


@given(st.lists(job_events, min_size=2, max_size=5))
def test_dispatch_events_ready_together_round_trip_as_one_batch_in_order(
    events: list[JobEvent],
) -> None:
    assert job_events_from_pb(_wire(job_events_to_pb(events))) == events


def test_a_batch_in_a_batch_gives_nothing() -> None:
    nested = dispatch_pb.RunJobResponse(
        batch=dispatch_pb.JobEvents(events=[job_events_to_pb([JobAssigned("n")])])
    )
    assert job_events_from_pb(nested) == []


# --- agent reports (job chunks and results, heartbeats, session messages) ------------

chunks = st.builds(
    ChunkReport,
    texts,
    int64s,
    texts,
    int32s,
    int32s,
    st.lists(int32s, **small_tuples).map(tuple),
    logprob_tuples,
    st.lists(float32s, **small_tuples).map(tuple),
)
# A result carries the wire number of its reason, as the node signed it.
dones = st.builds(
    lambda job_id, epoch, reason, usage, signature: DoneReport(
        job_id, epoch, reason, usage, signature, finish_reason_to_pb(reason)
    ),
    texts,
    int64s,
    st.sampled_from(FinishReason),
    usages,
    st.binary(max_size=64),
)
faileds = st.builds(
    lambda job_id, epoch, kind, message, usage, signature, param: FailedReport(
        job_id, epoch, kind, message, usage, signature, failure_to_pb(kind), param
    ),
    texts,
    int64s,
    st.sampled_from(FailureKind),
    texts,
    usages,
    st.binary(max_size=64),
    texts,
)
reports = st.one_of(
    st.builds(StartedReport, texts, int64s),
    st.builds(WaitingReport, texts, int64s),
    chunks,
    dones,
    faileds,
    st.builds(
        Heartbeat,
        int32s,
        int32s,
        doubles,
        int64s,
        st.lists(uint64s, max_size=MAX_ADVERTISED_PREFIXES).map(tuple),
    ),
    st.just(Draining()),
    st.builds(ConfigApplied, int64s),
)


@given(reports)
def test_an_agent_report_round_trips(report: AgentReport) -> None:
    assert report_from_pb(_wire(report_to_pb(report))) == report


def test_a_heartbeat_keeps_only_the_newest_advertised_prefixes() -> None:
    sent = tuple(range(MAX_ADVERTISED_PREFIXES + 100))
    message = report_to_pb(Heartbeat(0, 0, 0.0, 0, sent))
    beat = report_from_pb(_wire(message))
    assert isinstance(beat, Heartbeat)
    assert beat.cached_prefixes == sent[:MAX_ADVERTISED_PREFIXES]


@given(st.lists(reports, min_size=2, max_size=5))
def test_reports_ready_together_round_trip_as_one_batch_in_order(
    batch: list[AgentReport],
) -> None:
    message = _wire(batch_to_pb([report_to_pb(report) for report in batch]))
    assert list(reports_from_pb(message)) == batch


def test_a_lone_report_is_its_own_message() -> None:
    report = StartedReport("j", 1)
    assert list(reports_from_pb(report_to_pb(report))) == [report]


def test_a_batch_holds_only_reports() -> None:
    nested = batch_to_pb([batch_to_pb([report_to_pb(Draining())])])
    with pytest.raises(ProtocolViolation):
        reports_from_pb(nested)
    hello = batch_to_pb([agent_pb.ConnectRequest(signed_hello=agent_pb.SignedHello())])
    with pytest.raises(ProtocolViolation):
        reports_from_pb(hello)


def test_an_unknown_failure_reason_is_a_runtime_error_signed_as_sent() -> None:
    message = agent_pb.ConnectRequest(job_failed=agent_pb.JobFailed(job_id="j", epoch=1, reason=7))
    report = report_from_pb(message)
    assert isinstance(report, FailedReport)
    assert (report.kind, report.reason_code) == (FailureKind.RUNTIME_ERROR, 7)


# --- catalog ------------------------------------------------------------------------

catalog_models = st.builds(
    CatalogModel,
    id=texts,
    owned_by=texts,
    price=st.builds(ModelPrice, int64s, int64s),
    context_length=int32s,
    chat_template_overhead_tokens=int32s,
    ready_nodes=int32s,
    # Protobuf timestamps keep microseconds (datetime's precision) exactly.
    created=st.none()
    | st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
    ),
)


@given(st.lists(catalog_models, max_size=4))
def test_the_catalog_round_trips(models: list[CatalogModel]) -> None:
    assert models_from_pb(_wire(models_to_pb(models))) == models


# --- job records (network to cloud) -------------------------------------------------

moments = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)
)
job_records = st.builds(
    JobRecord,
    job_id=texts,
    origin=st.builds(JobOrigin, texts, texts, texts, st.builds(ModelPrice, int64s, int64s)),
    model=texts,
    assignments=st.lists(st.builds(Assignment, texts, int64s, texts, moments), **small_tuples).map(
        tuple
    ),
    usage=usages,
    created_at=moments,
    first_token_at=st.none() | moments,
    finished_at=st.none() | moments,
    outcome=st.sampled_from(JobOutcome),
    detail=texts,
)
job_queries = st.builds(
    JobQuery,
    account_id=texts,
    model=texts,
    outcomes=st.frozensets(st.sampled_from(JobOutcome)),
    request_id=texts,
    created_after=st.none() | moments,
    created_before=st.none() | moments,
)


@given(job_records)
def test_a_job_record_round_trips(record: JobRecord) -> None:
    assert record_from_pb(_wire(record_to_pb(record))) == record


@given(job_queries)
def test_a_job_query_round_trips(query: JobQuery) -> None:
    assert query_from_pb(_wire(query_to_pb(query))) == query
