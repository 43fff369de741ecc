"""The Envoy edge config, validated statically (Envoy itself does not run here).

The rendered template must parse into Envoy's own v3 API types (xds-protos),
strictly: unknown fields or misspelt enum values fail. Every service the
gRPC-JSON transcoder names must exist in the descriptor set `make generate`
writes, and every service with HTTP annotations must be transcoded.
"""

from __future__ import annotations

from pathlib import Path
from string import Template
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2

# Imported for their descriptors: json_format resolves typed_config by type URL.
from envoy.extensions.filters.http.grpc_json_transcoder.v3 import transcoder_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, json_format

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "gateway" / "envoy" / "envoy.yaml.tmpl"
DESCRIPTOR_SET = ROOT / "generated" / "resultity.binpb"
DOMAIN = "example.org"
VALUES = {
    "DOMAIN": DOMAIN,
    "TLS_CERT": "/etc/envoy/tls.crt",
    "TLS_KEY": "/etc/envoy/tls.key",
    "DESCRIPTOR_SET": "/etc/envoy/resultity.binpb",
    "GATEWAY_HOST": "gateway",
    "GATEWAY_PORT": "8080",
    "CLOUD_HOST": "cloud",
    "CLOUD_PORT": "50051",
    "NETWORK_HOST": "network",
    "NETWORK_PORT": "50052",
    "ACCOUNT_HOST": "account",
    "ACCOUNT_PORT": "50053",
}


@pytest.fixture(scope="module")
def bootstrap() -> bootstrap_pb2.Bootstrap:
    rendered = Template(TEMPLATE.read_text()).substitute(VALUES)
    config: dict[str, Any] = yaml.safe_load(rendered)
    return json_format.ParseDict(config, bootstrap_pb2.Bootstrap())


def _managers(bootstrap: bootstrap_pb2.Bootstrap) -> list[hcm_pb2.HttpConnectionManager]:
    managers = []
    for listener in bootstrap.static_resources.listeners:
        for chain in listener.filter_chains:
            for network_filter in chain.filters:
                manager = hcm_pb2.HttpConnectionManager()
                assert network_filter.typed_config.Unpack(manager)
                managers.append(manager)
    return managers


def _transcoder(http_filter: hcm_pb2.HttpFilter) -> transcoder_pb2.GrpcJsonTranscoder | None:
    transcoder = transcoder_pb2.GrpcJsonTranscoder()
    if not http_filter.typed_config.Is(transcoder.DESCRIPTOR):
        return None
    assert http_filter.typed_config.Unpack(transcoder)
    return transcoder


def _transcoders(bootstrap: bootstrap_pb2.Bootstrap) -> list[transcoder_pb2.GrpcJsonTranscoder]:
    return [
        transcoder
        for manager in _managers(bootstrap)
        for http_filter in manager.http_filters
        if (transcoder := _transcoder(http_filter)) is not None
    ]


def _descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    files = descriptor_pb2.FileDescriptorSet()
    files.ParseFromString(DESCRIPTOR_SET.read_bytes())
    return files


def _services(files: descriptor_pb2.FileDescriptorSet) -> dict[str, bool]:
    """Every service in the set, and whether any of its methods has an HTTP rule."""
    services = {}
    for file in files.file:
        for service in file.service:
            annotated = any(
                method.options.HasExtension(annotations_pb2.http) for method in service.method
            )
            services[f"{file.package}.{service.name}"] = annotated
    return services


def test_every_listener_terminates_tls(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    listeners = bootstrap.static_resources.listeners
    assert listeners
    for listener in listeners:
        for chain in listener.filter_chains:
            context = tls_pb2.DownstreamTlsContext()
            assert chain.transport_socket.typed_config.Unpack(context)
            [certificate] = context.common_tls_context.tls_certificates
            assert certificate.certificate_chain.filename == VALUES["TLS_CERT"]
            assert "h2" in context.common_tls_context.alpn_protocols


def test_reserved_hosts_reach_their_services(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    clusters_by_domain = {}
    for manager in _managers(bootstrap):
        for host in manager.route_config.virtual_hosts:
            for domain in host.domains:
                clusters_by_domain[domain] = {route.route.cluster for route in host.routes}
    assert clusters_by_domain[f"cloud.{DOMAIN}"] == {"cloud"}
    assert clusters_by_domain[f"network.{DOMAIN}"] == {"network"}
    assert clusters_by_domain[f"account.{DOMAIN}"] == {"account"}
    assert clusters_by_domain[f"api.{DOMAIN}"] == {"gateway"}
    assert clusters_by_domain[DOMAIN] == {"gateway"}
    defined = {cluster.name for cluster in bootstrap.static_resources.clusters}
    assert defined == {"gateway", "cloud", "network", "account"}


def test_streaming_routes_have_no_overall_timeout(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    for manager in _managers(bootstrap):
        # Envoy's 15 s default would cut long SSE and gRPC streams.
        assert manager.HasField("request_timeout")
        assert manager.request_timeout.ToSeconds() == 0
        for host in manager.route_config.virtual_hosts:
            for route in host.routes:
                if route.match.path == "/openapi.json":
                    continue
                assert route.route.HasField("timeout"), (host.name, route.match)
                assert route.route.timeout.ToSeconds() == 0
                assert route.route.idle_timeout.ToSeconds() > 0


def test_transcoded_services_exist_in_the_descriptor_set(
    bootstrap: bootstrap_pb2.Bootstrap,
) -> None:
    services = _services(_descriptor_set())
    transcoders = _transcoders(bootstrap)
    exposed = [name for transcoder in transcoders for name in transcoder.services]

    for transcoder in transcoders:
        assert transcoder.proto_descriptor == VALUES["DESCRIPTOR_SET"]
    assert set(exposed) <= set(services)
    # Every service with REST annotations is exposed, once, and only those.
    assert len(exposed) == len(set(exposed))
    assert set(exposed) == {name for name, annotated in services.items() if annotated}


def test_each_transcoder_serves_its_own_layers_host(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    """REST for resultity.<layer>.v1 services is only on <layer>.<domain>, routed to it."""
    for manager in _managers(bootstrap):
        layers = {
            name.split(".")[1]
            for http_filter in manager.http_filters
            if (transcoder := _transcoder(http_filter)) is not None
            for name in transcoder.services
        }
        if not layers:
            continue
        [layer] = layers
        [host] = manager.route_config.virtual_hosts
        assert host.domains[0] == f"{layer}.{DOMAIN}"
        assert {route.route.cluster for route in host.routes} == {layer}


def test_descriptor_set_holds_every_proto_file() -> None:
    names = {file.name for file in _descriptor_set().file}
    expected = {str(path.relative_to(ROOT / "proto")) for path in (ROOT / "proto").rglob("*.proto")}
    assert expected <= names
    assert "google/api/http.proto" in names  # imports included, as the transcoder needs
