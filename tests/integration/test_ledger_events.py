"""Ledger events over RabbitMQ: the outbox relay publishes to the topic exchange and
the earnings and usage projections consume their own durable queues."""

from __future__ import annotations

import asyncio
import uuid

from core.namespace import AmqpNames
from server.account.authz import Principal
from server.account.component import AccountComponent
from server.account.ledger import ContributionTotal, SettlementLine
from server.secrets import PlatformSecrets

ADMIN = Principal.service()


async def test_a_settlement_reaches_the_earnings_and_usage_projections_through_rabbitmq(
    database_url: str, amqp_url: str, amqp_names: AmqpNames
) -> None:
    component = await AccountComponent.start(
        database_url,
        PlatformSecrets.generate(),
        hold_sweep_interval_s=3600,
        amqp_url=amqp_url,
        namespace=amqp_names.namespace,
    )
    try:
        consumer = await component.service.create_account(ADMIN, "consumer")
        operator = await component.service.create_account(ADMIN, "operator")
        await component.billing.top_up(ADMIN, str(consumer.account_id), 10_000, uuid.uuid4().hex)
        hold = await component.billing.create_hold(
            ADMIN, str(consumer.account_id), 5_000, uuid.uuid4().hex, None
        )
        line = SettlementLine(operator.account_id, "node-1", "m", 100)
        await component.billing.settle_hold(ADMIN, str(hold.hold_id), 3_000, [line], 100)

        async with asyncio.timeout(30):
            while not (  # noqa: ASYNC110 - relay and consumer run in the background
                earnings := await component.earnings.operator_earnings(
                    ADMIN, str(operator.account_id), 0
                )
            ):
                await asyncio.sleep(0.05)
        assert earnings == [ContributionTotal(earnings[0].epoch, 1, 100, 2_400)]
        async with asyncio.timeout(30):
            while not (  # noqa: ASYNC110 - relay and consumer run in the background
                usage := (await component.usage.records(ADMIN, str(consumer.account_id), 0, ""))[0]
            ):
                await asyncio.sleep(0.05)
        [record] = usage
        assert (record.hold_id, record.held, record.charged, record.tokens) == (
            hold.hold_id,
            5_000,
            3_000,
            100,
        )
    finally:
        await component.stop()
