"""The operator commands find the platform `resultity up` runs from its data dir."""

from __future__ import annotations

from pathlib import Path

from server.addresses import (
    DEFAULT_GRPC_TARGET,
    PlatformAddresses,
    grpc_target,
    read_addresses,
    remove_addresses,
    write_addresses,
)
from server.cli import _parser


def test_the_commands_target_what_up_wrote_unless_told_otherwise(tmp_path: Path) -> None:
    assert grpc_target(tmp_path, None) == DEFAULT_GRPC_TARGET
    addresses = PlatformAddresses(grpc="127.0.0.1:51999", http="http://127.0.0.1:8081")
    write_addresses(tmp_path, addresses)
    assert read_addresses(tmp_path) == addresses
    assert grpc_target(tmp_path, None) == "127.0.0.1:51999"
    assert grpc_target(tmp_path, "10.0.0.1:50051") == "10.0.0.1:50051"
    remove_addresses(tmp_path)
    assert grpc_target(tmp_path, None) == DEFAULT_GRPC_TARGET


def test_an_unreadable_addresses_file_falls_back_to_the_default(tmp_path: Path) -> None:
    (tmp_path / "addresses.json").write_text("{not json")
    assert grpc_target(tmp_path, None) == DEFAULT_GRPC_TARGET
    (tmp_path / "addresses.json").write_text('{"unknown": 1}')
    assert grpc_target(tmp_path, None) == DEFAULT_GRPC_TARGET


def test_no_command_has_a_fixed_default_target() -> None:
    parser = _parser()
    for argv in (
        ["account", "summary"],
        ["nodes", "list"],
        ["subclouds", "list"],
    ):
        args = parser.parse_args(argv)
        assert (getattr(args, "target", None), getattr(args, "network", None)) == (None, None)
        assert getattr(args, "cloud", None) is None
