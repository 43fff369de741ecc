"""Node requirements (which nodes may run a job) in the dispatch API and in cloud's
subcloud rules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb

from core.errors import InvalidArgument
from core.inference import NodeRequirements
from core.regions import validate_region


class RequirementsMessage(Protocol):
    """The fields shared by network NodeRequirements and cloud NodeRules."""

    @property
    def operator_account_ids(self) -> Iterable[str]: ...
    @property
    def regions(self) -> Iterable[str]: ...
    @property
    def min_reputation(self) -> float: ...
    @property
    def verified_only(self) -> bool: ...


def requirements_fields(requirements: NodeRequirements) -> dict[str, Any]:
    """Keyword arguments for either message type, in a stable order."""
    return {
        "operator_account_ids": sorted(requirements.operator_account_ids),
        "regions": sorted(requirements.regions),
        "min_reputation": requirements.min_reputation,
        "verified_only": requirements.verified_only,
    }


def requirements_to_pb(requirements: NodeRequirements) -> dispatch_pb.NodeRequirements:
    return dispatch_pb.NodeRequirements(**requirements_fields(requirements))


def requirements_from_pb(
    message: RequirementsMessage, *, field: str = "requirements"
) -> NodeRequirements:
    """The domain rules; rejects out-of-range reputations and malformed regions."""
    if not 0.0 <= message.min_reputation <= 1.0:
        raise InvalidArgument(
            f"{field}.min_reputation must be between 0 and 1", field=f"{field}.min_reputation"
        )
    return NodeRequirements(
        operator_account_ids=frozenset(message.operator_account_ids),
        regions=frozenset(
            validate_region(region, field=f"{field}.regions") for region in message.regions
        ),
        min_reputation=message.min_reputation,
        verified_only=message.verified_only,
    )
