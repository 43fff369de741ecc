"""Subclouds over real gRPC and PostgreSQL: management, authorization, bound keys,
their prices, and isolation (a subcloud's jobs never run outside its rules)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.cloud.v1 import subcloud_service_pb2 as sc_pb
from resultity.cloud.v1 import subcloud_service_pb2_grpc as sc_grpc
from resultity.common.v1 import inference_pb2 as common_pb

from core.grpc_errors import error_info
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import DEFAULT_SCRIPT, ScriptedRuntime
from tests.harness import Customer, Platform, running_platform

SUBCLOUD_PRICE = common_pb.ModelPrice(
    prompt_micro_credits_per_token=3, completion_micro_credits_per_token=7
)
Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


def _subclouds(platform: Platform) -> sc_grpc.SubcloudServiceStub:
    return sc_grpc.SubcloudServiceStub(platform.channel)


async def _manager(platform: Platform, credits: int = 1_000_000) -> tuple[Customer, Metadata]:
    """A customer, and the metadata of a management key of its account."""
    customer = await platform.customer(credits)
    key = await keys_grpc.ApiKeyServiceStub(platform.channel).CreateApiKey(
        keys_pb.CreateApiKeyRequest(
            account_id=customer.account_id,
            name="manage",
            scopes=[keys_pb.API_KEY_SCOPE_MANAGEMENT],
        ),
        metadata=platform.service,
    )
    return customer, (("authorization", f"Bearer {key.secret}"),)


async def _create(
    platform: Platform, metadata: Metadata, rules: sc_pb.NodeRules | None = None
) -> sc_pb.Subcloud:
    response = await _subclouds(platform).CreateSubcloud(
        sc_pb.CreateSubcloudRequest(
            name="research",
            rules=rules,
            models=[sc_pb.SubcloudModel(model=SMOLLM2_135M.id, price=SUBCLOUD_PRICE)],
        ),
        metadata=metadata,
    )
    return response.subcloud


async def _bound_key(platform: Platform, metadata: Metadata, subcloud_id: str) -> Metadata:
    issued = await _subclouds(platform).CreateSubcloudApiKey(
        sc_pb.CreateSubcloudApiKeyRequest(subcloud_id=subcloud_id, name="bound"),
        metadata=metadata,
    )
    return (("authorization", f"Bearer {issued.secret}"),)


async def _complete(platform: Platform, metadata: Metadata, region: str = "") -> pb.Usage:
    response = await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(
            params=pb.ChatCompletionParams(
                model=SMOLLM2_135M.id,
                messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
                region=region,
            )
        ),
        metadata=metadata,
    )
    assert response.choices[0].message.content == DEFAULT_SCRIPT
    return response.usage


async def _rpc_error(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    info = error_info(raised.value)
    return raised.value.code(), "" if info is None else info.reason


async def test_owner_manages_members_and_outsiders_see_nothing(platform: Platform) -> None:
    owner, owner_md = await _manager(platform)
    other, other_md = await _manager(platform)
    subcloud = await _create(platform, owner_md)
    assert subcloud.owner_account_id == owner.account_id
    stub = _subclouds(platform)

    code, reason = await _rpc_error(
        stub.GetSubcloud(
            sc_pb.GetSubcloudRequest(subcloud_id=subcloud.subcloud_id), metadata=other_md
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    listed = await stub.ListSubclouds(sc_pb.ListSubcloudsRequest(), metadata=other_md)
    assert subcloud.subcloud_id not in {s.subcloud_id for s in listed.subclouds}
    code, _ = await _rpc_error(
        stub.PutSubcloudMember(
            sc_pb.PutSubcloudMemberRequest(
                subcloud_id=subcloud.subcloud_id, account_id=other.account_id
            ),
            metadata=other_md,
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND

    await stub.PutSubcloudMember(
        sc_pb.PutSubcloudMemberRequest(
            subcloud_id=subcloud.subcloud_id, account_id=other.account_id
        ),
        metadata=owner_md,
    )
    got = await stub.GetSubcloud(
        sc_pb.GetSubcloudRequest(subcloud_id=subcloud.subcloud_id), metadata=other_md
    )
    assert got.subcloud.name == "research"
    # A plain member reads but does not change, and issues keys only for itself.
    code, reason = await _rpc_error(
        stub.UpdateSubcloud(
            sc_pb.UpdateSubcloudRequest(
                subcloud=sc_pb.Subcloud(subcloud_id=subcloud.subcloud_id, name="mine"),
                update_mask=FieldMask(paths=["name"]),
            ),
            metadata=other_md,
        )
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    code, _ = await _rpc_error(
        stub.CreateSubcloudApiKey(
            sc_pb.CreateSubcloudApiKeyRequest(
                subcloud_id=subcloud.subcloud_id, account_id=owner.account_id
            ),
            metadata=other_md,
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    own = await stub.CreateSubcloudApiKey(
        sc_pb.CreateSubcloudApiKeyRequest(subcloud_id=subcloud.subcloud_id), metadata=other_md
    )
    assert own.account_id == other.account_id

    members = await stub.ListSubcloudMembers(
        sc_pb.ListSubcloudMembersRequest(subcloud_id=subcloud.subcloud_id), metadata=owner_md
    )
    assert [(m.account_id, m.role) for m in members.members] == [
        (owner.account_id, sc_pb.SUBCLOUD_ROLE_OWNER),
        (other.account_id, sc_pb.SUBCLOUD_ROLE_MEMBER),
    ]
    code, reason = await _rpc_error(
        stub.RemoveSubcloudMember(
            sc_pb.RemoveSubcloudMemberRequest(
                subcloud_id=subcloud.subcloud_id, account_id=owner.account_id
            ),
            metadata=owner_md,
        )
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_bad_input_and_weak_credentials_are_refused(platform: Platform) -> None:
    customer, owner_md = await _manager(platform)
    stub = _subclouds(platform)
    inference_only = customer.metadata
    code, reason = await _rpc_error(
        stub.CreateSubcloud(sc_pb.CreateSubcloudRequest(name="x"), metadata=inference_only)
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    for request in (
        sc_pb.CreateSubcloudRequest(name=""),
        sc_pb.CreateSubcloudRequest(name="x", models=[sc_pb.SubcloudModel(model="no-such")]),
        sc_pb.CreateSubcloudRequest(name="x", rules=sc_pb.NodeRules(regions=["EU West"])),
        sc_pb.CreateSubcloudRequest(name="x", rules=sc_pb.NodeRules(min_reputation=2)),
        sc_pb.CreateSubcloudRequest(name="x", rules=sc_pb.NodeRules(operator_account_ids=["?"])),
    ):
        code, reason = await _rpc_error(stub.CreateSubcloud(request, metadata=owner_md))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), request
    code, _ = await _rpc_error(
        stub.GetSubcloud(sc_pb.GetSubcloudRequest(subcloud_id=str(uuid.uuid4())), metadata=owner_md)
    )
    assert code == grpc.StatusCode.NOT_FOUND
    # Only the cloud binds keys to subclouds: the account layer refuses anyone else.
    code, _ = await _rpc_error(
        keys_grpc.ApiKeyServiceStub(platform.channel).CreateApiKey(
            keys_pb.CreateApiKeyRequest(
                account_id=customer.account_id, subcloud_id=str(uuid.uuid4())
            ),
            metadata=owner_md,
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_bound_key_pays_the_subcloud_price_for_its_models_only(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime())
    owner, owner_md = await _manager(platform)
    subcloud = await _create(platform, owner_md)
    bound = await _bound_key(platform, owner_md, subcloud.subcloud_id)

    usage = await _complete(platform, bound)
    balance = await platform.balance(owner)
    expected = usage.prompt_tokens * 3 + usage.completion_tokens * 7
    assert 1_000_000 - balance.available_micro_credits == expected
    listed = await platform.inference.ListModels(pb.ListModelsRequest(), metadata=bound)
    assert [(m.id, m.price.completion_micro_credits_per_token) for m in listed.models] == [
        (SMOLLM2_135M.id, 7)
    ]

    # The subcloud stops offering the model: its keys may no longer use it.
    await _subclouds(platform).UpdateSubcloud(
        sc_pb.UpdateSubcloudRequest(
            subcloud=sc_pb.Subcloud(subcloud_id=subcloud.subcloud_id),
            update_mask=FieldMask(paths=["models"]),
        ),
        metadata=owner_md,
    )
    code, reason = await _rpc_error(_complete(platform, bound))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


async def test_archived_subcloud_or_removed_member_key_stops_working(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime())
    _, owner_md = await _manager(platform)
    member, member_md = await _manager(platform)
    subcloud = await _create(platform, owner_md)
    stub = _subclouds(platform)
    await stub.PutSubcloudMember(
        sc_pb.PutSubcloudMemberRequest(
            subcloud_id=subcloud.subcloud_id, account_id=member.account_id
        ),
        metadata=owner_md,
    )
    member_key = await _bound_key(platform, member_md, subcloud.subcloud_id)
    owner_key = await _bound_key(platform, owner_md, subcloud.subcloud_id)
    await _complete(platform, member_key)

    await stub.RemoveSubcloudMember(
        sc_pb.RemoveSubcloudMemberRequest(
            subcloud_id=subcloud.subcloud_id, account_id=member.account_id
        ),
        metadata=owner_md,
    )
    code, reason = await _rpc_error(_complete(platform, member_key))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")

    await _complete(platform, owner_key)
    await stub.ArchiveSubcloud(
        sc_pb.ArchiveSubcloudRequest(subcloud_id=subcloud.subcloud_id), metadata=owner_md
    )
    code, reason = await _rpc_error(_complete(platform, owner_key))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")


LONG_SCRIPT = " ".join(f"w{i}" for i in range(40))


async def test_subcloud_jobs_never_run_outside_its_rules_failover_included(
    platform: Platform,
) -> None:
    operator_a, token_a = await platform.operator()
    _, token_b = await platform.operator()
    inside = [ScriptedRuntime(script=LONG_SCRIPT, token_delay_s=0.002) for _ in range(2)]
    outside = {
        "other operator": ScriptedRuntime(script=LONG_SCRIPT),
        "other region": ScriptedRuntime(script=LONG_SCRIPT),
    }
    for index, runtime in enumerate(inside):
        await platform.start_agent(runtime, f"inside-{index}", token_a, region="eu-west")
    await platform.start_agent(outside["other operator"], "b", token_b, region="eu-west")
    await platform.start_agent(outside["other region"], "a-us", token_a, region="us-east")

    _, owner_md = await _manager(platform)
    subcloud = await _create(
        platform,
        owner_md,
        sc_pb.NodeRules(operator_account_ids=[operator_a], regions=["eu-west"]),
    )
    bound = await _bound_key(platform, owner_md, subcloud.subcloud_id)
    for _ in range(8):
        await _complete_long(platform, bound)

    # Mid-stream failover stays inside the rules as well.
    before = [len(runtime.started_jobs) for runtime in inside]
    parts: list[str] = []
    async for message in platform.inference.StreamChatCompletion(
        pb.StreamChatCompletionRequest(params=_long_params()), metadata=bound
    ):
        if message.choices and message.choices[0].content:
            parts.append(message.choices[0].content)
            if len(parts) == 5:
                [running] = [
                    agent
                    for agent in platform.agents
                    for runtime, count in zip(inside, before, strict=True)
                    if agent.runtime is runtime and len(runtime.started_jobs) > count
                ]
                await running.stop()
    assert "".join(parts) == LONG_SCRIPT

    assert sum(len(runtime.started_jobs) for runtime in inside) == 10  # 8 + 1 + continuation
    assert {name: len(runtime.started_jobs) for name, runtime in outside.items()} == {
        "other operator": 0,
        "other region": 0,
    }
    # A request may narrow itself to a region, but not leave its subcloud's.
    code, reason = await _rpc_error(_complete(platform, bound, region="us-east"))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_a_request_can_ask_for_a_region(platform: Platform) -> None:
    europe, america = ScriptedRuntime(), ScriptedRuntime()
    await platform.start_agent(europe, "eu", region="eu-west")
    await platform.start_agent(america, "us", region="us-east")
    customer = await platform.customer(1_000_000)
    for _ in range(4):
        await _complete(platform, customer.metadata, region="us-east")
    assert (len(europe.started_jobs), len(america.started_jobs)) == (0, 4)
    code, reason = await _rpc_error(_complete(platform, customer.metadata, region="ap-south"))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "NO_CAPACITY")


def _long_params() -> pb.ChatCompletionParams:
    return pb.ChatCompletionParams(
        model=SMOLLM2_135M.id,
        messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
    )


async def _complete_long(platform: Platform, metadata: Metadata) -> None:
    response = await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(params=_long_params()), metadata=metadata
    )
    assert response.choices[0].message.content == LONG_SCRIPT


async def test_a_price_below_the_catalog_runs_only_on_the_members_own_nodes(
    platform: Platform,
) -> None:
    """Public operators are paid from what a request is billed: a subcloud may not
    undercut the catalog on their nodes."""
    owner, owner_md = await _manager(platform)
    member, _ = await _manager(platform)
    stub = _subclouds(platform)
    cheap = [sc_pb.SubcloudModel(model=SMOLLM2_135M.id, price=common_pb.ModelPrice())]
    code, reason = await _rpc_error(
        stub.CreateSubcloud(
            sc_pb.CreateSubcloudRequest(name="cheap", models=cheap), metadata=owner_md
        )
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    created = await stub.CreateSubcloud(
        sc_pb.CreateSubcloudRequest(
            name="cheap",
            models=cheap,
            rules=sc_pb.NodeRules(operator_account_ids=[owner.account_id]),
        ),
        metadata=owner_md,
    )
    subcloud_id = created.subcloud.subcloud_id

    async def update_rules(*operators: str) -> sc_pb.Subcloud:
        subcloud = sc_pb.Subcloud(
            subcloud_id=subcloud_id, rules=sc_pb.NodeRules(operator_account_ids=operators)
        )
        response = await stub.UpdateSubcloud(
            sc_pb.UpdateSubcloudRequest(subcloud=subcloud, update_mask=FieldMask(paths=["rules"])),
            metadata=owner_md,
        )
        return response.subcloud

    # Opening it to every node, or to a stranger's, is refused.
    for operators in ((), (owner.account_id, member.account_id)):
        code, _ = await _rpc_error(update_rules(*operators))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    await stub.PutSubcloudMember(
        sc_pb.PutSubcloudMemberRequest(subcloud_id=subcloud_id, account_id=member.account_id),
        metadata=owner_md,
    )
    updated = await update_rules(owner.account_id, member.account_id)
    assert set(updated.rules.operator_account_ids) == {owner.account_id, member.account_id}
    # A member whose nodes serve the undercut price stays until the rules drop them.
    code, reason = await _rpc_error(
        stub.RemoveSubcloudMember(
            sc_pb.RemoveSubcloudMemberRequest(
                subcloud_id=subcloud_id, account_id=member.account_id
            ),
            metadata=owner_md,
        )
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION")
    # Back at the catalog's price, any node may serve it again.
    at_catalog = sc_pb.Subcloud(
        subcloud_id=subcloud_id,
        models=[sc_pb.SubcloudModel(model=SMOLLM2_135M.id)],
        rules=sc_pb.NodeRules(),
    )
    await stub.UpdateSubcloud(
        sc_pb.UpdateSubcloudRequest(
            subcloud=at_catalog, update_mask=FieldMask(paths=["models", "rules"])
        ),
        metadata=owner_md,
    )
