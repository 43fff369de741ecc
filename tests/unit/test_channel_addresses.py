"""How many addresses a channel target names (core/channels.py ``addresses``), and
so how many job streams cloud keeps to a network replica (``pool_size``)."""

from __future__ import annotations

import pytest

from core.channels import addresses
from server.cloud.job_streams import STREAMS, pool_size


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ("127.0.0.1:50051", 1),
        ("[::1]:50051", 1),
        ("dns:127.0.0.1:50051", 1),
        ("dns:///10.0.0.7:50051", 1),
        ("dns://8.8.8.8/10.0.0.7:50051", 1),
        ("ipv4:127.0.0.1:1", 1),
        ("ipv4:127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", 3),
        ("ipv6:[::1]:1,[::1]:2", 2),
        ("unix:/run/resultity.sock", 1),
        ("resultity-network:50051", None),
        ("localhost:50051", None),
        ("dns:///resultity-network.default.svc:50051", None),
        ("dns://8.8.8.8/resultity-network:50051", None),
    ],
)
def test_a_target_names_its_addresses_and_a_dns_name_none(target: str, named: int | None) -> None:
    assert addresses(target) == named


def test_a_replica_gets_a_stream_per_address_and_a_dns_name_the_whole_pool() -> None:
    assert pool_size("127.0.0.1:50051") == 1
    assert pool_size("ipv4:127.0.0.1:1,127.0.0.1:2") == 2
    many = ",".join(f"127.0.0.1:{port}" for port in range(1, STREAMS + 3))
    assert pool_size(f"ipv4:{many}") == STREAMS
    assert pool_size("resultity-network:50051") == STREAMS
