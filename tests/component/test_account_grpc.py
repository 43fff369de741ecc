"""The account server over real gRPC, on a real PostgreSQL database.

The database is shared by the whole test session: every test creates its own
accounts and never assumes empty tables.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from resultity.account.v1 import (
    account_service_pb2 as account_pb,
)
from resultity.account.v1 import (
    api_key_service_pb2 as api_key_pb,
)
from resultity.account.v1 import (
    ledger_service_pb2 as ledger_pb,
)

from core.grpc_errors import error_info
from server.account.api_keys import KeyHasher
from server.account.component import AccountComponent
from server.secrets import PlatformSecrets
from tests.account_support import Stubs, channel_as, expect_error

Code = grpc.StatusCode


SECRETS = PlatformSecrets.generate()


@pytest.fixture(scope="module")
async def component(postgres_dsn: str) -> AsyncIterator[AccountComponent]:
    # A short sweep interval so that the expiry test sees the real background sweeper.
    component = await AccountComponent.start(postgres_dsn, SECRETS, hold_sweep_interval_s=0.05)
    yield component
    await component.stop()


@pytest.fixture(scope="module")
async def stubs(component: AccountComponent) -> AsyncIterator[Stubs]:
    server = grpc.aio.server()
    component.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # The platform's own services call with the service token.
    async with channel_as(f"127.0.0.1:{port}", SECRETS.service_token) as channel:
        yield Stubs.on(channel)
    await server.stop(grace=None)


@pytest.fixture(scope="module")
async def db(postgres_dsn: str, component: AccountComponent) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(postgres_dsn)
    yield conn
    await conn.close()


def key() -> str:
    return str(uuid.uuid4())


def timestamp(value: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(value)
    return result


async def new_account(stubs: Stubs, funds: int = 0) -> str:
    created = await stubs.accounts.CreateAccount(account_pb.CreateAccountRequest(name="test"))
    account_id = created.account.account_id
    if funds:
        await stubs.ledger.TopUp(
            ledger_pb.TopUpRequest(
                account_id=account_id, amount_micro_credits=funds, idempotency_key=key()
            )
        )
    return account_id


async def balance(stubs: Stubs, account_id: str) -> tuple[int, int]:
    response = await stubs.ledger.GetBalance(ledger_pb.GetBalanceRequest(account_id=account_id))
    return response.balance.available_micro_credits, response.balance.held_micro_credits


def hold_request(account_id: str, amount: int, idempotency_key: str) -> ledger_pb.CreateHoldRequest:
    return ledger_pb.CreateHoldRequest(
        account_id=account_id, amount_micro_credits=amount, idempotency_key=idempotency_key
    )


async def test_create_account_key_and_authenticate(stubs: Stubs) -> None:
    created = await stubs.accounts.CreateAccount(account_pb.CreateAccountRequest(name="Ada"))
    account_id = created.account.account_id
    got = await stubs.accounts.GetAccount(account_pb.GetAccountRequest(account_id=account_id))
    assert got.account == created.account
    assert got.account.name == "Ada"

    issued = await stubs.keys.CreateApiKey(
        api_key_pb.CreateApiKeyRequest(account_id=account_id, name="laptop")
    )
    assert issued.secret.startswith("rsk_")
    assert issued.api_key.prefix == issued.secret[:12]
    assert issued.api_key.account_id == account_id

    authenticated = await stubs.keys.AuthenticateApiKey(
        api_key_pb.AuthenticateApiKeyRequest(secret=issued.secret)
    )
    assert authenticated.api_key == issued.api_key


async def test_unknown_and_malformed_ids(stubs: Stubs) -> None:
    unknown = str(uuid.uuid4())
    await expect_error(
        stubs.accounts.GetAccount(account_pb.GetAccountRequest(account_id=unknown)),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    info = await expect_error(
        stubs.ledger.GetBalance(ledger_pb.GetBalanceRequest(account_id="not-a-uuid")),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert info.metadata["field"] == "account_id"
    await expect_error(
        stubs.keys.CreateApiKey(api_key_pb.CreateApiKeyRequest(account_id=unknown)),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    await expect_error(
        stubs.accounts.CreateAccount(account_pb.CreateAccountRequest(name="  ")),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


async def test_revoked_unknown_and_malformed_keys_are_unauthenticated(
    stubs: Stubs, component: AccountComponent
) -> None:
    account_id = await new_account(stubs)
    issued = await stubs.keys.CreateApiKey(api_key_pb.CreateApiKeyRequest(account_id=account_id))
    await stubs.keys.RevokeApiKey(
        api_key_pb.RevokeApiKeyRequest(api_key_id=issued.api_key.api_key_id)
    )
    well_formed_but_unknown = KeyHasher(os.urandom(32)).generate().secret
    for secret in (issued.secret, well_formed_but_unknown, "rsk_nope", "", issued.secret[:-1]):
        await expect_error(
            stubs.keys.AuthenticateApiKey(api_key_pb.AuthenticateApiKeyRequest(secret=secret)),
            Code.UNAUTHENTICATED,
            "INVALID_API_KEY",
        )


async def test_top_up_is_idempotent(stubs: Stubs) -> None:
    account_id = await new_account(stubs)
    request = ledger_pb.TopUpRequest(
        account_id=account_id, amount_micro_credits=1_000, idempotency_key=key()
    )
    responses = await asyncio.gather(*(stubs.ledger.TopUp(request) for _ in range(20)))
    assert len({response.transfer_id for response in responses}) == 1
    assert await balance(stubs, account_id) == (1_000, 0)

    replay = await stubs.ledger.TopUp(request)
    assert replay.transfer_id == responses[0].transfer_id
    assert replay.balance.available_micro_credits == 1_000

    changed = ledger_pb.TopUpRequest()
    changed.CopyFrom(request)
    changed.amount_micro_credits = 2_000
    await expect_error(stubs.ledger.TopUp(changed), Code.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    for amount in (0, -5):
        await expect_error(
            stubs.ledger.TopUp(
                ledger_pb.TopUpRequest(
                    account_id=account_id, amount_micro_credits=amount, idempotency_key=key()
                )
            ),
            Code.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
    assert await balance(stubs, account_id) == (1_000, 0)


async def test_concurrent_holds_cannot_overspend(stubs: Stubs) -> None:
    account_id = await new_account(stubs, funds=5_000)

    async def attempt() -> str:
        try:
            await stubs.ledger.CreateHold(hold_request(account_id, 5_000, key()))
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            assert info is not None
            return f"{error.code().name}/{info.reason}"
        return "OK"

    async def watch() -> list[tuple[int, int]]:
        return [await balance(stubs, account_id) for _ in range(20)]

    outcomes, seen = await asyncio.gather(asyncio.gather(*(attempt() for _ in range(200))), watch())
    assert outcomes.count("OK") == 1
    assert outcomes.count("RESOURCE_EXHAUSTED/INSUFFICIENT_QUOTA") == 199
    assert all(available >= 0 and held >= 0 for available, held in seen)
    assert await balance(stubs, account_id) == (0, 5_000)


async def test_refused_hold_leaves_nothing_behind(stubs: Stubs, db: Any) -> None:
    account_id = await new_account(stubs, funds=100)
    idempotency_key = key()
    await expect_error(
        stubs.ledger.CreateHold(hold_request(account_id, 101, idempotency_key)),
        Code.RESOURCE_EXHAUSTED,
        "INSUFFICIENT_QUOTA",
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM transfers WHERE idempotency_key = $1", idempotency_key
        )
        == 0
    )
    assert await balance(stubs, account_id) == (100, 0)
    # Nothing was recorded under the key, so the same request succeeds once funded.
    await stubs.ledger.TopUp(
        ledger_pb.TopUpRequest(account_id=account_id, amount_micro_credits=1, idempotency_key=key())
    )
    hold = (await stubs.ledger.CreateHold(hold_request(account_id, 101, idempotency_key))).hold
    assert hold.amount_micro_credits == 101
    assert await balance(stubs, account_id) == (0, 101)


async def test_settling_for_an_unknown_operator_changes_nothing(stubs: Stubs, db: Any) -> None:
    account_id = await new_account(stubs, funds=1_000)
    hold = (await stubs.ledger.CreateHold(hold_request(account_id, 600, key()))).hold
    line = ledger_pb.SettlementLine(
        operator_account_id=str(uuid.uuid4()), node_id="n1", model="m", tokens=10
    )
    await expect_error(
        stubs.ledger.SettleHold(
            ledger_pb.SettleHoldRequest(
                hold_id=hold.hold_id, capture_micro_credits=300, lines=[line], total_tokens=10
            )
        ),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    status = await db.fetchval(
        "SELECT status FROM transfers WHERE id = $1", uuid.UUID(hold.hold_id)
    )
    assert status == "pending"
    assert await balance(stubs, account_id) == (400, 600)


async def test_settle_partial_capture_releases_the_rest(stubs: Stubs, db: Any) -> None:
    account_id = await new_account(stubs, funds=1_000)
    revenue_before = await db.fetchval(
        "SELECT sum(credits_posted) FROM ledger_accounts WHERE kind = 'platform_revenue'"
    )
    hold = (await stubs.ledger.CreateHold(hold_request(account_id, 600, key()))).hold
    assert hold.status == ledger_pb.HOLD_STATUS_OPEN
    assert hold.account_id == account_id
    assert await balance(stubs, account_id) == (400, 600)

    for bad in (601, -1):
        await expect_error(
            stubs.ledger.SettleHold(
                ledger_pb.SettleHoldRequest(hold_id=hold.hold_id, capture_micro_credits=bad)
            ),
            Code.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )

    settle = ledger_pb.SettleHoldRequest(hold_id=hold.hold_id, capture_micro_credits=250)
    settled = (await stubs.ledger.SettleHold(settle)).hold
    assert settled.status == ledger_pb.HOLD_STATUS_SETTLED
    assert settled.captured_micro_credits == 250
    assert settled.amount_micro_credits == 600
    assert await balance(stubs, account_id) == (750, 0)
    revenue_after = await db.fetchval(
        "SELECT sum(credits_posted) FROM ledger_accounts WHERE kind = 'platform_revenue'"
    )
    assert revenue_after - revenue_before == 250
    captures = await db.fetch(
        "SELECT amount FROM transfers WHERE kind = 'capture' AND pending_id = $1",
        uuid.UUID(hold.hold_id),
    )
    assert [row["amount"] for row in captures] == [250]

    # A hold resolves once: the same capture replays, a different one fails.
    again = (await stubs.ledger.SettleHold(settle)).hold
    assert again == settled
    for other in (300, 0):
        await expect_error(
            stubs.ledger.SettleHold(
                ledger_pb.SettleHoldRequest(hold_id=hold.hold_id, capture_micro_credits=other)
            ),
            Code.FAILED_PRECONDITION,
            "HOLD_ALREADY_RESOLVED",
        )
    assert await balance(stubs, account_id) == (750, 0)

    await expect_error(
        stubs.ledger.SettleHold(ledger_pb.SettleHoldRequest(hold_id=str(uuid.uuid4()))),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )


async def test_concurrent_settlements_resolve_a_hold_once(stubs: Stubs, db: Any) -> None:
    account_id = await new_account(stubs, funds=1_000)
    hold = (await stubs.ledger.CreateHold(hold_request(account_id, 600, key()))).hold

    async def settle(capture: int) -> str:
        request = ledger_pb.SettleHoldRequest(hold_id=hold.hold_id, capture_micro_credits=capture)
        try:
            settled = (await stubs.ledger.SettleHold(request)).hold
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            assert info is not None
            return info.reason
        return f"captured {settled.captured_micro_credits}"

    # Replays of one capture and competing captures, all at once: one resolution wins,
    # its replays return it, every other capture is refused.
    outcomes = await asyncio.gather(*(settle(capture) for capture in [250] * 20 + [300] * 20))
    winner = next(outcome for outcome in outcomes if outcome.startswith("captured"))
    won = int(winner.split()[1])
    assert outcomes.count(winner) == 20
    assert outcomes.count("HOLD_ALREADY_RESOLVED") == 20
    assert await balance(stubs, account_id) == (1_000 - won, 0)
    captures = await db.fetch(
        "SELECT amount FROM transfers WHERE kind = 'capture' AND pending_id = $1",
        uuid.UUID(hold.hold_id),
    )
    assert [row["amount"] for row in captures] == [won]


async def test_zero_capture_releases_the_hold(stubs: Stubs) -> None:
    account_id = await new_account(stubs, funds=1_000)
    hold = (await stubs.ledger.CreateHold(hold_request(account_id, 1_000, key()))).hold
    request = ledger_pb.SettleHoldRequest(hold_id=hold.hold_id, capture_micro_credits=0)
    released = (await stubs.ledger.SettleHold(request)).hold
    assert released.status == ledger_pb.HOLD_STATUS_RELEASED
    assert released.captured_micro_credits == 0
    assert (await stubs.ledger.SettleHold(request)).hold == released
    assert await balance(stubs, account_id) == (1_000, 0)


async def test_concurrent_replays_create_one_hold(stubs: Stubs, db: Any) -> None:
    account_id = await new_account(stubs, funds=1_000)
    idempotency_key = key()
    request = hold_request(account_id, 400, idempotency_key)
    request.expires.CopyFrom(timestamp(datetime.now(UTC) + timedelta(minutes=5)))
    responses = await asyncio.gather(*(stubs.ledger.CreateHold(request) for _ in range(100)))
    assert all(response == responses[0] for response in responses)
    holds = await db.fetchval(
        "SELECT count(*) FROM transfers WHERE idempotency_key = $1", idempotency_key
    )
    assert holds == 1
    assert await balance(stubs, account_id) == (600, 400)

    # A retry that recomputes its deadline replays the first hold.
    retry = ledger_pb.CreateHoldRequest()
    retry.CopyFrom(request)
    retry.expires.CopyFrom(timestamp(datetime.now(UTC) + timedelta(minutes=6)))
    assert await stubs.ledger.CreateHold(retry) == responses[0]

    changed = ledger_pb.CreateHoldRequest()
    changed.CopyFrom(request)
    changed.amount_micro_credits = 500
    await expect_error(
        stubs.ledger.CreateHold(changed), Code.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"
    )
    other_account = await new_account(stubs, funds=1_000)
    changed.CopyFrom(request)
    changed.account_id = other_account
    await expect_error(
        stubs.ledger.CreateHold(changed), Code.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"
    )
    assert await balance(stubs, account_id) == (600, 400)
    assert await balance(stubs, other_account) == (1_000, 0)


async def test_hold_request_validation(stubs: Stubs) -> None:
    account_id = await new_account(stubs, funds=1_000)
    past = hold_request(account_id, 10, key())
    past.expires.CopyFrom(timestamp(datetime.now(UTC) - timedelta(seconds=1)))
    info = await expect_error(
        stubs.ledger.CreateHold(past), Code.INVALID_ARGUMENT, "INVALID_ARGUMENT"
    )
    assert info.metadata["field"] == "expires"
    for bad in (hold_request(account_id, 0, key()), hold_request(account_id, 10, "")):
        await expect_error(stubs.ledger.CreateHold(bad), Code.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    await expect_error(
        stubs.ledger.CreateHold(hold_request(str(uuid.uuid4()), 10, key())),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    # Without an expiry a hold gets the default lifetime, minutes away.
    hold = (await stubs.ledger.CreateHold(hold_request(account_id, 10, key()))).hold
    assert hold.expires.ToDatetime(tzinfo=UTC) > datetime.now(UTC) + timedelta(minutes=1)
    assert await balance(stubs, account_id) == (990, 10)


async def test_expired_hold_is_released_by_the_sweeper(stubs: Stubs) -> None:
    account_id = await new_account(stubs, funds=1_000)
    request = hold_request(account_id, 700, key())
    request.expires.CopyFrom(timestamp(datetime.now(UTC) + timedelta(milliseconds=200)))
    hold = (await stubs.ledger.CreateHold(request)).hold
    assert await balance(stubs, account_id) == (300, 700)

    # Poll (up to ~30 s) for the background sweeper to release the hold.
    for _ in range(600):
        if await balance(stubs, account_id) == (1_000, 0):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the expired hold was not released")
    await expect_error(
        stubs.ledger.SettleHold(
            ledger_pb.SettleHoldRequest(hold_id=hold.hold_id, capture_micro_credits=100)
        ),
        Code.FAILED_PRECONDITION,
        "HOLD_ALREADY_RESOLVED",
    )
    swept = (await stubs.ledger.SettleHold(ledger_pb.SettleHoldRequest(hold_id=hold.hold_id))).hold
    assert swept.status == ledger_pb.HOLD_STATUS_RELEASED


async def test_ledger_is_conserved_after_a_mixed_workload(stubs: Stubs, db: Any) -> None:
    accounts = [await new_account(stubs, funds=10_000) for _ in range(5)]

    async def spend(account_id: str, round_: int) -> grpc.StatusCode:
        try:
            hold = (await stubs.ledger.CreateHold(hold_request(account_id, 3_000, key()))).hold
        except grpc.aio.AioRpcError as error:
            return error.code()
        await stubs.ledger.SettleHold(
            ledger_pb.SettleHoldRequest(hold_id=hold.hold_id, capture_micro_credits=round_ * 97)
        )
        return Code.OK

    outcomes = await asyncio.gather(
        *(spend(account_id, round_) for account_id in accounts for round_ in range(10)),
        *(
            stubs.ledger.TopUp(
                ledger_pb.TopUpRequest(
                    account_id=account_id, amount_micro_credits=500, idempotency_key=key()
                )
            )
            for account_id in accounts
        ),
    )
    assert set(outcomes[:50]) <= {Code.OK, Code.RESOURCE_EXHAUSTED}
    assert Code.OK in outcomes[:50]

    totals = await db.fetchrow(
        """SELECT sum(credits_posted - debits_posted) AS posted,
                  sum(credits_pending - debits_pending) AS pending,
                  count(*) FILTER (WHERE debits_must_not_exceed_credits
                                   AND credits_posted - debits_posted - debits_pending < 0)
                      AS overdrawn
           FROM ledger_accounts"""
    )
    assert (totals["posted"], totals["pending"], totals["overdrawn"]) == (0, 0, 0)

    # Every running total equals the sum of the transfers behind it.
    mismatched = await db.fetchval(
        """WITH moves AS (
               SELECT debit_account_id AS id, amount AS dpo, 0 AS cpo, 0 AS dpe, 0 AS cpe
               FROM transfers WHERE status = 'posted'
               UNION ALL SELECT credit_account_id, 0, amount, 0, 0
               FROM transfers WHERE status = 'posted'
               UNION ALL SELECT debit_account_id, 0, 0, amount, 0
               FROM transfers WHERE status = 'pending'
               UNION ALL SELECT credit_account_id, 0, 0, 0, amount
               FROM transfers WHERE status = 'pending'),
           sums AS (
               SELECT id, sum(dpo) AS dpo, sum(cpo) AS cpo, sum(dpe) AS dpe, sum(cpe) AS cpe
               FROM moves GROUP BY id)
           SELECT count(*) FROM ledger_accounts la LEFT JOIN sums s ON s.id = la.id
           WHERE la.debits_posted <> coalesce(s.dpo, 0)
              OR la.credits_posted <> coalesce(s.cpo, 0)
              OR la.debits_pending <> coalesce(s.dpe, 0)
              OR la.credits_pending <> coalesce(s.cpe, 0)"""
    )
    assert mismatched == 0
