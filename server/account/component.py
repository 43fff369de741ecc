"""The account server as a component: pool, migrations, servicers, hold sweeper,
settlement queue consumer, ledger outbox relay and the earnings and usage projections."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import asyncpg
import grpc
import structlog
from resultity.account.v1 import (
    account_service_pb2,
    account_service_pb2_grpc,
    api_key_service_pb2,
    api_key_service_pb2_grpc,
    contribution_service_pb2,
    contribution_service_pb2_grpc,
    ledger_service_pb2,
    ledger_service_pb2_grpc,
    node_token_service_pb2,
    node_token_service_pb2_grpc,
    referral_service_pb2,
    referral_service_pb2_grpc,
    subscription_service_pb2,
    subscription_service_pb2_grpc,
    usage_service_pb2,
    usage_service_pb2_grpc,
)

from core.metrics import NO_METRICS, MetricsFactory
from core.namespace import DEFAULT_NAMESPACE, AmqpNames
from server.account.api_keys import KeyHasher
from server.account.billing import BillingService
from server.account.contribution_servicer import ContributionServicer
from server.account.contribution_store import PostgresContributionStore
from server.account.contributions import ContributionService
from server.account.earnings import CONSUMER as EARNINGS_CONSUMER
from server.account.earnings import OperatorEarnings
from server.account.earnings_store import PostgresEarningsStore
from server.account.hold_store import PostgresHoldStore
from server.account.ledger_events import (
    CONTRIBUTION_RECORDED,
    USAGE_SETTLED,
    InProcessLedgerEvents,
    LedgerEventBus,
)
from server.account.ledger_events_amqp import AmqpLedgerEvents
from server.account.ledger_servicer import LedgerServicer
from server.account.ledger_store import PostgresLedgerStore
from server.account.metrics import LedgerMetrics
from server.account.outbox_relay import OutboxRelay
from server.account.outbox_store import PostgresOutboxStore
from server.account.payout_store import PostgresPayoutStore
from server.account.payouts import PayoutService
from server.account.service import AccountService
from server.account.servicer import (
    AccountServicer,
    ApiKeyServicer,
    NodeTokenServicer,
    ReferralServicer,
)
from server.account.settlement_inbox import SettlementInbox
from server.account.store import PostgresAccountStore
from server.account.subscription_servicer import SubscriptionServicer
from server.account.subscription_store import PostgresSubscriptionStore
from server.account.subscriptions import SubscriptionService
from server.account.usage import CONSUMER as USAGE_CONSUMER
from server.account.usage import ConsumerUsage
from server.account.usage_servicer import UsageServicer
from server.account.usage_store import PostgresUsageStore
from server.common.database import apply_migrations, create_pool, load_migrations
from server.common.health import service_names
from server.common.invalidation import Announcer
from server.common.settlement_amqp import AmqpSettlementQueue
from server.common.settlements import QueueUnavailable, SettlementQueue
from server.secrets import PlatformSecrets

log = structlog.get_logger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


SERVICE_NAMES = service_names(
    account_service_pb2,
    api_key_service_pb2,
    contribution_service_pb2,
    ledger_service_pb2,
    node_token_service_pb2,
    referral_service_pb2,
    subscription_service_pb2,
    usage_service_pb2,
)


class AccountComponent:
    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        service: AccountService,
        billing: BillingService,
        contributions: ContributionService,
        payouts: PayoutService,
        subscriptions: SubscriptionService,
        earnings: OperatorEarnings,
        usage: ConsumerUsage,
        events: LedgerEventBus,
        settlements: SettlementQueue | None = None,
    ) -> None:
        self._pool = pool
        self.service = service
        self.billing = billing
        self.contributions = contributions
        self.payouts = payouts
        self.subscriptions = subscriptions
        self.earnings = earnings
        self.usage = usage
        self._events = events
        self._sweeper: asyncio.Task[None] | None = None
        self._relay: asyncio.Task[None] | None = None
        # Settlements cloud could not deliver directly: applied from here, and holds
        # are not released while some wait (their expiry may have passed meanwhile).
        self._settlements = settlements

    @classmethod
    async def start(
        cls,
        dsn: str,
        secrets: PlatformSecrets,
        *,
        hold_sweep_interval_s: float = 30.0,
        pool_size: int = 10,
        changes: Announcer | None = None,
        amqp_url: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        settlements: SettlementQueue | None = None,
        metrics: MetricsFactory = NO_METRICS,
    ) -> AccountComponent:
        """Connects, migrates, and starts releasing expired holds in the background.

        ``changes``: where revoked keys and changed accounts are announced to cloud.
        Consumes the settlement queue: ``settlements`` (which it then owns), else the
        RabbitMQ one at ``amqp_url``, else none (cloud then keeps its own). On RabbitMQ,
        its queues and exchanges are those of ``namespace`` (core/namespace.py).
        """
        names = AmqpNames(namespace)
        pool = await create_pool(dsn, max_size=pool_size)
        try:
            await apply_migrations(pool, load_migrations("account", MIGRATIONS))
        except BaseException:
            await pool.close()
            raise
        service = AccountService(
            PostgresAccountStore(pool),
            KeyHasher(secrets.key_hash_secret),
            secrets.service_token,
            changes=changes,
        )
        ledger = PostgresLedgerStore(pool)
        component = cls(
            pool,
            service,
            BillingService(ledger, PostgresHoldStore(pool), metrics=LedgerMetrics(metrics)),
            ContributionService(PostgresContributionStore(pool)),
            PayoutService(PostgresPayoutStore(pool)),
            SubscriptionService(PostgresSubscriptionStore(pool)),
            OperatorEarnings(PostgresEarningsStore(pool)),
            ConsumerUsage(PostgresUsageStore(pool)),
            AmqpLedgerEvents(amqp_url, names) if amqp_url else InProcessLedgerEvents(),
            settlements or (AmqpSettlementQueue(amqp_url, names) if amqp_url else None),
        )
        await component._events.subscribe(
            CONTRIBUTION_RECORDED, EARNINGS_CONSUMER, component.earnings.project
        )
        await component._events.subscribe(USAGE_SETTLED, USAGE_CONSUMER, component.usage.project)
        component._relay = asyncio.create_task(
            OutboxRelay(PostgresOutboxStore(pool), component._events).run(),
            name="ledger-outbox-relay",
        )
        if component._settlements is not None:
            await component._settlements.consume(SettlementInbox(component.billing).apply)
        component._sweeper = asyncio.create_task(
            component._sweep(hold_sweep_interval_s), name="account-hold-sweeper"
        )
        log.info("account component started")
        return component

    def register(self, server: grpc.aio.Server) -> None:
        args = (self.service, self.billing)
        account_service_pb2_grpc.add_AccountServiceServicer_to_server(
            AccountServicer(*args), server
        )
        api_key_service_pb2_grpc.add_ApiKeyServiceServicer_to_server(ApiKeyServicer(*args), server)
        ledger_service_pb2_grpc.add_LedgerServiceServicer_to_server(
            LedgerServicer(*args, self.payouts), server
        )
        node_token_service_pb2_grpc.add_NodeTokenServiceServicer_to_server(
            NodeTokenServicer(*args), server
        )
        contribution_service_pb2_grpc.add_ContributionServiceServicer_to_server(
            ContributionServicer(self.service, self.contributions, self.earnings), server
        )
        referral_service_pb2_grpc.add_ReferralServiceServicer_to_server(
            ReferralServicer(*args), server
        )
        subscription_service_pb2_grpc.add_SubscriptionServiceServicer_to_server(
            SubscriptionServicer(self.service, self.subscriptions), server
        )
        usage_service_pb2_grpc.add_UsageServiceServicer_to_server(
            UsageServicer(self.service, self.usage), server
        )

    async def stop(self) -> None:
        for task in (self._sweeper, self._relay):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._sweeper = self._relay = None
        await self._events.close()
        if self._settlements is not None:
            await self._settlements.close()
        await self._pool.close()
        log.info("account component stopped")

    async def _sweep(self, interval_s: float) -> None:
        # The first sweep waits one interval: a cloud process that kept settlements
        # while this server was down retries more often than that, so those holds are
        # settled before their expiry can release them.
        while True:
            await asyncio.sleep(interval_s)
            try:
                if await self._settlements_waiting():
                    continue
                await self.billing.release_expired_holds()
            except Exception:
                # A failed sweep (database restarting, ...) is retried next round.
                log.exception("releasing expired holds failed")

    async def _settlements_waiting(self) -> bool:
        """Whether queued settlements wait (or the queue cannot tell): expired holds
        stay until they are applied."""
        if self._settlements is None:
            return False
        try:
            waiting = await self._settlements.pending()
        except QueueUnavailable as error:
            log.warning("settlement queue unreachable; expired holds kept", error=str(error))
            return True
        if waiting:
            log.info("expired holds kept until queued settlements are applied", waiting=waiting)
        return waiting > 0
