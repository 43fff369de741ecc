"""Hypothesis-driven hostile calls to cloud's inference and jobs APIs and, through the
network's dispatch API, to an agent's job handling, on a real platform.

The property: every refusal is a domain error (a status with ErrorInfo, never
INTERNAL or UNKNOWN), and the node is still connected and serving afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.cloud.v1 import inference_service_pb2_grpc as pb_grpc
from resultity.cloud.v1 import job_service_pb2 as jobs_pb
from resultity.cloud.v1 import job_service_pb2_grpc as jobs_grpc
from resultity.common.v1 import inference_pb2 as common_pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from core.grpc_errors import error_info
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import Customer, Platform, running_platform

pytestmark = pytest.mark.fuzz

EXAMPLES = 150
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
HOSTILE_TEXT = st.text() | st.sampled_from(["", "x" * 100_000, "\x00", "\U0010ffff" * 300])
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
SHORT = st.text(min_size=1, max_size=12)


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


MESSAGES = st.lists(
    st.builds(common_pb.ChatMessage, role=st.integers(1, 3), content=SHORT),
    min_size=1,
    max_size=2,
)
HOSTILE_MESSAGES = st.lists(
    st.builds(common_pb.ChatMessage, role=st.integers(0, 3), content=HOSTILE_TEXT), max_size=5
)
# Sensible values, so that most cases reach the node...
VALID: dict[str, st.SearchStrategy[Any]] = {
    "model": st.just(SMOLLM2_135M.id),
    "max_tokens": _maybe(st.integers(1, 32)),
    "temperature": _maybe(st.floats(0, 2)),
    "top_p": _maybe(st.floats(0.01, 1)),
    "stop": st.lists(SHORT, max_size=2),
    "seed": _maybe(INT64),
    "user": st.text(max_size=8),
    "n": _maybe(st.integers(1, 2)),
    "presence_penalty": _maybe(st.floats(-2, 2)),
    "frequency_penalty": _maybe(st.floats(-2, 2)),
    "logprobs": st.booleans(),
    "top_logprobs": st.none(),
    "region": st.just(""),
}
# ...and what a hostile caller sends instead, a few fields at a time.
HOSTILE: dict[str, st.SearchStrategy[Any]] = {
    "model": HOSTILE_TEXT,
    "max_tokens": _maybe(INT32),
    "temperature": FLOATS,
    "top_p": FLOATS,
    "stop": st.lists(HOSTILE_TEXT, max_size=6),
    "seed": INT64,
    "user": HOSTILE_TEXT,
    "n": INT32,
    "presence_penalty": FLOATS,
    "frequency_penalty": FLOATS,
    "top_logprobs": INT32,
    "region": HOSTILE_TEXT,
}


@st.composite
def _hostile_message(
    draw: st.DrawFn,
    cls: type[Any],
    valid: dict[str, st.SearchStrategy[Any]],
    hostile: dict[str, st.SearchStrategy[Any]],
) -> Any:
    """A sensible message with up to three of its fields replaced by hostile values."""
    fields = {name: draw(strategy) for name, strategy in valid.items()}
    for name in draw(st.sets(st.sampled_from(sorted(hostile)), max_size=3)):
        fields[name] = draw(hostile[name])
    return cls(**{name: value for name, value in fields.items() if value is not None})


def _params(cls: type[Any], **extra: tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]) -> Any:
    valid = {**VALID, **{name: pair[0] for name, pair in extra.items()}}
    hostile = {**HOSTILE, **{name: pair[1] for name, pair in extra.items()}}
    return _hostile_message(cls, valid, hostile)


RESPONSE_FORMATS = (
    st.none(),
    st.builds(
        common_pb.ResponseFormat,
        type=st.integers(0, 5),
        json_schema=st.sampled_from(["", "{}", "[]", "{", '{"type":"object"}']) | HOSTILE_TEXT,
    ),
)
CHAT = _params(
    pb.ChatCompletionParams,
    messages=(MESSAGES, HOSTILE_MESSAGES),
    response_format=RESPONSE_FORMATS,
)
CALLS: list[tuple[str, st.SearchStrategy[Any]]] = [
    ("CreateChatCompletion", st.builds(pb.CreateChatCompletionRequest, params=CHAT)),
    ("StreamChatCompletion", st.builds(pb.StreamChatCompletionRequest, params=CHAT)),
    (
        "CreateCompletion",
        st.builds(
            pb.CreateCompletionRequest,
            params=_params(
                pb.CompletionParams,
                prompts=(st.lists(SHORT, min_size=1, max_size=2), st.lists(HOSTILE_TEXT)),
            ),
        ),
    ),
    (
        "CreateEmbeddings",
        _hostile_message(
            pb.CreateEmbeddingsRequest,
            {"model": VALID["model"], "inputs": st.lists(SHORT, min_size=1, max_size=3)},
            {
                "model": HOSTILE_TEXT,
                "inputs": st.lists(HOSTILE_TEXT, max_size=100),
                "user": HOSTILE_TEXT,
                "region": HOSTILE_TEXT,
            },
        ),
    ),
    ("GetModel", st.builds(pb.GetModelRequest, model=VALID["model"] | HOSTILE_TEXT)),
]
SAMPLING = _hostile_message(
    common_pb.SamplingParams,
    {
        "max_tokens": st.integers(1, 32),
        "temperature": st.floats(0, 2),
        "stop": st.lists(SHORT, max_size=2),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5),
    },
    {
        "max_tokens": INT32,
        "temperature": FLOATS,
        "top_p": FLOATS,
        "stop": st.lists(HOSTILE_TEXT, max_size=6),
        "seed": INT64,
        "presence_penalty": FLOATS,
        "frequency_penalty": FLOATS,
        "top_logprobs": INT32,
    },
)
SPECS = _hostile_message(
    common_pb.GenerationSpec,
    {
        "model": VALID["model"],
        "messages": MESSAGES,
        "sampling": SAMPLING,
        "max_prompt_tokens": st.integers(64, 512),
        "embed": st.booleans(),
    },
    {
        "model": HOSTILE_TEXT,
        "messages": HOSTILE_MESSAGES,
        "max_prompt_tokens": INT32,
        "prompt": HOSTILE_TEXT,
    },
)


TIMESTAMPS = st.none() | st.builds(Timestamp, seconds=INT64, nanos=INT32)
# The jobs API read with the service token, so that nothing stops a case before
# its filters reach cloud's checks and the network's query.
JOB_CALLS: list[tuple[str, st.SearchStrategy[Any]]] = [
    (
        "ListJobs",
        st.builds(
            jobs_pb.ListJobsRequest,
            account_id=HOSTILE_TEXT | st.just(str(uuid.uuid4())),
            model=HOSTILE_TEXT,
            outcomes=st.lists(INT32, max_size=3),
            request_id=HOSTILE_TEXT,
            created_after=TIMESTAMPS,
            created_before=TIMESTAMPS,
            page_size=INT32,
            page_token=HOSTILE_TEXT,
        ),
    ),
    ("GetJob", st.builds(jobs_pb.GetJobRequest, job_id=HOSTILE_TEXT, with_log=st.booleans())),
]


def _refusal(error: grpc.RpcError) -> str | None:
    """None for a proper refusal, else what is wrong with it."""
    assert isinstance(error, grpc.Call)
    code = error.code()
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return f"{code.name}: {error.details()}"
    if error_info(error) is None and not isinstance(error, grpc.aio.AioRpcError):
        # The sync API's errors carry trailing metadata too.
        trailing = dict(error.trailing_metadata() or ())
        if "grpc-status-details-bin" not in trailing:
            return f"{code.name} without ErrorInfo: {error.details()}"
    return None


def _hostile(test: Callable[..., None]) -> Callable[..., None]:
    return settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )(test)


def _check_calls(
    rpc: Any,
    streams: bool,
    requests: st.SearchStrategy[Any],
    call: Callable[[Callable[[], Any], str], None],
    metadata: tuple[tuple[str, str], ...],
) -> Callable[[], None]:
    @given(request=requests)
    @_hostile
    def check(request: Any) -> None:
        def invoke() -> Any:
            answer = rpc(request, metadata=metadata, timeout=30)
            return list(answer) if streams else answer

        call(invoke, f"{type(request).__name__} {str(request)[:300]!r}")

    return check


def _run_hostile(
    target: str, customer: Customer, service: tuple[tuple[str, str], ...]
) -> list[str]:
    """Runs in a worker thread with the blocking gRPC API while the platform serves."""
    failures: list[str] = []
    with grpc.insecure_channel(target) as channel:
        cloud = pb_grpc.InferenceServiceStub(channel)
        dispatch = dispatch_grpc.DispatchServiceStub(channel)

        def call(invoke: Callable[[], Any], what: str) -> None:
            try:
                invoke()
            except grpc.RpcError as error:
                problem = _refusal(error)
                if problem is not None:
                    failures.append(f"{what}: {problem}")

        for method, requests in CALLS:
            _check_calls(
                getattr(cloud, method),
                method.startswith("Stream"),
                requests,
                call,
                customer.metadata,
            )()

        @given(spec=SPECS)
        @_hostile
        def check_job(spec: common_pb.GenerationSpec) -> None:
            request = dispatch_pb.RunJobRequest(job_id=uuid.uuid4().hex, spec=spec)
            call(
                lambda: list(dispatch.RunJob(request, metadata=service, timeout=30)),
                f"RunJob {str(spec)[:300]!r}",
            )

        check_job()

        jobs = jobs_grpc.JobServiceStub(channel)
        for method, requests in JOB_CALLS:
            _check_calls(getattr(jobs, method), False, requests, call, service)()
    return failures


@pytest.fixture(scope="module")
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        await running.start_agent(ScriptedRuntime(), batch_tokens=8)
        yield running


async def test_hostile_calls_get_domain_errors_and_the_node_still_serves(
    platform: Platform,
) -> None:
    customer = await platform.customer(10**12)
    (agent,) = platform.agents

    failures = await asyncio.to_thread(_run_hostile, platform.target, customer, platform.service)

    assert failures == []
    assert [node.node_id for node in platform.network.service.nodes()] == [agent.session.node_id]
    response = await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(
            params=pb.ChatCompletionParams(
                model=SMOLLM2_135M.id,
                messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
            )
        ),
        metadata=customer.metadata,
    )
    assert response.choices[0].message.content
