"""Holds and settlements in batch calls, on the real account server and PostgreSQL.

The account server's CreateHolds and SettleHolds give each item what CreateHold and
SettleHold give it: its hold, or the same status (code, message, ErrorInfo). Cloud's
ledger client sends a lone call as the unary call and calls made together as one
batch call; each caller gets what the unary call would have given it, a failed
batch call included (a settlement the ledger did not answer goes to the queue).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from resultity.account.v1 import api_key_service_pb2 as key_pb
from resultity.account.v1 import ledger_service_pb2 as ledger_pb

from core.batch_calls import MAX_ITEMS
from core.errors import (
    HoldAlreadyResolved,
    IdempotencyKeyReused,
    InsufficientQuota,
    NoCapacity,
    NotFound,
)
from core.grpc_errors import Failure, error_info
from core.metadata import bearer_metadata
from core.replica_channels import ReplicaChannels
from server.account.authz import Principal
from server.account.component import AccountComponent
from server.cloud.clients import GrpcAccountClient
from server.cloud.settler import Settler
from server.common.settlement_queue import InProcessSettlementQueue
from server.common.settlements import LedgerUnavailable, OperatorShares, Settlement
from server.secrets import PlatformSecrets
from tests.account_support import Stubs, channel_as, expect_error
from tests.harness import until

Code = grpc.StatusCode
ADMIN = Principal.service()
SECRETS = PlatformSecrets.generate()
LEDGER = "/resultity.account.v1.LedgerService/"
NO_SHARES = OperatorShares((), 0)


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor


class LedgerCalls(_ServerInterceptor):
    """Records the ledger methods called; can fail the batch calls with a status
    (no ErrorInfo: the transport, or a replica that lacks them)."""

    def __init__(self) -> None:
        self.methods: list[str] = []
        self.fail_batches: Code | None = None

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = details.method
        if method.startswith(LEDGER):
            self.methods.append(method.removeprefix(LEDGER))
            code = self.fail_batches
            if code is not None and method.endswith("Holds"):

                async def fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                    await context.abort(code, "the batch call failed")

                return grpc.unary_unary_rpc_method_handler(fail)
        return await continuation(details)


@pytest.fixture(scope="module")
async def component(postgres_dsn: str) -> AsyncIterator[AccountComponent]:
    component = await AccountComponent.start(postgres_dsn, SECRETS, hold_sweep_interval_s=3600)
    yield component
    await component.stop()


@pytest.fixture(scope="module")
async def served(component: AccountComponent) -> AsyncIterator[tuple[str, LedgerCalls]]:
    calls = LedgerCalls()
    server = grpc.aio.server(interceptors=[calls])
    component.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", calls
    await server.stop(grace=None)


@pytest.fixture
async def calls(served: tuple[str, LedgerCalls]) -> LedgerCalls:
    _, calls = served
    calls.methods.clear()
    calls.fail_batches = None
    return calls


@pytest.fixture
async def stubs(served: tuple[str, LedgerCalls]) -> AsyncIterator[Stubs]:
    async with channel_as(served[0], SECRETS.service_token) as channel:
        yield Stubs.on(channel)


@pytest.fixture
async def client(served: tuple[str, LedgerCalls]) -> AsyncIterator[GrpcAccountClient]:
    replicas = ReplicaChannels(served[0])
    yield GrpcAccountClient(replicas, SECRETS.service_token)
    await replicas.close()


def key() -> str:
    return uuid.uuid4().hex


async def funded(component: AccountComponent, funds: int) -> str:
    account = await component.service.create_account(ADMIN, "consumer")
    if funds:
        await component.billing.top_up(ADMIN, str(account.account_id), funds, key())
    return str(account.account_id)


async def balance(component: AccountComponent, account_id: str) -> tuple[int, int]:
    got = await component.billing.get_balance(ADMIN, account_id)
    return got.available, got.held


def hold_request(account_id: str, amount: int, idempotency_key: str) -> ledger_pb.CreateHoldRequest:
    return ledger_pb.CreateHoldRequest(
        account_id=account_id, amount_micro_credits=amount, idempotency_key=idempotency_key
    )


async def unary_status(call: Awaitable[Any]) -> tuple[int, str, Any]:
    """The status a failed unary call ended with: code, message, ErrorInfo."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    error = raised.value
    return error.code().value[0], error.details() or "", error_info(error)


def item_status(result: Any) -> tuple[int, str, Any]:
    """The status a batch call's item failed with: code, message, ErrorInfo."""
    assert result.WhichOneof("result") == "error"
    return result.error.code, result.error.message, Failure.of_status(result.error).info


# The account server's batch calls


async def test_create_holds_gives_each_item_its_hold_or_the_unary_call_s_status(
    component: AccountComponent, stubs: Stubs
) -> None:
    account_id = await funded(component, 1_000)
    taken = key()
    await stubs.ledger.CreateHold(hold_request(account_id, 100, taken))
    first = key()
    failing = [
        hold_request(account_id, 2_000, key()),  # more than the account has
        hold_request(account_id, 200, taken),  # a key reused with another amount
        hold_request(account_id, 0, key()),  # not a valid amount
        hold_request(str(uuid.uuid4()), 10, key()),  # no such account
    ]
    items = [hold_request(account_id, 400, first), *failing, hold_request(account_id, 400, first)]
    response = await stubs.ledger.CreateHolds(ledger_pb.CreateHoldsRequest(items=items))

    assert len(response.results) == len(items)
    made, *errors, replayed = response.results
    assert made.response.hold.amount_micro_credits == 400
    assert made.response.hold.status == ledger_pb.HOLD_STATUS_OPEN
    assert replayed.response == made.response  # the same key in one call: a replay
    for request, result in zip(failing, errors, strict=True):
        assert item_status(result) == await unary_status(stubs.ledger.CreateHold(request))
    reasons = [item_status(result)[2].reason for result in errors]
    assert reasons == [
        "INSUFFICIENT_QUOTA",
        "IDEMPOTENCY_KEY_REUSED",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
    ]
    assert await balance(component, account_id) == (500, 500)


async def test_settle_holds_gives_each_item_its_hold_or_the_unary_call_s_status(
    component: AccountComponent, stubs: Stubs
) -> None:
    account_id = await funded(component, 1_000)
    holds = [
        (await stubs.ledger.CreateHold(hold_request(account_id, 300, key()))).hold.hold_id
        for _ in range(3)
    ]
    settled = ledger_pb.SettleHoldRequest(hold_id=holds[0], capture_micro_credits=100)
    await stubs.ledger.SettleHold(settled)
    failing = [
        ledger_pb.SettleHoldRequest(hold_id=holds[0], capture_micro_credits=200),  # resolved
        ledger_pb.SettleHoldRequest(hold_id=holds[1], capture_micro_credits=301),  # too much
        ledger_pb.SettleHoldRequest(hold_id=str(uuid.uuid4())),  # no such hold
    ]
    items = [
        ledger_pb.SettleHoldRequest(hold_id=holds[1], capture_micro_credits=250),
        *failing,
        settled,  # a replay
        ledger_pb.SettleHoldRequest(hold_id=holds[2], capture_micro_credits=0),
    ]
    response = await stubs.ledger.SettleHolds(ledger_pb.SettleHoldsRequest(items=items))

    captured, *errors, replay, released = response.results
    assert captured.response.hold.captured_micro_credits == 250
    assert captured.response.hold.status == ledger_pb.HOLD_STATUS_SETTLED
    assert replay.response.hold.captured_micro_credits == 100
    assert released.response.hold.status == ledger_pb.HOLD_STATUS_RELEASED
    for request, result in zip(failing, errors, strict=True):
        assert item_status(result) == await unary_status(stubs.ledger.SettleHold(request))
    reasons = [item_status(result)[2].reason for result in errors]
    assert reasons == ["HOLD_ALREADY_RESOLVED", "INVALID_ARGUMENT", "NOT_FOUND"]
    assert await balance(component, account_id) == (650, 0)


async def test_a_batch_over_the_bound_is_refused_whole(
    component: AccountComponent, stubs: Stubs
) -> None:
    account_id = await funded(component, 10_000)
    items = [hold_request(account_id, 1, key()) for _ in range(MAX_ITEMS + 1)]
    info = await expect_error(
        stubs.ledger.CreateHolds(ledger_pb.CreateHoldsRequest(items=items)),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert info.metadata["field"] == "items"
    settlements = [ledger_pb.SettleHoldRequest(hold_id=str(uuid.uuid4()))] * (MAX_ITEMS + 1)
    await expect_error(
        stubs.ledger.SettleHolds(ledger_pb.SettleHoldsRequest(items=settlements)),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert await balance(component, account_id) == (10_000, 0)
    full = await stubs.ledger.CreateHolds(ledger_pb.CreateHoldsRequest(items=items[:MAX_ITEMS]))
    assert all(result.HasField("response") for result in full.results)
    assert await balance(component, account_id) == (10_000 - MAX_ITEMS, MAX_ITEMS)


async def test_batch_calls_need_admin_rights(component: AccountComponent, stubs: Stubs) -> None:
    account_id = await funded(component, 1_000)
    issued = await stubs.keys.CreateApiKey(
        key_pb.CreateApiKeyRequest(
            account_id=account_id,
            scopes=[key_pb.API_KEY_SCOPE_INFERENCE, key_pb.API_KEY_SCOPE_MANAGEMENT],
        )
    )
    user = bearer_metadata(issued.secret)
    holds = ledger_pb.CreateHoldsRequest(items=[hold_request(account_id, 1, key())])
    settlements = ledger_pb.SettleHoldsRequest(items=[ledger_pb.SettleHoldRequest()])
    for call in (
        stubs.ledger.CreateHolds(holds, metadata=user),
        stubs.ledger.SettleHolds(settlements, metadata=user),
        stubs.ledger.CreateHolds(ledger_pb.CreateHoldsRequest(), metadata=user),
    ):
        await expect_error(call, Code.PERMISSION_DENIED, "PERMISSION_DENIED")
    await expect_error(
        stubs.ledger.CreateHolds(holds, metadata=bearer_metadata("rst_not-the-token")),
        Code.UNAUTHENTICATED,
        "INVALID_API_KEY",
    )
    assert await balance(component, account_id) == (1_000, 0)


# Cloud's ledger client


def expires() -> datetime:
    return datetime.now(UTC) + timedelta(minutes=5)


async def test_a_lone_hold_and_settlement_use_the_unary_calls(
    component: AccountComponent, client: GrpcAccountClient, calls: LedgerCalls
) -> None:
    account_id = await funded(component, 1_000)
    hold = await client.create_hold(account_id, 600, idempotency_key=key(), expires=expires())
    assert hold.amount == 600
    assert await client.settle_hold(hold.hold_id, 250, NO_SHARES) == 250
    assert calls.methods == ["CreateHold", "SettleHold"]
    assert await balance(component, account_id) == (750, 0)


async def test_calls_made_together_travel_in_one_batch_call(
    component: AccountComponent, client: GrpcAccountClient, calls: LedgerCalls
) -> None:
    account_id = await funded(component, 10_000)
    holds = await asyncio.gather(
        *(
            client.create_hold(account_id, 100, idempotency_key=key(), expires=expires())
            for _ in range(20)
        )
    )
    assert len({hold.hold_id for hold in holds}) == 20
    assert await balance(component, account_id) == (8_000, 2_000)
    captured = await asyncio.gather(
        *(client.settle_hold(hold.hold_id, 40, NO_SHARES) for hold in holds)
    )
    assert captured == [40] * 20
    assert calls.methods == ["CreateHolds", "SettleHolds"]
    assert await balance(component, account_id) == (10_000 - 20 * 40, 0)


async def test_more_than_a_batch_s_bound_makes_several_batch_calls(
    component: AccountComponent, client: GrpcAccountClient, calls: LedgerCalls
) -> None:
    account_id = await funded(component, 10_000)
    holds = await asyncio.gather(
        *(
            client.create_hold(account_id, 1, idempotency_key=key(), expires=expires())
            for _ in range(MAX_ITEMS + 10)
        )
    )
    assert len({hold.hold_id for hold in holds}) == MAX_ITEMS + 10
    assert calls.methods == ["CreateHolds", "CreateHolds"]


async def test_each_caller_gets_its_own_item_s_error(
    component: AccountComponent, client: GrpcAccountClient, calls: LedgerCalls
) -> None:
    account_id = await funded(component, 1_000)
    taken = key()
    first = await client.create_hold(account_id, 100, idempotency_key=taken, expires=expires())

    async def hold(amount: int, idempotency_key: str) -> Any:
        try:
            return await client.create_hold(
                account_id, amount, idempotency_key=idempotency_key, expires=expires()
            )
        except Exception as error:
            return error

    made, poor, reused = await asyncio.gather(hold(300, key()), hold(5_000, key()), hold(7, taken))
    assert made.amount == 300
    assert isinstance(poor, InsufficientQuota)
    assert isinstance(reused, IdempotencyKeyReused)

    async def settle(hold_id: str, capture: int) -> Any:
        try:
            return await client.settle_hold(hold_id, capture, NO_SHARES)
        except Exception as error:
            return error

    await client.settle_hold(first.hold_id, 50, NO_SHARES)
    outcomes = await asyncio.gather(
        settle(made.hold_id, 300), settle(first.hold_id, 60), settle(str(uuid.uuid4()), 1)
    )
    assert outcomes[0] == 300
    assert isinstance(outcomes[1], HoldAlreadyResolved)
    assert isinstance(outcomes[2], NotFound)
    assert calls.methods == ["CreateHold", "CreateHolds", "SettleHold", "SettleHolds"]
    assert await balance(component, account_id) == (650, 0)


async def test_calls_with_one_key_never_share_a_batch(
    component: AccountComponent, client: GrpcAccountClient, calls: LedgerCalls
) -> None:
    account_id = await funded(component, 1_000)
    retried = key()
    holds = await asyncio.gather(
        client.create_hold(account_id, 100, idempotency_key=retried, expires=expires()),
        client.create_hold(account_id, 100, idempotency_key=retried, expires=expires()),
        client.create_hold(account_id, 100, idempotency_key=key(), expires=expires()),
    )
    assert holds[0] == holds[1]
    assert calls.methods == ["CreateHolds", "CreateHold"]
    assert await balance(component, account_id) == (800, 200)


@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED])
async def test_a_failed_batch_call_fails_each_caller_as_the_unary_call_would(
    component: AccountComponent, client: GrpcAccountClient, calls: LedgerCalls, code: Code
) -> None:
    account_id = await funded(component, 1_000)
    holds = [
        await client.create_hold(account_id, 100, idempotency_key=key(), expires=expires())
        for _ in range(3)
    ]
    calls.methods.clear()
    calls.fail_batches = code
    failed = await asyncio.gather(
        *(
            client.create_hold(account_id, 100, idempotency_key=key(), expires=expires())
            for _ in range(3)
        ),
        return_exceptions=True,
    )
    assert all(isinstance(error, NoCapacity) for error in failed)
    assert len({id(error) for error in failed}) == 3  # each caller its own
    unsent = await asyncio.gather(
        *(client.settle_hold(hold.hold_id, 50, NO_SHARES) for hold in holds),
        return_exceptions=True,
    )
    assert all(isinstance(error, LedgerUnavailable) for error in unsent)

    # The settler sends what the ledger did not answer to the queue.
    queue = InProcessSettlementQueue()
    settler = Settler(client, queue)
    charged = await asyncio.gather(
        *(settler.settle(Settlement(hold.hold_id, 50, NO_SHARES)) for hold in holds)
    )
    assert charged == [50] * 3
    assert await queue.pending() == 3
    assert calls.methods == ["CreateHolds", "SettleHolds", "SettleHolds"]
    assert await balance(component, account_id) == (700, 300)

    # Back, the ledger applies the queued settlements.
    calls.fail_batches = None
    await settler.consume_queue()
    try:
        await until(queue.pending, lambda pending: pending == 0)
    finally:
        await queue.close()
    assert await balance(component, account_id) == (850, 0)


async def test_a_replica_without_the_batch_calls_gets_each_call_alone(
    component: AccountComponent, client: GrpcAccountClient, calls: LedgerCalls
) -> None:
    account_id = await funded(component, 1_000)
    calls.fail_batches = Code.UNIMPLEMENTED
    holds = await asyncio.gather(
        *(
            client.create_hold(account_id, 100, idempotency_key=key(), expires=expires())
            for _ in range(2)
        )
    )
    captured = await asyncio.gather(
        *(client.settle_hold(hold.hold_id, 30, NO_SHARES) for hold in holds)
    )
    assert captured == [30, 30]
    assert calls.methods == [
        "CreateHolds",
        "CreateHold",
        "CreateHold",
        "SettleHolds",
        "SettleHold",
        "SettleHold",
    ]
    assert await balance(component, account_id) == (940, 0)
