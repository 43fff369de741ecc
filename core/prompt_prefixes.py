"""Fingerprints of a conversation's prefixes, shared by nodes and the router.

A node that keeps a conversation's tokens in its cache advertises the
fingerprints of that conversation cut at each message boundary; the router
fingerprints a request's messages the same way and prefers the node holding
its longest prefix, so a chat's next turn lands where its start is cached.

A fingerprint covers the model, the tools offered (they are rendered into the
prompt) and the messages up to the boundary, each field length-prefixed so no
two different conversations share an encoding. 64 bits: a collision costs a
cache miss, never a wrong answer (the node compares tokens before reusing).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

from core.inference import ChatMessage, ToolUse

# Heartbeats carry at most this many fingerprints; the router ignores the rest.
MAX_ADVERTISED_PREFIXES = 64

_LENGTH = struct.Struct(">I")


def _field(hasher: hashlib.blake2b, value: str) -> None:
    data = value.encode("utf-8", "surrogatepass")
    hasher.update(_LENGTH.pack(len(data)))
    hasher.update(data)


def _seed(model: str, tool_use: ToolUse | None) -> hashlib.blake2b:
    hasher = hashlib.blake2b(digest_size=8, person=b"rs-prefix")
    _field(hasher, model)
    tools = () if tool_use is None else tool_use.tools
    hasher.update(_LENGTH.pack(len(tools)))
    for tool in tools:
        _field(hasher, tool.name)
        _field(hasher, tool.description)
        _field(hasher, tool.parameters)
    return hasher


def _add_message(hasher: hashlib.blake2b, message: ChatMessage) -> None:
    _field(hasher, message.role.value)
    _field(hasher, message.name)
    _field(hasher, message.content)
    _field(hasher, message.tool_call_id)
    hasher.update(_LENGTH.pack(len(message.tool_calls)))
    for call in message.tool_calls:
        _field(hasher, call.id)
        _field(hasher, call.name)
        _field(hasher, call.arguments)


def prefix_fingerprints(
    model: str, tool_use: ToolUse | None, messages: Sequence[ChatMessage]
) -> tuple[int, ...]:
    """The fingerprints of ``messages[:1]``, ``messages[:2]``, ... ``messages``
    (shortest first), as unsigned 64-bit integers."""
    hasher = _seed(model, tool_use)
    out: list[int] = []
    for message in messages:
        _add_message(hasher, message)
        out.append(int.from_bytes(hasher.digest(), "big"))
    return tuple(out)


def longest_cached_prefix(fingerprints: Sequence[int], cached: Iterable[int]) -> int:
    """How many leading messages of a request (whose ``prefix_fingerprints`` are
    ``fingerprints``) a node advertising ``cached`` holds; 0 for none."""
    held = cached if isinstance(cached, (set, frozenset)) else frozenset(cached)
    for count in range(len(fingerprints), 0, -1):
        if fingerprints[count - 1] in held:
            return count
    return 0
