"""The cloud server's parts: its database (subclouds, requests in flight, inference
logs), and clients of the account and network services."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import grpc
import structlog
from resultity.cloud.v1 import (
    inference_service_pb2,
    inference_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    subcloud_service_pb2,
    subcloud_service_pb2_grpc,
)

from core.channels import PLAINTEXT, Tls
from core.metrics import NO_METRICS, MetricsFactory
from core.namespace import DEFAULT_NAMESPACE, AmqpNames
from core.replica_channels import ReplicaChannels
from server.cloud.clients import GrpcAccountClient, GrpcNetworkClient
from server.cloud.inference import InferenceService
from server.cloud.inference_log_store import PostgresInferenceLogStore
from server.cloud.inference_logs import InferenceLogWriter, LogSweeper
from server.cloud.inflight import InFlightLeases
from server.cloud.inflight_store import PostgresInFlightStore
from server.cloud.job_servicer import JobServicer
from server.cloud.jobs import JobService
from server.cloud.metrics import CloudMetrics
from server.cloud.orphans import OrphanSweeper
from server.cloud.redis_rate_limits import FallbackCounters, RedisCounters
from server.cloud.servicer import InferenceServicer
from server.cloud.settings import (
    CacheSettings,
    InferenceLogSettings,
    InFlightSettings,
    RateLimitSettings,
)
from server.cloud.settler import Settler
from server.cloud.subcloud_service import SubcloudResolver, SubcloudService
from server.cloud.subcloud_servicer import SubcloudServicer
from server.cloud.subcloud_store import PostgresSubcloudStore
from server.common.database import apply_migrations, create_pool, load_migrations
from server.common.health import GrpcHealth, service_names
from server.common.settlement_amqp import AmqpSettlementQueue
from server.common.settlement_queue import InProcessSettlementQueue
from server.common.settlements import SettlementQueue
from server.common.shared_state import SharedState

MIGRATIONS = Path(__file__).parent / "migrations"
log = structlog.get_logger(__name__)

SERVICE_NAMES = service_names(inference_service_pb2, subcloud_service_pb2, job_service_pb2)
INFERENCE_SERVICE = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
# How often the inference service's health follows whether any model is servable.
READINESS_INTERVAL_S = 2.0
# How long shutdown waits for queued inference logs to be stored.
LOG_FLUSH_S = 5.0


class CloudComponent:
    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        *,
        account_target: str,
        network_target: str,
        service_token: str,
        rate_limits: RateLimitSettings | None = None,
        shared: SharedState | None = None,
        caches: CacheSettings | None = None,
        amqp_url: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        settlements: SettlementQueue | None = None,
        tls: Tls = PLAINTEXT,
        inflight: InFlightSettings | None = None,
        metrics: MetricsFactory = NO_METRICS,
        inference_logs: InferenceLogSettings | None = None,
    ) -> None:
        """``account_target`` and ``network_target``: each service's HOST:PORT, or its
        replicas' comma-separated. ``shared`` unset: rate limits and invalidations within
        this process.
        ``caches`` unset: read from the environment. Deferred settlements go to
        ``settlements`` (shared with an account component in this process, which
        applies them), else to RabbitMQ at ``amqp_url`` (the queue of ``namespace``),
        else to a queue of this process that applies them through the account API. ``inflight`` and
        ``inference_logs`` unset: read from the environment."""
        shared = shared or SharedState()
        ttl_s = (caches or CacheSettings()).cache_ttl_s
        self._pool = pool
        self._redis_counters = (
            None if shared.redis is None else RedisCounters(shared.redis, shared.names)
        )
        self._account_replicas = ReplicaChannels(account_target, tls)
        self._network_replicas = ReplicaChannels(network_target, tls)
        account = GrpcAccountClient(self._account_replicas, service_token)
        self._owns_queue = settlements is None
        # A queue only this process holds is applied from here, through the account API.
        self._consume_locally = settlements is None and not amqp_url
        if settlements is None:
            settlements = (
                AmqpSettlementQueue(amqp_url, AmqpNames(namespace))
                if amqp_url
                else InProcessSettlementQueue()
            )
        self._settlement_queue = settlements
        cloud_metrics = CloudMetrics(metrics)
        self.settler = Settler(account, settlements, metrics=cloud_metrics)
        store = PostgresSubcloudStore(pool)
        resolver = SubcloudResolver(store, ttl_s=ttl_s)
        network = self._network = GrpcNetworkClient(self._network_replicas, service_token)
        self._inflight_settings = inflight or InFlightSettings()
        inflight_store = PostgresInFlightStore(pool)
        self.inflight = InFlightLeases(inflight_store, lease_s=self._inflight_settings.lease_s)
        self.orphans = OrphanSweeper(
            inflight_store,
            network,
            self.settler,
            claim_s=self._inflight_settings.lease_s,
            running_grace_s=self._inflight_settings.running_grace_s,
        )
        self._log_settings = inference_logs or InferenceLogSettings()
        log_store = PostgresInferenceLogStore(pool)
        self.log_writer = InferenceLogWriter(
            log_store, capacity=self._log_settings.queue_capacity, metrics=cloud_metrics
        )
        self.log_sweeper = LogSweeper(log_store)
        self._background: list[asyncio.Task[None]] = []
        self.inference = InferenceService(
            account,
            network,
            auth_ttl_s=ttl_s,
            settlements=self.settler,
            inflight=self.inflight,
            rate_limits=rate_limits or RateLimitSettings(),
            subclouds=resolver,
            rate_limit_counters=(
                None if self._redis_counters is None else FallbackCounters(self._redis_counters)
            ),
            metrics=cloud_metrics,
            logs=self.log_writer,
        )
        shared.invalidations.subscribe(self.inference.authenticator)
        shared.invalidations.subscribe(resolver)
        self.subclouds = SubcloudService(
            store,
            account,
            self.inference.authenticator,
            self.inference.models,
            resolver,
            service_token=service_token,
            changes=shared.invalidations,
        )
        self.jobs = JobService(
            network, self.inference.authenticator, log_store, service_token=service_token
        )

    @classmethod
    async def start(
        cls,
        dsn: str,
        *,
        account_target: str,
        network_target: str,
        service_token: str,
        rate_limits: RateLimitSettings | None = None,
        pool_size: int = 5,
        shared: SharedState | None = None,
        amqp_url: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        settlements: SettlementQueue | None = None,
        tls: Tls = PLAINTEXT,
        inflight: InFlightSettings | None = None,
        metrics: MetricsFactory = NO_METRICS,
        inference_logs: InferenceLogSettings | None = None,
    ) -> CloudComponent:
        """Connects to the database and migrates it; ``rate_limits`` unset: read from the
        RESULTITY_RATE_LIMIT_* environment. ``shared``: what replicas share (the caller
        closes it)."""
        pool = await create_pool(dsn, max_size=pool_size)
        try:
            await apply_migrations(pool, load_migrations("cloud", MIGRATIONS))
        except BaseException:
            await pool.close()
            raise
        component = cls(
            pool,
            account_target=account_target,
            network_target=network_target,
            service_token=service_token,
            rate_limits=rate_limits,
            shared=shared,
            amqp_url=amqp_url,
            namespace=namespace,
            settlements=settlements,
            tls=tls,
            inflight=inflight,
            metrics=metrics,
            inference_logs=inference_logs,
        )
        if component._consume_locally:
            await component.settler.consume_queue()
        component._start_background()
        return component

    def _start_background(self) -> None:
        """Renews this replica's leases, settles the requests of dead replicas, writes
        inference logs and deletes expired ones."""
        self.log_writer.start()
        self._background = [
            asyncio.create_task(self.inflight.renew_forever(), name="inflight-leases"),
            asyncio.create_task(
                self.orphans.sweep_forever(self._inflight_settings.sweep_interval_s),
                name="orphan-sweeper",
            ),
            asyncio.create_task(
                self.log_sweeper.sweep_forever(self._log_settings.sweep_interval_s),
                name="inference-log-sweeper",
            ),
        ]

    def register(self, server: grpc.aio.Server) -> None:
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.inference), server
        )
        subcloud_service_pb2_grpc.add_SubcloudServiceServicer_to_server(
            SubcloudServicer(self.subclouds), server
        )
        job_service_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(self.jobs), server)

    async def follow_readiness(self, health: GrpcHealth) -> None:
        """Keeps the inference service's health SERVING only while some model has a
        ready node (what the gateway's /ready asks); runs until cancelled."""
        while True:
            try:
                servable = await self.inference.models.any_servable()
            except Exception:  # the network unreachable: nothing is servable
                log.warning("readiness check failed", exc_info=True)
                servable = False
            await health.set(INFERENCE_SERVICE, servable)
            await asyncio.sleep(READINESS_INTERVAL_S)

    async def close_job_streams(self) -> None:
        """Ends the job streams to the network (opened again if a job comes): a gRPC
        server stopping with a grace period waits for open streams, these included."""
        await self._network.close()

    async def stop(self) -> None:
        await self.inference.drain()
        await self.log_writer.close(LOG_FLUSH_S)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._redis_counters is not None:
            await self._redis_counters.close()
        await self.settler.close()
        if self._owns_queue:
            await self._settlement_queue.close()
        await self._account_replicas.close()
        await self._network.close()
        await self._network_replicas.close()
        await self._pool.close()
