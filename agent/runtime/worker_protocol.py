"""What the agent and its runtime worker process say to each other over a pipe.

Frames are a 4-byte big-endian length and a pickle of one message. Both ends
are this package's own code, started by the agent itself, so pickle is safe
here; nothing from the network is unpickled (requests are already domain
objects when they are sent).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from enum import StrEnum

from agent.runtime.base import (
    GenerationError,
    GenerationEvent,
    GenerationRequest,
    InvalidRequest,
    ModelInfo,
    PromptTooLong,
    UnknownModel,
)

_LENGTH = struct.Struct(">I")


# --- agent -> worker ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generate:
    stream: int
    request: GenerationRequest


@dataclass(frozen=True, slots=True)
class Cancel:
    stream: int


# --- worker -> agent ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    models: list[ModelInfo]
    slots: int


@dataclass(frozen=True, slots=True)
class Event:
    stream: int
    event: GenerationEvent


@dataclass(frozen=True, slots=True)
class CachedPrefixes:
    """The runtime's ``cached_prefixes()`` changed (sent before the Finished that
    changed it, so the agent sees the cache a finished generation left)."""

    prefixes: tuple[int, ...]


class FailureClass(StrEnum):
    PROMPT_TOO_LONG = "prompt_too_long"
    UNKNOWN_MODEL = "unknown_model"
    INVALID_REQUEST = "invalid_request"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Failed:
    """The generation raised; sent as plain fields, rebuilt by ``error()``."""

    stream: int
    failure: FailureClass
    message: str
    param: str = ""

    @classmethod
    def of(cls, stream: int, error: BaseException) -> Failed:
        if isinstance(error, PromptTooLong):
            return cls(stream, FailureClass.PROMPT_TOO_LONG, str(error))
        if isinstance(error, UnknownModel):
            return cls(stream, FailureClass.UNKNOWN_MODEL, str(error))
        if isinstance(error, InvalidRequest):
            return cls(stream, FailureClass.INVALID_REQUEST, str(error), error.param)
        return cls(stream, FailureClass.OTHER, str(error) or type(error).__name__)

    def error(self) -> GenerationError:
        if self.failure is FailureClass.PROMPT_TOO_LONG:
            return PromptTooLong(self.message)
        if self.failure is FailureClass.UNKNOWN_MODEL:
            return UnknownModel(self.message)
        if self.failure is FailureClass.INVALID_REQUEST:
            return InvalidRequest(self.message, self.param)
        return GenerationError(self.message)


@dataclass(frozen=True, slots=True)
class Ended:
    """The worker is done with the stream (finished, failed or cancelled)."""

    stream: int


ToWorker = Generate | Cancel
FromWorker = Ready | Event | CachedPrefixes | Failed | Ended


def encode(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read(reader: asyncio.StreamReader) -> object | None:
    """The next message, or None at the end of the pipe."""
    try:
        header = await reader.readexactly(_LENGTH.size)
        (length,) = _LENGTH.unpack(header)
        message: object = pickle.loads(await reader.readexactly(length))
        return message
    except asyncio.IncompleteReadError:
        return None
