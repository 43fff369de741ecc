from __future__ import annotations

import pytest

from core.errors import InvalidApiKey, InvalidArgument
from core.inference import ChatMessage, ChatRole
from server.cloud.auth import CachedAuthenticator
from server.cloud.ports import Caller, HoldRef
from server.cloud.requests import ChatRequest, validate

HI = (ChatMessage(ChatRole.USER, "hi"),)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ChatRequest(model="", messages=HI), "model"),
        (ChatRequest(model="m", messages=()), "messages"),
        (ChatRequest(model="m", messages=HI, temperature=2.5), "temperature"),
        (ChatRequest(model="m", messages=HI, top_p=0.0), "top_p"),
        (ChatRequest(model="m", messages=HI, stop=("a", "b", "c", "d", "e")), "stop"),
        (ChatRequest(model="m", messages=HI, stop=("",)), "stop"),
        (ChatRequest(model="m", messages=HI, stop=("x" * 257,)), "stop"),
        (ChatRequest(model="m" * 1_000_000, messages=HI), "model"),
        (ChatRequest(model="m", messages=HI, user="u" * 257), "user"),
    ],
)
def test_invalid_requests_name_the_field(request_: ChatRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate(request_)
    assert raised.value.metadata == {"field": field}


def test_valid_request_passes() -> None:
    validate(ChatRequest(model="m", messages=HI, temperature=0.0, top_p=1.0, stop=("x",)))


class _CountingAccount:
    def __init__(self) -> None:
        self.calls = 0

    async def authenticate(self, secret: str) -> Caller:
        self.calls += 1
        if secret != "good":
            raise InvalidApiKey("Invalid API key")
        return Caller("account", "key")

    async def create_hold(self, *args: object, **kwargs: object) -> HoldRef:
        raise NotImplementedError

    async def settle_hold(self, hold_id: str, capture: int, shares: object = None) -> int:
        raise NotImplementedError


async def test_an_oversized_credential_is_refused_without_a_lookup() -> None:
    account = _CountingAccount()
    with pytest.raises(InvalidApiKey):
        await CachedAuthenticator(account, ttl_s=60).authenticate("Bearer " + "k" * 100_000)
    assert account.calls == 0


async def test_successful_lookups_are_cached_failures_are_not() -> None:
    account = _CountingAccount()
    auth = CachedAuthenticator(account, ttl_s=60)
    assert await auth.authenticate("Bearer good") == Caller("account", "key")
    assert await auth.authenticate("Bearer good") == Caller("account", "key")
    assert account.calls == 1
    for _ in range(2):
        with pytest.raises(InvalidApiKey):
            await auth.authenticate("Bearer bad")
    assert account.calls == 3


async def test_expired_entries_are_looked_up_again() -> None:
    account = _CountingAccount()
    auth = CachedAuthenticator(account, ttl_s=0)
    await auth.authenticate("Bearer good")
    await auth.authenticate("Bearer good")
    assert account.calls == 2


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "good"])
async def test_malformed_authorization_is_rejected_without_lookup(header: str | None) -> None:
    account = _CountingAccount()
    with pytest.raises(InvalidApiKey):
        await CachedAuthenticator(account).authenticate(header)
    assert account.calls == 0
