"""Settlements that cannot reach the account server are applied exactly once when
it is back: through the in-process queue, or from memory when the queue is down too."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest

from core import channels
from core.namespace import AmqpNames
from core.replica_channels import ReplicaChannels
from server.account.authz import Principal
from server.account.component import AccountComponent
from server.account.settlement_inbox import SettlementInbox
from server.cloud.clients import GrpcAccountClient
from server.cloud.settler import Settler
from server.common.settlement_amqp import AmqpSettlementQueue
from server.common.settlement_queue import InProcessSettlementQueue
from server.common.settlements import OperatorLine, OperatorShares, Settlement
from server.secrets import PlatformSecrets

ADMIN = Principal.service()
SECRETS = PlatformSecrets.generate()
# Nothing listens on port 1: a RabbitMQ that is down.
BROKER_DOWN = "amqp://guest:guest@127.0.0.1:1/"


@dataclass
class AccountServer:
    """The account component behind a gRPC server that can go away and come back
    on the same port."""

    component: AccountComponent
    port: int
    server: grpc.aio.Server | None = None

    async def start(self) -> None:
        # Without SO_REUSEPORT: a stopped server's socket must not share the port.
        server = grpc.aio.server(options=[*channels.server_options(), ("grpc.so_reuseport", 0)])
        self.component.register(server)
        assert server.add_insecure_port(f"127.0.0.1:{self.port}") == self.port
        await server.start()
        self.server = server

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop(None)
        self.server = None


@pytest.fixture(scope="module")
async def account(postgres_dsn: str) -> AsyncIterator[AccountServer]:
    component = await AccountComponent.start(postgres_dsn, SECRETS, hold_sweep_interval_s=3600)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = AccountServer(component, port)
    await server.start()
    yield server
    if server.server is not None:
        await server.stop()
    await component.stop()


@pytest.fixture(scope="module")
async def db(postgres_dsn: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(postgres_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def client(account: AccountServer) -> AsyncIterator[GrpcAccountClient]:
    replicas = ReplicaChannels(f"127.0.0.1:{account.port}")
    yield GrpcAccountClient(replicas, SECRETS.service_token)
    await replicas.close()


async def _request(component: AccountComponent) -> tuple[str, str, Settlement]:
    """A consumer with 10,000 micro-credits and a hold of 5,000 on them, an operator,
    and the settlement capturing 3,000 of which the operator's nodes did all the work."""
    consumer = await component.service.create_account(ADMIN, "consumer")
    operator = await component.service.create_account(ADMIN, "operator")
    consumer_id, operator_id = str(consumer.account_id), str(operator.account_id)
    await component.billing.top_up(ADMIN, consumer_id, 10_000, uuid.uuid4().hex)
    hold = await component.billing.create_hold(ADMIN, consumer_id, 5_000, uuid.uuid4().hex, None)
    shares = OperatorShares((OperatorLine(operator_id, "node-1", "m", 100),), 100)
    return consumer_id, operator_id, Settlement(str(hold.hold_id), 3_000, shares)


async def _assert_settled_once(
    component: AccountComponent, db: Any, consumer: str, operator: str, hold_id: str
) -> None:
    balance = await component.billing.get_balance(ADMIN, consumer)
    assert (balance.available, balance.held) == (7_000, 0)
    earned = await component.billing.get_balance(ADMIN, operator)
    assert earned.earned == 2_400  # 80% of 3,000
    hold = await db.fetchrow(
        "SELECT status, captured FROM transfers WHERE id = $1", uuid.UUID(hold_id)
    )
    assert (hold["status"], hold["captured"]) == ("settled", 3_000)
    captures = await db.fetchval(
        "SELECT count(*) FROM transfers WHERE pending_id = $1 AND kind = 'capture'",
        uuid.UUID(hold_id),
    )
    assert captures == 2  # platform and operator, once
    contributions = await db.fetchval(
        "SELECT count(*) FROM contributions WHERE hold_id = $1", uuid.UUID(hold_id)
    )
    assert contributions == 1


async def _until(condition: Callable[[], Any], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110 - polls the ledger
            await asyncio.sleep(0.05)


async def test_account_down_at_settlement_is_settled_once_when_back(
    account: AccountServer, client: GrpcAccountClient, db: Any
) -> None:
    consumer, operator, settlement = await _request(account.component)
    queue = InProcessSettlementQueue(first_retry_s=0.05, max_retry_s=0.2)
    settler = Settler(client, queue)
    await settler.consume_queue()
    await account.stop()
    try:
        # The caller is told what will be charged; nothing is charged yet.
        assert await settler.settle(settlement) == 3_000
        assert await queue.pending() == 1
        balance = await account.component.billing.get_balance(ADMIN, consumer)
        assert (balance.available, balance.held) == (5_000, 5_000)
    finally:
        await account.start()

    async def applied() -> bool:
        return await queue.pending() == 0

    await _until(applied)
    await _assert_settled_once(account.component, db, consumer, operator, settlement.hold_id)
    await settler.close()
    await queue.close()


async def test_a_redelivered_settlement_charges_nobody_twice(
    account: AccountServer, client: GrpcAccountClient, db: Any
) -> None:
    consumer, operator, settlement = await _request(account.component)
    inbox = SettlementInbox(account.component.billing)
    await inbox.apply(settlement)
    await inbox.apply(settlement)  # the broker delivered it again
    assert await client.settle_hold(settlement.hold_id, 3_000, settlement.shares) == 3_000
    await _assert_settled_once(account.component, db, consumer, operator, settlement.hold_id)


async def test_account_and_broker_down_settlements_wait_in_memory(
    account: AccountServer, client: GrpcAccountClient, db: Any
) -> None:
    consumer, operator, settlement = await _request(account.component)
    queue = AmqpSettlementQueue(BROKER_DOWN, AmqpNames())
    settler = Settler(client, queue, first_retry_s=0.05, max_retry_s=0.2)
    await account.stop()
    try:
        assert await settler.settle(settlement) == 3_000
        assert settler.backlog() == 1
        await asyncio.sleep(0.3)  # retried meanwhile; neither answers
        assert settler.backlog() == 1
    finally:
        await account.start()

    async def flushed() -> bool:
        return settler.backlog() == 0

    await _until(flushed)
    await _assert_settled_once(account.component, db, consumer, operator, settlement.hold_id)
    await settler.close()
    await queue.close()


async def test_expired_holds_are_kept_while_the_settlement_queue_cannot_tell(
    postgres_dsn: str, db: Any
) -> None:
    component = await AccountComponent.start(
        postgres_dsn, SECRETS, hold_sweep_interval_s=0.05, amqp_url=BROKER_DOWN
    )
    try:
        consumer = await component.service.create_account(ADMIN, "consumer")
        await component.billing.top_up(ADMIN, str(consumer.account_id), 100, uuid.uuid4().hex)
        hold = await db.fetchrow(
            """UPDATE transfers SET expires_at = now() - interval '1 second'
               WHERE id = $1 RETURNING status""",
            (
                await component.billing.create_hold(
                    ADMIN, str(consumer.account_id), 100, uuid.uuid4().hex, None
                )
            ).hold_id,
        )
        assert hold["status"] == "pending"
        await asyncio.sleep(0.5)  # several sweeps
        status = await db.fetchval(
            "SELECT status FROM transfers WHERE kind = 'hold' AND debit_account_id = "
            "(SELECT id FROM ledger_accounts WHERE owner_id = $1 AND kind = 'consumer')",
            consumer.account_id,
        )
        assert status == "pending"
    finally:
        await component.stop()
