"""Conversions between the InferenceLogging proto and the domain shape."""

from __future__ import annotations

from resultity.common.v1 import inference_logging_pb2 as pb

from server.common.inference_logging import InferenceLogging


def logging_to_pb(setting: InferenceLogging) -> pb.InferenceLogging:
    return pb.InferenceLogging(enabled=setting.enabled, retention_days=setting.retention_days)


def logging_from_pb(message: pb.InferenceLogging) -> InferenceLogging:
    """As given: 0 days stays 0 (validate_logging fills in the default)."""
    return InferenceLogging(message.enabled, message.retention_days)
