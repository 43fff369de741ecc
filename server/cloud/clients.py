"""gRPC adapters for the cloud layer's ports."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from server.cloud.ports import Caller, HoldRef, OperatorLine
from server.common.grpc_errors import domain_error_from_rpc
from server.common.inference import (
    CatalogModel,
    GenerationSpec,
    JobAssigned,
    JobDelta,
    JobEvent,
    JobFinished,
    JobMigrated,
    NodeUsage,
)
from server.common.inference_proto import (
    finish_reason_from_pb,
    logprobs_from_pb,
    price_from_pb,
    spec_to_pb,
    usage_from_pb,
)


class GrpcAccountClient:
    def __init__(self, channel: grpc.aio.Channel, service_token: str) -> None:
        self._keys = keys_grpc.ApiKeyServiceStub(channel)
        self._ledger = ledger_grpc.LedgerServiceStub(channel)
        # Holds are the platform's business: the cloud calls the ledger as the service.
        self._metadata = (("authorization", f"Bearer {service_token}"),)

    async def authenticate(self, secret: str) -> Caller:
        try:
            response = await self._keys.AuthenticateApiKey(
                keys_pb.AuthenticateApiKeyRequest(secret=secret)
            )
        except grpc.aio.AioRpcError as error:
            raise domain_error_from_rpc(error) from None
        key = response.api_key
        return Caller(
            key.account_id,
            key.api_key_id,
            may_infer=keys_pb.API_KEY_SCOPE_INFERENCE in key.scopes,
            allowed_models=frozenset(key.allowed_models),
        )

    async def create_hold(
        self, account_id: str, amount: int, *, idempotency_key: str, expires: datetime
    ) -> HoldRef:
        expires_pb = timestamp_pb2.Timestamp()
        expires_pb.FromDatetime(expires)
        try:
            response = await self._ledger.CreateHold(
                ledger_pb.CreateHoldRequest(
                    account_id=account_id,
                    amount_micro_credits=amount,
                    idempotency_key=idempotency_key,
                    expires=expires_pb,
                ),
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise domain_error_from_rpc(error) from None
        return HoldRef(response.hold.hold_id, response.hold.amount_micro_credits)

    async def settle_hold(
        self, hold_id: str, capture: int, lines: Sequence[OperatorLine] = ()
    ) -> int:
        try:
            response = await self._ledger.SettleHold(
                ledger_pb.SettleHoldRequest(
                    hold_id=hold_id,
                    capture_micro_credits=capture,
                    lines=[
                        ledger_pb.SettlementLine(
                            operator_account_id=line.operator_account_id,
                            node_id=line.node_id,
                            model=line.model,
                            tokens=line.tokens,
                        )
                        for line in lines
                    ],
                ),
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise domain_error_from_rpc(error) from None
        return response.hold.captured_micro_credits


class GrpcNetworkClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._dispatch = dispatch_grpc.DispatchServiceStub(channel)

    async def list_models(self) -> list[CatalogModel]:
        try:
            response = await self._dispatch.ListModels(dispatch_pb.ListModelsRequest())
        except grpc.aio.AioRpcError as error:
            raise domain_error_from_rpc(error) from None
        return [
            CatalogModel(
                id=model.id,
                owned_by=model.owned_by,
                price=price_from_pb(model.price),
                context_length=model.context_length,
                chat_template_overhead_tokens=model.chat_template_overhead_tokens,
                ready_nodes=model.ready_nodes,
            )
            for model in response.models
        ]

    async def run_job(self, job_id: str, spec: GenerationSpec) -> AsyncGenerator[JobEvent, None]:
        call = self._dispatch.RunJob(
            dispatch_pb.RunJobRequest(job_id=job_id, spec=spec_to_pb(spec))
        )
        try:
            async for response in call:
                kind = response.WhichOneof("event")
                if kind == "assigned":
                    yield JobAssigned(response.assigned.node_id)
                elif kind == "delta":
                    delta = response.delta
                    yield JobDelta(
                        delta.text,
                        delta.token_count,
                        delta.prompt_tokens,
                        logprobs_from_pb(delta.logprobs),
                        tuple(delta.embedding),
                    )
                elif kind == "migrated":
                    migrated = response.migrated
                    yield JobMigrated(migrated.node_id, migrated.epoch, migrated.reason)
                elif kind == "finished":
                    finished = response.finished
                    yield JobFinished(
                        finish_reason_from_pb(finished.finish_reason),
                        usage_from_pb(finished.usage),
                        tuple(
                            NodeUsage(
                                share.node_id,
                                usage_from_pb(share.usage),
                                share.operator_account_id,
                            )
                            for share in finished.node_usage
                        ),
                    )
        except grpc.aio.AioRpcError as error:
            raise domain_error_from_rpc(error) from None
        finally:
            # Leaving early (our caller went away) cancels the job upstream.
            call.cancel()
