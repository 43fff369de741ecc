"""Where a running `resultity up` answers, kept in its data dir for the operator CLIs.

`up` writes <data dir>/addresses.json once its servers listen (and removes it when
it stops): the gRPC address its own commands reach (the plaintext loopback
listener when the public one is TLS), the HTTP API, and where the local agent's
metrics are served. `resultity account|nodes|subclouds|jobs --data-dir DIR` take
their target from it unless one is given on the command line.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

ADDRESSES_FILE = "addresses.json"
# Where the CLIs look when no platform wrote its addresses.
DEFAULT_GRPC_TARGET = "127.0.0.1:50051"


@dataclass(frozen=True, slots=True)
class PlatformAddresses:
    # HOST:PORT of the gRPC services, reachable from this machine without TLS.
    grpc: str
    # Base URL of the OpenAI-compatible API; its /metrics has the platform's metrics.
    http: str
    # URL of the local agent's metrics ("" when not served).
    agent_metrics: str = ""


def write_addresses(data_dir: Path, addresses: PlatformAddresses) -> None:
    path = data_dir / ADDRESSES_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(addresses), indent=2) + "\n")
    os.replace(temporary, path)


def remove_addresses(data_dir: Path) -> None:
    (data_dir / ADDRESSES_FILE).unlink(missing_ok=True)


def read_addresses(data_dir: Path) -> PlatformAddresses | None:
    try:
        fields = json.loads((data_dir / ADDRESSES_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        return PlatformAddresses(**fields)
    except TypeError:
        return None


def grpc_target(data_dir: Path, given: str | None) -> str:
    """``given`` if set, else the address the platform of ``data_dir`` wrote, else
    the default port on loopback."""
    if given:
        return given
    addresses = read_addresses(data_dir)
    return addresses.grpc if addresses is not None else DEFAULT_GRPC_TARGET
