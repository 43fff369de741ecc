"""Typed settings, read from RESULTITY_* environment variables; CLI flags override."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import InvalidArgument
from core.namespace import DEFAULT_NAMESPACE, validate_namespace


class PlatformSettings(BaseSettings):
    """Settings of `resultity up`, the all-in-one control plane."""

    model_config = SettingsConfigDict(env_prefix="RESULTITY_")

    data_dir: Path = Path(".resultity")
    # Unset: an embedded PostgreSQL runs in <data_dir>/postgres.
    database_url: str | None = None
    # Unset: rate limits and cache invalidations stay in this process; set (several
    # platforms sharing one database), they are shared through this Redis.
    redis_url: str | None = None
    # RabbitMQ (RESULTITY_AMQP_URL) for settlements and ledger events; unset: queues
    # in this process.
    amqp_url: str | None = None
    # Names every Redis key and channel and RabbitMQ exchange and queue of this
    # deployment (core/namespace.py): deployments sharing a Redis or a broker each
    # need their own.
    namespace: str = DEFAULT_NAMESPACE
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Loopback by default: agents on other machines need 0.0.0.0.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 30.0
    # Rate limits for every key where no RESULTITY_RATE_LIMIT_* variable sets one
    # (server/cloud/settings.py, LOCAL_RATE_LIMITS); false: only what variables set.
    default_rate_limits: bool = True
    # Credits granted to the demo account on first start (micro-credits).
    demo_credits: int = 100_000_000
    log_level: str = "info"
    # JSON log lines (RESULTITY_LOG_JSON), the local agent's too.
    log_json: bool = False
    # Unset: generated into <data_dir>/key-hash-secret and <data_dir>/service-token.
    key_hash_secret: SecretStr | None = None
    service_token: SecretStr | None = None
    # Start one local agent serving the bundled model.
    local_agent: bool = True
    # Generations the local agent runs at once (RESULTITY_LOCAL_AGENT_SLOTS, or
    # `resultity up --agent-slots N`), batched on one copy of the model. 4: a
    # local deployment's concurrent users do not queue behind each other, and
    # the slots share one model and at most 4 contexts' cache cells.
    local_agent_slots: int = Field(default=4, ge=1)
    # llama.cpp threads of the local agent; unset: every core. The control plane
    # needs little CPU of its own because the agent batches tokens.
    local_agent_threads: int | None = None
    # Region the local agent declares (e.g. "eu-west"); unset: undeclared.
    local_agent_region: str | None = None
    # Port the local agent serves its Prometheus metrics on (loopback); unset: none.
    local_agent_metrics_port: int | None = None
    # TLS on the gRPC listener (PEM files); unset: plaintext, fit for loopback only.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Require client certificates signed by this CA on the gRPC listener.
    tls_client_ca: Path | None = None

    @field_validator("namespace")
    @classmethod
    def _valid_namespace(cls, value: str) -> str:
        try:
            return validate_namespace(value)
        except InvalidArgument as error:
            raise ValueError(error.message) from None
