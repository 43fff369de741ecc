"""Node requirements over real gRPC: jobs run only on nodes meeting the rules,
first assignment and failover alike; ListModels counts those nodes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from google.rpc.error_details_pb2 import ErrorInfo
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from core.convert.generation import spec_to_pb
from core.grpc_errors import error_info
from core.inference import ChatMessage, ChatRole, GenerationSpec, Sampling
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import Platform, RunningAgent, running_platform

LONG_SCRIPT = " ".join(f"w{i}" for i in range(60))
SPEC = spec_to_pb(
    GenerationSpec(
        model=MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, "hello"),),
        sampling=Sampling(max_tokens=100),
        max_prompt_tokens=100,
    )
)


@dataclass
class Fleet:
    platform: Platform
    # Operator account ids.
    a: str
    b: str
    # Agents by "<operator>-<region>[-n]".
    agents: dict[str, RunningAgent]

    @property
    def dispatch(self) -> dispatch_grpc.DispatchServiceStub:
        return dispatch_grpc.DispatchServiceStub(self.platform.channel)

    def name_of(self, node_id: str) -> str:
        [name] = [n for n, a in self.agents.items() if a.session.node_id == node_id]
        return name

    def started(self, name: str) -> int:
        runtime = self.agents[name].runtime
        assert isinstance(runtime, ScriptedRuntime)
        return len(runtime.started_jobs)


@pytest.fixture
async def fleet(postgres_dsn: str) -> AsyncIterator[Fleet]:
    """Two operators, two regions; operator A has two nodes in eu."""
    async with running_platform(postgres_dsn) as platform:
        (a, token_a), (b, token_b) = await platform.operator(), await platform.operator()
        agents = {}
        for name, token, region in (
            ("a-eu", token_a, "eu"),
            ("a-eu-2", token_a, "eu"),
            ("a-us", token_a, "us"),
            ("b-eu", token_b, "eu"),
            ("b-us", token_b, "us"),
        ):
            runtime = ScriptedRuntime(script=LONG_SCRIPT, token_delay_s=0.005)
            agents[name] = await platform.start_agent(
                runtime, name=name, node_token=token, region=region
            )
        yield Fleet(platform, a, b, agents)


def _rules(
    operators: tuple[str, ...] = (), regions: tuple[str, ...] = (), **rest: object
) -> dispatch_pb.NodeRequirements:
    return dispatch_pb.NodeRequirements(
        operator_account_ids=operators,
        regions=regions,
        **rest,  # type: ignore[arg-type]
    )


async def _run(
    fleet: Fleet, job_id: str, rules: dispatch_pb.NodeRequirements
) -> list[dispatch_pb.RunJobResponse]:
    call = fleet.dispatch.RunJob(
        dispatch_pb.RunJobRequest(job_id=job_id, spec=SPEC, requirements=rules),
        metadata=fleet.platform.service,
    )
    return [event async for event in call]


def _nodes(events: list[dispatch_pb.RunJobResponse]) -> list[str]:
    """The job's nodes in order: assigned, then every migration."""
    return [
        e.assigned.node_id if e.WhichOneof("event") == "assigned" else e.migrated.node_id
        for e in events
        if e.WhichOneof("event") in ("assigned", "migrated")
    ]


async def test_jobs_land_only_on_nodes_meeting_the_rules(fleet: Fleet) -> None:
    cases = {
        "operator b": (_rules(operators=(fleet.b,)), {"b-eu", "b-us"}),
        "region us": (_rules(regions=("us",)), {"a-us", "b-us"}),
        "operator a in us": (_rules(operators=(fleet.a,), regions=("us",)), {"a-us"}),
        "both operators in eu": (
            _rules(operators=(fleet.a, fleet.b), regions=("eu",)),
            {"a-eu", "a-eu-2", "b-eu"},
        ),
    }
    for label, (rules, allowed) in cases.items():
        # Concurrent jobs: the least loaded allowed node takes each one.
        runs = await asyncio.gather(*(_run(fleet, f"{label}-{i}", rules) for i in range(4)))
        used = {fleet.name_of(node) for events in runs for node in _nodes(events)}
        assert used <= allowed, label
        for events in runs:
            assert events[-1].finished.usage.completion_tokens == 60


async def test_unmet_rules_mean_no_capacity(fleet: Fleet) -> None:
    for rules in (
        _rules(regions=("ap-south",)),
        _rules(operators=(fleet.b,), min_reputation=1.0, regions=("mars",)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _run(fleet, "nowhere", rules)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sum(fleet.started(name) for name in fleet.agents) == 0


async def test_failover_stays_within_the_rules(fleet: Fleet) -> None:
    """Operator A in eu: the job moves to A's other eu node, and when that one is lost
    too it fails, although nodes of other operators and regions sit idle."""
    rules = _rules(operators=(fleet.a,), regions=("eu",))
    call = fleet.dispatch.RunJob(
        dispatch_pb.RunJobRequest(job_id="failover", spec=SPEC, requirements=rules),
        metadata=fleet.platform.service,
    )
    events: list[dispatch_pb.RunJobResponse] = []

    async def follow_and_kill() -> None:
        deltas = 0
        async for event in call:
            events.append(event)
            if event.WhichOneof("event") == "delta":
                deltas += 1
                if deltas in (5, 15):  # kill whichever node runs the job now
                    await fleet.agents[fleet.name_of(_nodes(events)[-1])].stop()

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await follow_and_kill()
    assert failed.value.code() == grpc.StatusCode.ABORTED
    assert [fleet.name_of(node) for node in _nodes(events)] in (
        ["a-eu", "a-eu-2"],
        ["a-eu-2", "a-eu"],
    )
    assert [e.migrated.epoch for e in events if e.WhichOneof("event") == "migrated"] == [2]
    for name in ("a-us", "b-eu", "b-us"):
        assert fleet.started(name) == 0


async def test_list_models_counts_nodes_meeting_the_rules(fleet: Fleet) -> None:
    async def ready(rules: dispatch_pb.NodeRequirements) -> int:
        listed = await fleet.dispatch.ListModels(
            dispatch_pb.ListModelsRequest(requirements=rules), metadata=fleet.platform.service
        )
        [model] = [m for m in listed.models if m.id == MODEL_ID]
        return model.ready_nodes

    assert await ready(_rules()) == 5
    assert await ready(_rules(regions=("eu",))) == 3
    assert await ready(_rules(operators=(fleet.b,))) == 2
    assert await ready(_rules(operators=(fleet.a,), regions=("us",))) == 1
    # Every node has an operator's token and no failed canary.
    assert await ready(_rules(verified_only=True, min_reputation=1.0)) == 5
    assert await ready(_rules(regions=("ap-south",))) == 0


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        (_rules(regions=("EU West",)), "requirements.regions"),
        (_rules(min_reputation=1.5), "requirements.min_reputation"),
    ],
)
async def test_malformed_rules_are_refused(
    fleet: Fleet, rules: dispatch_pb.NodeRequirements, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _run(fleet, "malformed", rules)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info: ErrorInfo | None = error_info(refused.value)
    assert info is not None
    assert info.metadata["field"] == field
