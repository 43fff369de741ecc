"""What every servicer reads from a call and writes into messages: call metadata
(the caller's credential, the request id) and protobuf timestamps."""

from __future__ import annotations

from typing import Any

import grpc

# Servicers write timestamps as every end of a contract does.
from core.convert.timestamps import timestamp_to_pb as timestamp_to_pb
from core.metadata import AUTHORIZATION

Context = grpc.aio.ServicerContext[Any, Any]


def metadata_value(context: Context, key: str) -> str | None:
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return value if isinstance(value, str) else value.decode()
    return None


def authorization(context: Context) -> str | None:
    return metadata_value(context, AUTHORIZATION)
