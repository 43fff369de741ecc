"""gRPC channels and servers of every service and the agent: keepalive, TLS, and the
credential metadata every call carries.

Keepalive settings are set on both sides together: clients ping idle
connections so half-open ones are noticed, and servers accept those pings.

Load sharing: a channel spreads its calls over every address its target
resolves to (round_robin), such as a Kubernetes headless Service's pods, and
servers tell connections past an age to go, so that long-lived clients resolve
again and find pods that came since (see MAX_CONNECTION_AGE_MS).

TLS (`Tls`): a process given a certificate and key serves TLS on its gRPC
listener and presents that certificate to peers that ask for a client
certificate; a server given a client CA requires one (mutual TLS). Outgoing
channels use TLS when asked to, verifying the peer with the system's CAs or a
pinned CA file. Without any of it everything is plaintext, which is only fit
for loopback (`make run`).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from core import tracing

KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
# round_robin reconnects an address whose connection went at once and, while it
# cannot, fails calls fast (they do not wait for ready) until the next try after
# a backoff. gRPC's default backoff grows to 120 s, so a channel whose server was
# down a while kept failing long after the server came back; capped, an existing
# channel reaches a restarted server within about a second.
RECONNECT_BACKOFF_INITIAL_MS = 100
RECONNECT_BACKOFF_MAX_MS = 1_000
# A connection older than this is told to go (GOAWAY): its client resolves its
# target again and opens new calls on a new connection, to any pod since added.
MAX_CONNECTION_AGE_MS = 300_000
# Calls open on a connection told to go run on to their end, however long: an
# agent's session, cloud's RunJobs stream to the network (cutting it fails every
# job on it) and streamed completions would otherwise lose work once the grace
# ran out. Only new calls move, which is all that re-resolving needs; the
# agent-facing listener shares the network's port, so it is not set apart. gRPC
# reads INT_MAX as no limit.
MAX_CONNECTION_AGE_GRACE_MS = 2**31 - 1

LOAD_BALANCING = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

# Target schemes that name their addresses (gRPC's naming): a list of IP literals,
# or one socket.
_ADDRESS_LISTS = ("ipv4:", "ipv6:")
_SOCKETS = ("unix:", "unix-abstract:", "vsock:")


def addresses(target: str) -> int | None:
    """How many addresses a channel's ``target`` names (round_robin spreads its calls
    over them): its IP literals, or its one socket; None for a DNS name, whose
    addresses only its resolution knows (a headless Service's pods, which change)."""
    if target.startswith(_ADDRESS_LISTS):
        return len(target.split(","))
    if target.startswith(_SOCKETS):
        return 1
    host_port = target.removeprefix("dns:")
    if host_port.startswith("//"):  # dns://[authority]/host:port
        host_port = host_port[2:].partition("/")[2]
    if host_port.startswith("["):  # [ipv6]:port
        host = host_port[1:].partition("]")[0]
    else:
        host = host_port.rpartition(":")[0] if host_port.count(":") == 1 else host_port
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return 1


CLIENT_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.service_config", LOAD_BALANCING),
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
]


def server_options(max_connection_age_ms: int = MAX_CONNECTION_AGE_MS) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # Must not exceed the clients' ping interval, or the server closes them.
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_connection_age_ms", max_connection_age_ms),
        ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
    ]


@dataclass(frozen=True, slots=True)
class Tls:
    """One process's TLS material (PEM files). The default is plaintext."""

    # This process's certificate chain and key: served by its listener, and
    # presented by its channels to servers that require client certificates.
    cert: Path | None = None
    key: Path | None = None
    # Outgoing channels use TLS; they verify servers with `ca` if given, else
    # with the system's CAs.
    connect: bool = False
    ca: Path | None = None
    # The listener requires client certificates signed by this CA (mutual TLS).
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a TLS certificate needs its key, and a key its certificate")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("requiring client certificates needs a server certificate")

    @property
    def serves(self) -> bool:
        return self.cert is not None

    def _identity(self) -> tuple[bytes, bytes] | None:
        if self.cert is None or self.key is None:
            return None
        return self.key.read_bytes(), self.cert.read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        identity = self._identity()
        if identity is None:
            raise ValueError("serving TLS needs a certificate and its key")
        client_ca = None if self.client_ca is None else self.client_ca.read_bytes()
        return grpc.ssl_server_credentials(
            [identity], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        key, cert = self._identity() or (None, None)
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca is None else self.ca.read_bytes(),
            private_key=key,
            certificate_chain=cert,
        )


PLAINTEXT = Tls()


def insecure_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        target, options=CLIENT_OPTIONS, interceptors=tracing.client_interceptors() or None
    )


def channel(target: str, tls: Tls = PLAINTEXT) -> grpc.aio.Channel:
    """A channel to ``target``: TLS if ``tls.connect``, else plaintext. Traced calls
    (core/tracing.py) send their trace context along."""
    if not tls.connect:
        return insecure_channel(target)
    return grpc.aio.secure_channel(
        target,
        tls.channel_credentials(),
        options=CLIENT_OPTIONS,
        interceptors=tracing.client_interceptors() or None,
    )


def server(
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
    *,
    max_connection_age_ms: int = MAX_CONNECTION_AGE_MS,
) -> grpc.aio.Server:
    """A server with ``interceptors`` (metrics), after those of tracing when it is on."""
    chain = [*tracing.server_interceptors(), *interceptors]
    return grpc.aio.server(
        options=server_options(max_connection_age_ms), interceptors=chain or None
    )


def listen(grpc_server: grpc.aio.Server, address: str, tls: Tls = PLAINTEXT) -> int:
    """Adds a listener on ``address`` (TLS if ``tls`` has a certificate); the port bound."""
    if tls.serves:
        return grpc_server.add_secure_port(address, tls.server_credentials())
    return grpc_server.add_insecure_port(address)
