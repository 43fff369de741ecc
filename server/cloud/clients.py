"""gRPC adapters for the cloud layer's ports."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import datetime
from typing import TypeVar
from uuid import UUID

import grpc
from google.protobuf import timestamp_pb2
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from core.batch_calls import MAX_ITEMS
from core.convert.catalog import models_from_pb
from core.convert.job_events import job_events_from_pb, run_job_request_to_pb
from core.convert.job_records import query_to_pb, record_from_pb
from core.convert.requirements import requirements_to_pb
from core.grpc_errors import Failure, domain_errors
from core.inference import (
    NO_ORIGIN,
    CatalogModel,
    GenerationSpec,
    JobEvent,
    JobOrigin,
    NodeRequirements,
)
from core.job_records import JobQuery, JobRecord
from core.metadata import bearer_metadata
from core.replica_channels import ReplicaChannels
from server.cloud.job_streams import JobLink, pool_size
from server.cloud.ports import (
    NO_REQUIREMENTS,
    Caller,
    HoldRef,
    IssuedKey,
    OperatorShares,
    RelayedJob,
)
from server.common.batcher import Batcher
from server.common.inference_logging_proto import logging_from_pb
from server.common.rate_limits_proto import rate_limits_from_pb
from server.common.settlement_proto import settlement_to_pb
from server.common.settlements import LedgerUnavailable, Settlement

R = TypeVar("R")

# A settlement the account layer has not answered within this goes to the queue (it
# may have been applied meanwhile: applying it again is a replay).
SETTLE_TIMEOUT_S = 10.0
# The account layer is down, slow, or failed inside (its transaction rolled back):
# the settlement may be sent again.
_LEDGER_UNAVAILABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
)


class GrpcAccountClient:
    """The account service's replicas: reads and keyed writes (holds, settlements) go on
    to the next replica when one is unreachable; a key is issued by one replica."""

    def __init__(self, replicas: ReplicaChannels, service_token: str) -> None:
        self._accounts = replicas.stubs(account_grpc.AccountServiceStub)
        self._keys = replicas.stubs(keys_grpc.ApiKeyServiceStub)
        self._ledger = replicas.stubs(ledger_grpc.LedgerServiceStub)
        # Holds are the platform's business: the cloud calls the ledger as the service.
        self._metadata = bearer_metadata(service_token)
        # Holds (and settlements) asked for together travel in one call; a lone one
        # in its unary call. Two for one key (a retry) never share a call.
        self._holds: Batcher[ledger_pb.CreateHoldRequest, HoldRef] = Batcher(
            self._create_hold,
            self._create_holds,
            key=lambda request: request.idempotency_key,
            max_size=MAX_ITEMS,
        )
        self._settlements: Batcher[ledger_pb.SettleHoldRequest, int] = Batcher(
            self._settle_hold,
            self._settle_holds,
            key=lambda request: request.hold_id,
            max_size=MAX_ITEMS,
        )

    async def authenticate(self, secret: str) -> Caller:
        request = keys_pb.AuthenticateApiKeyRequest(secret=secret)
        with domain_errors():
            response = await self._keys.call(
                lambda keys: keys.AuthenticateApiKey(request, metadata=self._metadata)
            )
        key = response.api_key
        return Caller(
            key.account_id,
            key.api_key_id,
            may_infer=keys_pb.API_KEY_SCOPE_INFERENCE in key.scopes,
            allowed_models=frozenset(key.allowed_models),
            may_manage=keys_pb.API_KEY_SCOPE_MANAGEMENT in key.scopes,
            admin=keys_pb.API_KEY_SCOPE_ADMIN in key.scopes,
            subcloud_id=key.subcloud_id,
            key_limits=rate_limits_from_pb(key.rate_limits),
            account_limits=rate_limits_from_pb(response.account_rate_limits),
            inference_logging=logging_from_pb(response.account_inference_logging),
        )

    async def require_account(self, account_id: UUID) -> None:
        request = account_pb.GetAccountRequest(account_id=str(account_id))
        with domain_errors():
            await self._accounts.call(
                lambda accounts: accounts.GetAccount(request, metadata=self._metadata)
            )

    async def issue_api_key(
        self,
        account_id: UUID,
        *,
        name: str,
        expires: datetime | None,
        allowed_models: tuple[str, ...],
        subcloud_id: str,
    ) -> IssuedKey:
        request = keys_pb.CreateApiKeyRequest(
            account_id=str(account_id),
            name=name,
            scopes=[keys_pb.API_KEY_SCOPE_INFERENCE],
            allowed_models=allowed_models,
            subcloud_id=subcloud_id,
        )
        if expires is not None:
            request.expires.FromDatetime(expires)
        with domain_errors():
            # Not sent again: a second replica would issue a second key.
            response = await self._keys.call(
                lambda keys: keys.CreateApiKey(request, metadata=self._metadata), again=False
            )
        key = response.api_key
        return IssuedKey(key.api_key_id, key.account_id, key.prefix, response.secret)

    async def create_hold(
        self, account_id: str, amount: int, *, idempotency_key: str, expires: datetime
    ) -> HoldRef:
        expires_pb = timestamp_pb2.Timestamp()
        expires_pb.FromDatetime(expires)
        return await self._holds.submit(
            ledger_pb.CreateHoldRequest(
                account_id=account_id,
                amount_micro_credits=amount,
                idempotency_key=idempotency_key,
                expires=expires_pb,
            )
        )

    async def settle_hold(self, hold_id: str, capture: int, shares: OperatorShares) -> int:
        return await self._settlements.submit(
            settlement_to_pb(Settlement(hold_id, capture, shares))
        )

    async def _create_hold(self, request: ledger_pb.CreateHoldRequest) -> HoldRef:
        with domain_errors():
            response = await self._ledger.call(
                lambda ledger: ledger.CreateHold(request, metadata=self._metadata)
            )
        return _hold_ref(response)

    async def _create_holds(
        self, requests: Sequence[ledger_pb.CreateHoldRequest]
    ) -> list[HoldRef | BaseException | None]:
        batch = ledger_pb.CreateHoldsRequest(items=requests)
        try:
            response = await self._ledger.call(
                lambda ledger: ledger.CreateHolds(batch, metadata=self._metadata)
            )
        except grpc.aio.AioRpcError as error:
            return _batch_failed(error, len(requests), Failure.domain_error)
        return [
            _hold_ref(result.response)
            if result.HasField("response")
            else Failure.of_status(result.error).domain_error()
            for result in response.results
        ]

    async def _settle_hold(self, request: ledger_pb.SettleHoldRequest) -> int:
        try:
            response = await self._ledger.call(
                lambda ledger: ledger.SettleHold(
                    request, metadata=self._metadata, timeout=SETTLE_TIMEOUT_S
                )
            )
        except grpc.aio.AioRpcError as error:
            raise _settle_error(Failure.of_rpc(error)) from None
        return response.hold.captured_micro_credits

    async def _settle_holds(
        self, requests: Sequence[ledger_pb.SettleHoldRequest]
    ) -> list[int | BaseException | None]:
        batch = ledger_pb.SettleHoldsRequest(items=requests)
        try:
            response = await self._ledger.call(
                lambda ledger: ledger.SettleHolds(
                    batch, metadata=self._metadata, timeout=SETTLE_TIMEOUT_S
                )
            )
        except grpc.aio.AioRpcError as error:
            return _batch_failed(error, len(requests), _settle_error)
        return [
            result.response.hold.captured_micro_credits
            if result.HasField("response")
            else _settle_error(Failure.of_status(result.error))
            for result in response.results
        ]


def _hold_ref(response: ledger_pb.CreateHoldResponse) -> HoldRef:
    return HoldRef(response.hold.hold_id, response.hold.amount_micro_credits)


def _settle_error(failure: Failure) -> Exception:
    # The status first: a settlement the ledger did not answer is sent again, not refused.
    if failure.code in _LEDGER_UNAVAILABLE:
        return LedgerUnavailable(failure.describe())
    return failure.domain_error()


def _batch_failed(
    error: grpc.aio.AioRpcError, count: int, error_of: Callable[[Failure], Exception]
) -> list[R | BaseException | None]:
    """Each item's outcome when the batch call itself failed: the error its unary call
    would have raised (one per caller), or None, to send it alone, from a replica that
    does not know the batch call (one not yet upgraded)."""
    if error.code() == grpc.StatusCode.UNIMPLEMENTED:
        return [None] * count
    failure = Failure.of_rpc(error)
    return [error_of(failure) for _ in range(count)]


class GrpcNetworkClient:
    """The network's replicas, each routing over the whole fleet: a call goes on to the
    next replica when one is unreachable (a job only before its first event). Jobs
    travel on a few streams per replica (job_streams.py)."""

    def __init__(self, replicas: ReplicaChannels, service_token: str) -> None:
        self._dispatch = replicas.stubs(dispatch_grpc.DispatchServiceStub)
        # The network's dispatch API serves only the platform's own services.
        self._metadata = bearer_metadata(service_token)
        self._links: list[JobLink] = []
        self._jobs = replicas.targeted_stubs(self._link)

    def _link(self, channel: grpc.aio.Channel, target: str) -> JobLink:
        link = JobLink(
            dispatch_grpc.DispatchServiceStub(channel), self._metadata, pool_size(target)
        )
        self._links.append(link)
        return link

    async def close(self) -> None:
        """Closes the job streams (before the replicas' channels)."""
        for link in self._links:
            await link.close()

    async def list_models(
        self, requirements: NodeRequirements = NO_REQUIREMENTS
    ) -> list[CatalogModel]:
        request = dispatch_pb.ListModelsRequest(requirements=requirements_to_pb(requirements))
        with domain_errors():
            response = await self._dispatch.call(
                lambda dispatch: dispatch.ListModels(request, metadata=self._metadata)
            )
        return models_from_pb(response)

    async def job_records(self, job_ids: Sequence[str]) -> list[RelayedJob]:
        return [RelayedJob.of(record) for record in await self._records(job_ids)]

    async def job_record(self, job_id: str) -> JobRecord | None:
        found = await self._records([job_id])
        return found[0] if found else None

    async def list_job_records(
        self, query: JobQuery, page_size: int, page_token: str
    ) -> tuple[list[JobRecord], str]:
        request = dispatch_pb.ListJobRecordsRequest(
            filter=query_to_pb(query), page_size=page_size, page_token=page_token
        )
        with domain_errors():
            response = await self._dispatch.call(
                lambda dispatch: dispatch.ListJobRecords(request, metadata=self._metadata)
            )
        return [record_from_pb(r) for r in response.records], response.next_page_token

    async def _records(self, job_ids: Sequence[str]) -> list[JobRecord]:
        request = dispatch_pb.GetJobRecordsRequest(job_ids=job_ids)
        with domain_errors():
            response = await self._dispatch.call(
                lambda dispatch: dispatch.GetJobRecords(request, metadata=self._metadata)
            )
        return [record_from_pb(record) for record in response.records]

    async def run_job(
        self,
        job_id: str,
        spec: GenerationSpec,
        requirements: NodeRequirements = NO_REQUIREMENTS,
        origin: JobOrigin = NO_ORIGIN,
    ) -> AsyncGenerator[list[JobEvent], None]:
        request = run_job_request_to_pb(job_id, spec, requirements, origin, batch_events=True)
        # A replica that never answered ran nothing the caller saw: the next one
        # takes the job, under the same id (so that its record is the job's). On
        # each, the job is a message of the replica's job stream (job_streams.py).
        responses = self._jobs.stream(lambda link: link.run(request))
        # Closing the responses (our caller went away) cancels the job upstream.
        async with contextlib.aclosing(responses):
            with domain_errors():
                async for response in responses:
                    events = job_events_from_pb(response)
                    if events:
                        yield events
