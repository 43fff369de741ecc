"""The cloud's InferenceService against in-memory ports: every way a request ends
settles its hold once, for what the caller received."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Literal

import pytest

from core.errors import InsufficientQuota, JobFailed
from core.inference import (
    CatalogModel,
    ChatMessage,
    ChatRole,
    FinishReason,
    JobAssigned,
    JobDelta,
    JobEvent,
    JobOrigin,
    ModelPrice,
    Usage,
)
from server.cloud.inference import InferenceService
from server.cloud.inflight import InFlightLeases
from server.cloud.ports import Caller, OperatorLine, OperatorShares
from server.cloud.pricing import cost
from server.cloud.requests import ChatRequest, CompletionEvent, ContentDelta, TextRequest
from server.cloud.settler import Settler
from server.common.settlement_queue import InProcessSettlementQueue
from tests.doubles.cloud_ports import (
    STALL,
    FakeAccount,
    FakeNetwork,
    InMemoryInFlight,
    completion,
)

PRICE = ModelPrice(prompt=2, completion=5)
MODEL = CatalogModel("m", "resultity", PRICE, 1024, chat_template_overhead_tokens=10, ready_nodes=1)
KEY = "sk-customer"
AUTHORIZATION = f"Bearer {KEY}"
CREDITS = 1_000_000
HI = (ChatMessage(ChatRole.USER, "hi"),)


@pytest.fixture
def account() -> FakeAccount:
    return FakeAccount()


@pytest.fixture
def customer(account: FakeAccount) -> Caller:
    return account.add_customer(KEY, CREDITS)


@pytest.fixture
def network() -> FakeNetwork:
    return FakeNetwork([MODEL])


@pytest.fixture
def inflight() -> InMemoryInFlight:
    return InMemoryInFlight()


@pytest.fixture
def service(
    account: FakeAccount, network: FakeNetwork, inflight: InMemoryInFlight
) -> InferenceService:
    return InferenceService(
        account,
        network,
        settlements=Settler(account, InProcessSettlementQueue()),
        inflight=InFlightLeases(inflight, lease_s=60),
    )


def _chat(n: int = 1) -> ChatRequest:
    return ChatRequest(model="m", messages=HI, max_tokens=16, n=n)


def _node_of(script: Sequence[JobEvent]) -> str:
    assigned = script[0]
    assert isinstance(assigned, JobAssigned)
    return assigned.node_id


async def test_a_completion_is_charged_what_it_delivered_and_credits_its_operator(
    service: InferenceService, account: FakeAccount, network: FakeNetwork, customer: Caller
) -> None:
    script = completion(["a", "b", "c"], prompt_tokens=7, operator="op-1")
    network.scripts.append(script)

    done = await service.complete(AUTHORIZATION, _chat(), "req-1")

    charged = cost(PRICE, Usage(7, 3))
    assert done.choices[0].content == "abc"
    assert (done.finished.usage, done.finished.charged) == (Usage(7, 3), charged)
    [settlement] = account.settlements
    assert settlement.capture == charged
    assert settlement.shares == OperatorShares(
        (OperatorLine("op-1", _node_of(script), "m", 10),), 10
    )
    assert account.available[customer.account_id] == CREDITS - charged
    assert network.jobs[0].closed
    # The record names whose request it served and at which prices.
    assert network.jobs[0].origin == JobOrigin("req-1", customer.account_id, "", PRICE)


async def _leave_after_two_deltas(
    stream: AsyncGenerator[CompletionEvent, None], how: Literal["close", "cancel"]
) -> None:
    """The client goes away once it has two content deltas: it closes the stream, or
    its task is cancelled while the node is still generating."""
    two_deltas = asyncio.Event()

    async def consume() -> None:
        deltas = 0
        async for event in stream:
            deltas += isinstance(event, ContentDelta)
            if deltas == 2:
                two_deltas.set()
                if how == "close":
                    await stream.aclose()
                    return

    task = asyncio.create_task(consume())
    await two_deltas.wait()
    if how == "cancel":
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("how", ["close", "cancel"])
async def test_a_client_leaving_mid_stream_is_charged_what_it_received(
    how: Literal["close", "cancel"],
    service: InferenceService,
    account: FakeAccount,
    network: FakeNetwork,
    inflight: InMemoryInFlight,
    customer: Caller,
) -> None:
    network.scripts.append([*completion(["a", "b"], prompt_tokens=7, operator="op-1")[:3], STALL])

    await _leave_after_two_deltas(service.stream(AUTHORIZATION, _chat(), "req-1"), how)
    await service.drain()

    charged = cost(PRICE, Usage(7, 2))
    # The node never reported its signed usage: its tokens earn the platform.
    assert [(s.capture, s.shares) for s in account.settlements] == [
        (charged, OperatorShares((), 9))
    ]
    assert account.available[customer.account_id] == CREDITS - charged
    assert network.jobs[0].closed
    # Settled, so no longer leased as in flight.
    assert inflight.requests == {}


async def test_a_failed_node_is_charged_what_it_delivered(
    service: InferenceService, account: FakeAccount, network: FakeNetwork, customer: Caller
) -> None:
    network.scripts.append(
        [JobAssigned("node-x"), JobDelta("a", 1, 7), JobFailed("the node went away")]
    )

    with pytest.raises(JobFailed):
        await service.complete(AUTHORIZATION, _chat(), "req-1")

    charged = cost(PRICE, Usage(7, 1))
    assert [(s.capture, s.shares) for s in account.settlements] == [
        (charged, OperatorShares((), 8))
    ]
    assert account.available[customer.account_id] == CREDITS - charged


async def test_n_choices_are_settled_once_each_with_its_prompt(
    service: InferenceService, account: FakeAccount, network: FakeNetwork, customer: Caller
) -> None:
    first, second, third = (
        completion(["a", "b"], prompt_tokens=7, operator="op-a"),
        completion(["c", "d", "e"], prompt_tokens=7, operator="op-b"),
        completion(["f"], prompt_tokens=7, operator="op-a", finish_reason=FinishReason.LENGTH),
    )
    network.scripts.extend([first, second, third])

    done = await service.complete(AUTHORIZATION, _chat(n=3), "req-1")

    assert [(c.index, c.content) for c in done.choices] == [(0, "ab"), (1, "cde"), (2, "f")]
    assert [job.spec.messages for job in network.jobs] == [HI, HI, HI]
    charged = cost(PRICE, Usage(21, 6))
    assert (done.finished.usage, done.finished.charged) == (Usage(21, 6), charged)
    # One line per operator, named after its first node.
    [settlement] = account.settlements
    assert settlement.capture == charged
    assert settlement.shares == OperatorShares(
        (
            OperatorLine("op-a", _node_of(first), "m", 9 + 8),
            OperatorLine("op-b", _node_of(second), "m", 10),
        ),
        27,
    )
    assert account.available[customer.account_id] == CREDITS - charged


async def test_text_choices_run_and_bill_each_prompt(
    service: InferenceService, account: FakeAccount, network: FakeNetwork
) -> None:
    account.add_customer(KEY, CREDITS)
    network.scripts.extend(
        completion(["x"], prompt_tokens=prompt_tokens) for prompt_tokens in (1, 1, 3, 3)
    )
    request = TextRequest(model="m", prompts=("one", "three"), max_tokens=4, n=2)

    done = await service.complete_text(AUTHORIZATION, request, "req-1")

    assert [job.spec.prompt for job in network.jobs] == ["one", "one", "three", "three"]
    assert done.finished.usage == Usage(8, 4)
    assert [s.capture for s in account.settlements] == [cost(PRICE, Usage(8, 4))]


async def test_a_choice_failing_after_another_finished_credits_only_the_finished_one(
    service: InferenceService, account: FakeAccount, network: FakeNetwork, customer: Caller
) -> None:
    first = completion(["a", "b"], prompt_tokens=7, operator="op-a")
    network.scripts.extend(
        [first, [JobAssigned("node-y"), JobDelta("c", 1, 7), JobFailed("the node went away")]]
    )

    with pytest.raises(JobFailed):
        await service.complete(AUTHORIZATION, _chat(n=2), "req-1")

    charged = cost(PRICE, Usage(14, 3))
    assert [(s.capture, s.shares) for s in account.settlements] == [
        (charged, OperatorShares((OperatorLine("op-a", _node_of(first), "m", 9),), 17))
    ]
    assert account.available[customer.account_id] == CREDITS - charged


async def test_without_funds_the_request_is_refused_and_nothing_runs(
    service: InferenceService, account: FakeAccount, network: FakeNetwork
) -> None:
    poor = account.add_customer("sk-poor", 10)

    with pytest.raises(InsufficientQuota):
        await service.complete("Bearer sk-poor", _chat(), "req-1")

    assert network.jobs == []
    assert account.holds == {}
    assert account.settlements == []
    assert account.available[poor.account_id] == 10


async def test_settlement_outlives_a_client_cancelled_while_settling_and_is_drained(
    service: InferenceService, account: FakeAccount, network: FakeNetwork, customer: Caller
) -> None:
    account.settle_gate = asyncio.Event()
    network.scripts.append(completion(["a"], prompt_tokens=7))
    request = asyncio.create_task(service.complete(AUTHORIZATION, _chat(), "req-1"))
    await account.settling.wait()

    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    drained = asyncio.create_task(service.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    assert account.settlements == []

    account.settle_gate.set()
    await drained
    charged = cost(PRICE, Usage(7, 1))
    assert [s.capture for s in account.settlements] == [charged]
    assert account.available[customer.account_id] == CREDITS - charged
