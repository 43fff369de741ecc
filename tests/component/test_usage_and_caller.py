"""The account layer tells a key's holder who they are (GetCaller) and what their
requests cost (UsageService): a record per settled request and sums per hour or day,
projected from the ledger's usage events, each counted once."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import usage_service_pb2 as usage_pb
from resultity.account.v1 import usage_service_pb2_grpc as usage_grpc
from resultity.cloud.v1 import inference_service_pb2 as cloud_pb
from resultity.common.v1 import inference_pb2 as common_pb

from core.metadata import bearer_metadata
from server.account.ledger_events import USAGE_SETTLED, LedgerEvent
from server.network.catalog import SMOLLM2_135M
from tests.account_support import Metadata, expect_error
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import Customer, Platform, running_platform

PARAMS = cloud_pb.ChatCompletionParams(
    model=SMOLLM2_135M.id,
    messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hello there")],
)


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


async def _key(platform: Platform, account_id: str, *scopes: int) -> Metadata:
    issued = await keys_grpc.ApiKeyServiceStub(platform.channel).CreateApiKey(
        keys_pb.CreateApiKeyRequest(account_id=account_id, name="console", scopes=scopes),
        metadata=platform.service,
    )
    return bearer_metadata(issued.secret)


async def _records(platform: Platform, metadata: Metadata, account_id: str) -> list[object]:
    response = await usage_grpc.UsageServiceStub(platform.channel).ListUsageRecords(
        usage_pb.ListUsageRecordsRequest(account_id=account_id), metadata=metadata
    )
    return list(response.records)


async def _settled_records(
    platform: Platform, metadata: Metadata, customer: Customer, count: int
) -> list[usage_pb.UsageRecord]:
    """The customer's records once ``count`` arrived (the relay runs every 0.5 s)."""
    stub = usage_grpc.UsageServiceStub(platform.channel)
    request = usage_pb.ListUsageRecordsRequest(account_id=customer.account_id)
    async with asyncio.timeout(10):  # bounds a broken test only
        while True:
            records = (await stub.ListUsageRecords(request, metadata=metadata)).records
            if len(records) >= count:
                return list(records)
            await asyncio.sleep(0.05)


async def test_each_request_becomes_a_usage_record_and_counts_in_its_hour(
    platform: Platform,
) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)
    manage = await _key(platform, customer.account_id, keys_pb.API_KEY_SCOPE_MANAGEMENT)
    charged = []
    for _ in range(2):
        response = await platform.inference.CreateChatCompletion(
            cloud_pb.CreateChatCompletionRequest(params=PARAMS), metadata=customer.metadata
        )
        charged.append(
            (
                response.billing.charged_micro_credits,
                response.usage.prompt_tokens + response.usage.completion_tokens,
            )
        )
    records = await _settled_records(platform, manage, customer, 2)
    assert [(r.charged_micro_credits, r.tokens) for r in records] == charged[::-1]
    assert all(r.status == ledger_pb.HOLD_STATUS_SETTLED for r in records)
    assert all(r.held_micro_credits >= r.charged_micro_credits for r in records)
    assert records[0].settled.ToDatetime(UTC) >= records[1].settled.ToDatetime(UTC)

    stub = usage_grpc.UsageServiceStub(platform.channel)
    hourly = await stub.GetUsageHistory(
        usage_pb.GetUsageHistoryRequest(account_id=customer.account_id, intervals=3),
        metadata=manage,
    )
    assert hourly.interval == usage_pb.USAGE_INTERVAL_HOUR
    assert len(hourly.buckets) == 3
    # Both requests fall in the last two hours (the first if they straddle an hour).
    assert hourly.buckets[0].requests == 0
    assert (
        sum(b.requests for b in hourly.buckets),
        sum(b.tokens for b in hourly.buckets),
        sum(b.charged_micro_credits for b in hourly.buckets),
    ) == (2, sum(tokens for _, tokens in charged), sum(amount for amount, _ in charged))
    starts = [b.start.ToDatetime(UTC) for b in hourly.buckets]
    assert {(b - a).total_seconds() for a, b in itertools.pairwise(starts)} == {3600}
    daily = await stub.GetUsageHistory(
        usage_pb.GetUsageHistoryRequest(
            account_id=customer.account_id, interval=usage_pb.USAGE_INTERVAL_DAY
        ),
        metadata=manage,
    )
    assert len(daily.buckets) == 24
    assert sum(b.requests for b in daily.buckets[-2:]) == 2
    assert daily.buckets[-1].start.ToDatetime(UTC).hour == 0

    # Paging, newest first.
    first = await stub.ListUsageRecords(
        usage_pb.ListUsageRecordsRequest(account_id=customer.account_id, page_size=1),
        metadata=manage,
    )
    second = await stub.ListUsageRecords(
        usage_pb.ListUsageRecordsRequest(
            account_id=customer.account_id, page_size=1, page_token=first.next_page_token
        ),
        metadata=manage,
    )
    assert [r.hold_id for r in (*first.records, *second.records)] == [r.hold_id for r in records]


async def test_usage_is_readable_only_by_its_account_and_admins(platform: Platform) -> None:
    customer = await platform.customer(credits=0)
    other = await platform.customer(credits=0)
    other_key = await _key(platform, other.account_id, keys_pb.API_KEY_SCOPE_MANAGEMENT)
    admin = await _key(platform, other.account_id, keys_pb.API_KEY_SCOPE_ADMIN)
    stub = usage_grpc.UsageServiceStub(platform.channel)
    for call in (
        stub.ListUsageRecords(
            usage_pb.ListUsageRecordsRequest(account_id=customer.account_id), metadata=other_key
        ),
        stub.GetUsageHistory(
            usage_pb.GetUsageHistoryRequest(account_id=customer.account_id), metadata=other_key
        ),
    ):
        await expect_error(call, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    # An inference-only key reads nothing of the account layer.
    await expect_error(
        stub.ListUsageRecords(
            usage_pb.ListUsageRecordsRequest(account_id=customer.account_id),
            metadata=customer.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    assert await _records(platform, admin, customer.account_id) == []
    for bad in (-1, 367):
        await expect_error(
            stub.GetUsageHistory(
                usage_pb.GetUsageHistoryRequest(account_id=customer.account_id, intervals=bad),
                metadata=admin,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
    await expect_error(
        stub.GetUsageHistory(
            usage_pb.GetUsageHistoryRequest(account_id=customer.account_id, interval=7),  # type: ignore[arg-type]
            metadata=admin,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


async def test_a_redelivered_usage_event_counts_once(platform: Platform) -> None:
    customer = await platform.customer(credits=0)
    event = LedgerEvent(
        uuid.uuid4(),
        USAGE_SETTLED,
        {
            "hold_id": str(uuid.uuid4()),
            "account_id": customer.account_id,
            "status": "settled",
            "held": 900,
            "captured": 500,
            "total_tokens": 12,
            "settled_at": datetime.now(UTC).isoformat(),
        },
        datetime.now(UTC),
    )
    for _ in range(2):
        await platform.account.usage.project(event)
    [record] = await _records(platform, platform.service, customer.account_id)
    assert (record.charged_micro_credits, record.tokens) == (500, 12)  # type: ignore[attr-defined]
    history = await usage_grpc.UsageServiceStub(platform.channel).GetUsageHistory(
        usage_pb.GetUsageHistoryRequest(account_id=customer.account_id, intervals=1),
        metadata=platform.service,
    )
    assert [(b.requests, b.charged_micro_credits) for b in history.buckets] == [(1, 500)]


async def test_get_caller_names_the_keys_account_and_rights(platform: Platform) -> None:
    customer = await platform.customer(credits=0)
    accounts = account_grpc.AccountServiceStub(platform.channel)
    manage = await _key(platform, customer.account_id, keys_pb.API_KEY_SCOPE_MANAGEMENT)
    admin = await _key(platform, customer.account_id, keys_pb.API_KEY_SCOPE_ADMIN)
    mine = await accounts.GetCaller(account_pb.GetCallerRequest(), metadata=manage)
    assert (mine.account.account_id, mine.admin) == (customer.account_id, False)
    assert list(mine.api_key.scopes) == [keys_pb.API_KEY_SCOPE_MANAGEMENT]
    assert (await accounts.GetCaller(account_pb.GetCallerRequest(), metadata=admin)).admin
    platform_itself = await accounts.GetCaller(
        account_pb.GetCallerRequest(), metadata=platform.service
    )
    assert platform_itself.admin
    assert not platform_itself.HasField("account")
    assert not platform_itself.HasField("api_key")
    await expect_error(
        accounts.GetCaller(account_pb.GetCallerRequest(), metadata=customer.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    await expect_error(
        accounts.GetCaller(
            account_pb.GetCallerRequest(), metadata=bearer_metadata("rsk_" + "x" * 40)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_API_KEY",
    )
