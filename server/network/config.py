"""The network's configuration: a versioned document pushed to every agent.

Each change gets the next version; connected agents receive it at once (new
ones right after their welcome), apply it and acknowledge the version, so an
operator can see which node runs which version (NodeAdminService).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import FailedPrecondition, InvalidArgument
from core.inference import ModelPrice

# Agents older than this sign results in a form the network no longer checks
# (result digest v1, before logprobs and embeddings were covered): refused at
# hello, whatever the configuration's own minimum.
OLDEST_COMPATIBLE_AGENT = "0.2.0"


@dataclass(frozen=True, slots=True)
class ConfigModel:
    model: str
    price: ModelPrice
    context_length: int
    runtimes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    version: int
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    min_agent_version: str = ""
    canary_rate: float = 0.0
    models: tuple[ConfigModel, ...] = ()


def validate_config(config: NetworkConfig) -> NetworkConfig:
    if config.heartbeat_interval_s <= 0 or config.heartbeat_timeout_s <= 0:
        raise InvalidArgument("heartbeat timings must be positive", field="config")
    if config.heartbeat_timeout_s <= config.heartbeat_interval_s:
        raise InvalidArgument(
            "heartbeat_timeout must be longer than heartbeat_interval", field="config"
        )
    if not 0.0 <= config.canary_rate <= 1.0:
        raise InvalidArgument("canary_rate must be in [0, 1]", field="canary_rate")
    if config.min_agent_version and parse_version(config.min_agent_version) is None:
        raise InvalidArgument("min_agent_version must look like 1.2.3", field="min_agent_version")
    return config


def next_version(current: NetworkConfig, proposed: NetworkConfig, expected: int) -> NetworkConfig:
    """``proposed`` as the version after ``current``; ``expected`` 0 skips the check."""
    if expected and expected != current.version:
        raise FailedPrecondition(
            f"the configuration is at version {current.version}, not {expected}"
        )
    validated = validate_config(proposed)
    return NetworkConfig(
        current.version + 1,
        validated.heartbeat_interval_s,
        validated.heartbeat_timeout_s,
        validated.min_agent_version,
        validated.canary_rate,
        validated.models,
    )


def parse_version(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return None


def version_at_least(version: str, minimum: str) -> bool:
    """Whether ``version`` is at least ``minimum``; unparsable versions are not."""
    if not minimum:
        return True
    have, need = parse_version(version), parse_version(minimum)
    return have is not None and need is not None and have >= need
