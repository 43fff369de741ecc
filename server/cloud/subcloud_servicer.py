"""gRPC transport of the subcloud API: conversions around SubcloudService."""

from __future__ import annotations

from datetime import UTC
from typing import Any
from uuid import UUID

from resultity.cloud.v1 import subcloud_service_pb2 as pb
from resultity.cloud.v1 import subcloud_service_pb2_grpc as pb_grpc

from core.convert.catalog import price_from_pb, price_to_pb
from core.convert.requirements import requirements_fields, requirements_from_pb
from core.errors import InvalidArgument
from core.grpc_errors import translate_errors
from core.ids import parse_id
from server.cloud.subcloud_service import SubcloudService
from server.cloud.subclouds import (
    Subcloud,
    SubcloudMember,
    SubcloudModel,
    SubcloudRole,
)
from server.common.inference_logging_proto import logging_from_pb, logging_to_pb
from server.common.transport import Context, authorization, timestamp_to_pb

_ROLE_TO_PB = {
    SubcloudRole.MEMBER: pb.SUBCLOUD_ROLE_MEMBER,
    SubcloudRole.ADMIN: pb.SUBCLOUD_ROLE_ADMIN,
    SubcloudRole.OWNER: pb.SUBCLOUD_ROLE_OWNER,
}
_ROLE_FROM_PB = {value: key for key, value in _ROLE_TO_PB.items()}
_UPDATABLE = frozenset({"name", "rules", "models", "inference_logging"})


def models_from_pb(models: Any) -> list[SubcloudModel]:
    return [
        SubcloudModel(offer.model, price_from_pb(offer.price) if offer.HasField("price") else None)
        for offer in models
    ]


def subcloud_to_pb(subcloud: Subcloud) -> pb.Subcloud:
    return pb.Subcloud(
        subcloud_id=str(subcloud.subcloud_id),
        name=subcloud.name,
        owner_account_id=str(subcloud.owner_account_id),
        created=timestamp_to_pb(subcloud.created),
        rules=pb.NodeRules(**requirements_fields(subcloud.rules)),
        models=[
            pb.SubcloudModel(
                model=offer.model,
                price=None if offer.price is None else price_to_pb(offer.price),
            )
            for offer in subcloud.models
        ],
        archived=None if subcloud.archived is None else timestamp_to_pb(subcloud.archived),
        inference_logging=logging_to_pb(subcloud.inference_logging),
    )


def member_to_pb(member: SubcloudMember) -> pb.SubcloudMember:
    return pb.SubcloudMember(
        account_id=str(member.account_id),
        role=_ROLE_TO_PB[member.role],
        added=timestamp_to_pb(member.added),
    )


def _optional_id(value: str, field: str) -> UUID | None:
    return parse_id(value, field=field) if value else None


class SubcloudServicer(pb_grpc.SubcloudServiceServicer):
    def __init__(self, service: SubcloudService) -> None:
        self._service = service

    @translate_errors
    async def CreateSubcloud(
        self, request: pb.CreateSubcloudRequest, context: Context
    ) -> pb.CreateSubcloudResponse:
        actor = await self._service.actor(authorization(context))
        subcloud = await self._service.create(
            actor,
            request.name,
            _optional_id(request.owner_account_id, "owner_account_id"),
            requirements_from_pb(request.rules, field="rules"),
            models_from_pb(request.models),
            logging_from_pb(request.inference_logging),
        )
        return pb.CreateSubcloudResponse(subcloud=subcloud_to_pb(subcloud))

    @translate_errors
    async def GetSubcloud(
        self, request: pb.GetSubcloudRequest, context: Context
    ) -> pb.GetSubcloudResponse:
        actor = await self._service.actor(authorization(context))
        subcloud = await self._service.get(
            actor, parse_id(request.subcloud_id, field="subcloud_id")
        )
        return pb.GetSubcloudResponse(subcloud=subcloud_to_pb(subcloud))

    @translate_errors
    async def ListSubclouds(
        self, request: pb.ListSubcloudsRequest, context: Context
    ) -> pb.ListSubcloudsResponse:
        actor = await self._service.actor(authorization(context))
        subclouds, next_token = await self._service.list_page(
            actor, request.page_size, request.page_token
        )
        return pb.ListSubcloudsResponse(
            subclouds=[subcloud_to_pb(subcloud) for subcloud in subclouds],
            next_page_token=next_token,
        )

    @translate_errors
    async def UpdateSubcloud(
        self, request: pb.UpdateSubcloudRequest, context: Context
    ) -> pb.UpdateSubcloudResponse:
        actor = await self._service.actor(authorization(context))
        paths = set(request.update_mask.paths)
        if not paths or not paths <= _UPDATABLE:
            raise InvalidArgument(
                "update_mask must name some of: " + ", ".join(sorted(_UPDATABLE)),
                field="update_mask",
            )
        given = request.subcloud
        subcloud = await self._service.update(
            actor,
            parse_id(given.subcloud_id, field="subcloud.subcloud_id"),
            name=given.name if "name" in paths else None,
            rules=requirements_from_pb(given.rules, field="subcloud.rules")
            if "rules" in paths
            else None,
            models=models_from_pb(given.models) if "models" in paths else None,
            inference_logging=(
                logging_from_pb(given.inference_logging) if "inference_logging" in paths else None
            ),
        )
        return pb.UpdateSubcloudResponse(subcloud=subcloud_to_pb(subcloud))

    @translate_errors
    async def ArchiveSubcloud(
        self, request: pb.ArchiveSubcloudRequest, context: Context
    ) -> pb.ArchiveSubcloudResponse:
        actor = await self._service.actor(authorization(context))
        subcloud = await self._service.archive(
            actor, parse_id(request.subcloud_id, field="subcloud_id")
        )
        return pb.ArchiveSubcloudResponse(subcloud=subcloud_to_pb(subcloud))

    @translate_errors
    async def PutSubcloudMember(
        self, request: pb.PutSubcloudMemberRequest, context: Context
    ) -> pb.PutSubcloudMemberResponse:
        actor = await self._service.actor(authorization(context))
        role = (
            SubcloudRole.MEMBER
            if request.role == pb.SUBCLOUD_ROLE_UNSPECIFIED
            else _ROLE_FROM_PB.get(request.role)
        )
        if role is None:
            raise InvalidArgument("role is not a known role", field="role")
        member = await self._service.put_member(
            actor,
            parse_id(request.subcloud_id, field="subcloud_id"),
            parse_id(request.account_id, field="account_id"),
            role,
        )
        return pb.PutSubcloudMemberResponse(member=member_to_pb(member))

    @translate_errors
    async def RemoveSubcloudMember(
        self, request: pb.RemoveSubcloudMemberRequest, context: Context
    ) -> pb.RemoveSubcloudMemberResponse:
        actor = await self._service.actor(authorization(context))
        await self._service.remove_member(
            actor,
            parse_id(request.subcloud_id, field="subcloud_id"),
            parse_id(request.account_id, field="account_id"),
        )
        return pb.RemoveSubcloudMemberResponse()

    @translate_errors
    async def ListSubcloudMembers(
        self, request: pb.ListSubcloudMembersRequest, context: Context
    ) -> pb.ListSubcloudMembersResponse:
        actor = await self._service.actor(authorization(context))
        members = await self._service.members(
            actor, parse_id(request.subcloud_id, field="subcloud_id")
        )
        return pb.ListSubcloudMembersResponse(members=[member_to_pb(m) for m in members])

    @translate_errors
    async def CreateSubcloudApiKey(
        self, request: pb.CreateSubcloudApiKeyRequest, context: Context
    ) -> pb.CreateSubcloudApiKeyResponse:
        actor = await self._service.actor(authorization(context))
        issued = await self._service.issue_key(
            actor,
            parse_id(request.subcloud_id, field="subcloud_id"),
            holder=_optional_id(request.account_id, "account_id"),
            name=request.name,
            expires=request.expires.ToDatetime(tzinfo=UTC) if request.HasField("expires") else None,
            allowed_models=tuple(request.allowed_models),
        )
        return pb.CreateSubcloudApiKeyResponse(
            api_key_id=issued.api_key_id,
            account_id=issued.account_id,
            prefix=issued.prefix,
            secret=issued.secret,
        )
