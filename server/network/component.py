"""The network server's parts, ready to be hosted on a gRPC server: the service,
its PostgreSQL state (migrations, stores) and the bus to the other replicas."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import asyncpg
import grpc
from resultity.agent.v1 import agent_service_pb2, agent_service_pb2_grpc
from resultity.network.v1 import (
    dispatch_service_pb2,
    dispatch_service_pb2_grpc,
    node_admin_service_pb2,
    node_admin_service_pb2_grpc,
    replica_service_pb2,
    replica_service_pb2_grpc,
)

from core import channels, tracing
from core.grpc_metrics import GrpcCalls
from core.inference import CatalogModel
from core.metrics import NO_METRICS, MetricsFactory
from core.namespace import RedisNames
from core.replica_channels import ReplicaChannels
from server.common.bus import Bus
from server.common.bus_memory import MemoryBus
from server.common.database import apply_migrations, create_pool, load_migrations
from server.common.health import service_names
from server.network.admin_servicer import NodeAdminServicer
from server.network.admission import AdmissionSettings, NodeAdmission
from server.network.callers import ServiceCallers
from server.network.catalog import DEFAULT_CATALOG, Catalog
from server.network.config_store import PostgresConfigStore
from server.network.fleet import ReplicaSettings
from server.network.job_store import PostgresJobRecordStore
from server.network.metrics import NetworkMetrics
from server.network.presence import Presence
from server.network.replica_client import GrpcForwarder
from server.network.replica_servicer import ReplicaServicer
from server.network.service import (
    FailoverSettings,
    LivenessSettings,
    NetworkService,
    ValidationSettings,
)
from server.network.servicer import AgentServicer, DispatchServicer
from server.network.standing_store import PostgresStandingStore
from server.network.state_ports import NetworkStores
from server.network.tokens import AccountApiKeys, AccountNodeTokens

SERVICE_NAMES = service_names(
    agent_service_pb2, dispatch_service_pb2, node_admin_service_pb2, replica_service_pb2
)
MIGRATIONS = Path(__file__).parent / "migrations"


class NetworkComponent:
    def __init__(
        self,
        *,
        catalog: tuple[CatalogModel, ...] = DEFAULT_CATALOG,
        liveness: LivenessSettings | None = None,
        failover: FailoverSettings | None = None,
        admission: AdmissionSettings | None = None,
        validation: ValidationSettings | None = None,
        account_target: str | None = None,
        service_token: str,
        database_url: str,
        bus: Bus | None = None,
        names: RedisNames | None = None,
        tls: channels.Tls = channels.PLAINTEXT,
        replica: ReplicaSettings | None = None,
        presence: Presence | None = None,
        metrics: MetricsFactory = NO_METRICS,
    ) -> None:
        """Callers of the dispatch, node admin and replica APIs must present
        ``service_token``. With ``account_target`` (HOST:PORT, or its replicas'
        comma-separated) node tokens, and the API keys the node admin API also takes,
        are resolved by the account service (with the same token); without, tokens
        are not checked and nodes earn nothing. The network's state lives in the
        PostgreSQL at ``database_url``; replicas of one network share it and a
        ``bus`` (default: this process alone), on channels named by ``names`` (default:
        the default namespace's). ``replica`` and a ``presence`` shared
        with the other replicas make this server one replica of a fleet (default:
        the only one)."""
        self._database_url = database_url
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        # A bus or presence given is the caller's to close.
        self._own_bus = bus is None
        self._bus = bus or MemoryBus()
        self._names = names or RedisNames()
        self._replica = replica
        self._presence = presence
        self._forwarder = GrpcForwarder(service_token, tls)
        self._account_replicas = (
            None if account_target is None else ReplicaChannels(account_target, tls)
        )
        tokens = (
            None
            if self._account_replicas is None
            else AccountNodeTokens(self._account_replicas, service_token)
        )
        self._callers = ServiceCallers(
            service_token,
            None
            if self._account_replicas is None
            else AccountApiKeys(self._account_replicas, service_token),
        )
        self._catalog = Catalog(catalog)
        self._liveness = liveness or LivenessSettings()
        self._failover = failover
        self._admission = NodeAdmission(admission or AdmissionSettings(), tokens)
        self._validation = validation
        self._metrics = NetworkMetrics(metrics)
        # The server's gRPC call metrics, where each job of a RunJobs stream counts.
        self._calls = GrpcCalls(metrics)
        self._stop_watching: Callable[[], None] | None = None
        self._service: NetworkService | None = None

    @property
    def service(self) -> NetworkService:
        if self._service is None:
            raise RuntimeError("the network component is not started")
        return self._service

    def register(self, server: grpc.aio.Server) -> None:
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(self.service), server
        )
        dispatch_service_pb2_grpc.add_DispatchServiceServicer_to_server(
            DispatchServicer(self.service, self._callers, self._calls), server
        )
        node_admin_service_pb2_grpc.add_NodeAdminServiceServicer_to_server(
            NodeAdminServicer(self.service, self._callers), server
        )
        replica_service_pb2_grpc.add_ReplicaServiceServicer_to_server(
            ReplicaServicer(self.service, self._callers), server
        )

    async def start(self) -> None:
        """Connects to PostgreSQL, migrates, and starts the service; call before
        ``register``."""
        pool = await create_pool(self._database_url)
        try:
            await apply_migrations(pool, load_migrations("network", MIGRATIONS))
            network_id = self._admission.settings.network_id
            self._service = NetworkService(
                self._catalog,
                self._liveness,
                self._failover,
                self._admission,
                self._validation,
                stores=NetworkStores(
                    PostgresStandingStore(pool, network_id),
                    PostgresConfigStore(pool, network_id),
                    PostgresJobRecordStore(pool, network_id),
                ),
                bus=self._bus,
                names=self._names,
                forwarder=self._forwarder,
                node_admin=self._forwarder,
                replica=self._replica,
                presence=self._presence,
                metrics=self._metrics,
                trace_context=tracing.trace_context(),
            )
            await self._service.start()
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        service = self._service
        self._stop_watching = self._metrics.watch_nodes(
            service.nodes, lambda: service.liveness.suspect_s
        )

    async def stop(self) -> None:
        """Tells connected agents to reconnect and writes what is pending; call before
        stopping the gRPC server (with a grace period) so that the message reaches them."""
        if self._stop_watching is not None:
            self._stop_watching()
        if self._service is not None:
            await self._service.stop()
        await self._forwarder.close()
        if self._own_bus:
            await self._bus.close()
        if self._pool is not None:
            await self._pool.close()
        if self._account_replicas is not None:
            await self._account_replicas.close()
