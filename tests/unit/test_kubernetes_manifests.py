"""deploy/kubernetes/ is valid Kubernetes (kubernetes-validate, strict), and what it
runs matches this code: every container's arguments parse as a `resultity`
command, probes hit the health endpoints, Services select a Deployment's pods
on a port they expose, and the services calling each other find every pod."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.cli import _parser

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"


def _resources() -> list[dict[str, Any]]:
    resources = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return resources


RESOURCES = _resources()
DEPLOYMENTS = [r for r in RESOURCES if r["kind"] == "Deployment"]
SERVICES = [r for r in RESOURCES if r["kind"] == "Service"]


def _name(resource: dict[str, Any]) -> str:
    return f"{resource['kind']}/{resource['metadata']['name']}"


@pytest.mark.parametrize("resource", RESOURCES, ids=_name)
def test_every_resource_is_valid_kubernetes(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_every_service_runs_replicated() -> None:
    names = {d["metadata"]["name"] for d in DEPLOYMENTS}
    assert names == {f"resultity-{s}" for s in ("network", "account", "cloud", "gateway")}
    assert all(d["spec"]["replicas"] >= 2 for d in DEPLOYMENTS)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=_name)
def test_containers_run_a_resultity_command_probed_on_its_health(
    deployment: dict[str, Any],
) -> None:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = _parser().parse_args(container["args"])
    assert args.command == container["name"]
    port = container["ports"][0]["containerPort"]
    if args.command == "gateway":
        assert args.port == port
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    else:
        assert args.listen.endswith(f":{port}")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port
        sources = {next(iter(source.values()))["name"] for source in container["envFrom"]}
        assert sources == {"resultity-config", "resultity-secrets"}


@pytest.mark.parametrize("service", SERVICES, ids=_name)
def test_services_select_pods_on_a_port_they_expose(service: dict[str, Any]) -> None:
    selector = service["spec"]["selector"]
    (target,) = [
        d
        for d in DEPLOYMENTS
        if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    (container,) = target["spec"]["template"]["spec"]["containers"]
    exposed = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= exposed


def test_services_reach_each_other_by_their_service_names() -> None:
    addresses = {f"{s['metadata']['name']}:{s['spec']['ports'][0]['port']}" for s in SERVICES}
    for deployment in DEPLOYMENTS:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        args = _parser().parse_args(container["args"])
        for peer in ("account", "network", "cloud"):
            target = getattr(args, peer, None)
            if isinstance(target, str) and args.command != peer:
                assert target in addresses, (deployment["metadata"]["name"], target)


def test_the_services_called_inside_are_headless_and_the_outside_ones_not() -> None:
    """A headless Service's name resolves to every ready pod, over which a client's
    channel spreads its calls (core/channels.py); a ClusterIP's gives it one. The
    gateway's HTTP and the agents' Service take connections from outside."""
    headless = {s["metadata"]["name"] for s in SERVICES if s["spec"].get("clusterIP") == "None"}
    assert headless == {f"resultity-{s}" for s in ("account", "cloud", "network")}
    others = {s["metadata"]["name"] for s in SERVICES} - headless
    assert others == {"resultity-gateway", "resultity-network-agents"}
