"""A test double of a service's stub standing for the service's only replica, where the
code under test calls replicas through core/replica_channels.py."""

from __future__ import annotations

from typing import TypeVar

from core.replica_channels import ReplicaChannels, ReplicatedStub

S = TypeVar("S")

# The channel is opened but never used: the double answers every call.
_UNUSED = "127.0.0.1:1"


def one_replica(stub: S) -> ReplicatedStub[S]:
    return ReplicatedStub(ReplicaChannels(_UNUSED), (stub,))
