"""The console's calls to the platform: the account, network and cloud gRPC APIs, each
made with the signed-in user's own key, so the services' authorization decides what a
user sees (their account and its jobs; an operator their nodes; an admin everything)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TypedDict

import grpc
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import contribution_service_pb2 as contribution_pb
from resultity.account.v1 import contribution_service_pb2_grpc as contribution_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.account.v1 import usage_service_pb2 as usage_pb
from resultity.account.v1 import usage_service_pb2_grpc as usage_grpc
from resultity.cloud.v1 import job_service_pb2 as jobs_pb
from resultity.cloud.v1 import job_service_pb2_grpc as jobs_grpc
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from core.channels import Tls, channel
from core.metadata import Metadata, bearer_metadata
from core.replica_channels import ReplicaChannels

# A page waits this long for the platform, then shows what failed.
CALL_TIMEOUT_S = 10.0
RECENT_REQUESTS = 20
EARNING_EPOCHS = 14
# Running jobs the admin page lists (newest first).
LIVE_JOBS = 50


@dataclass(frozen=True, slots=True)
class ConsoleTargets:
    """Where the console finds the account, network and cloud services (HOST:PORT;
    cloud's replicas comma-separated, as the gateway's ``--cloud``)."""

    account: str
    network: str
    cloud: str


@dataclass(frozen=True, slots=True)
class ConsumerView:
    balance: ledger_pb.Balance
    history: usage_pb.GetUsageHistoryResponse
    # The account's latest jobs (one per choice, prompt or input of a request).
    recent: list[jobs_pb.Job]


@dataclass(frozen=True, slots=True)
class OperatorView:
    nodes: list[admin_pb.Node]
    earnings: list[contribution_pb.ContributionTotal]
    epoch_seconds: int
    payouts: list[ledger_pb.Payout]
    balance: ledger_pb.Balance


@dataclass(frozen=True, slots=True)
class AdminView:
    nodes: list[admin_pb.Node]
    summary: ledger_pb.GetLedgerSummaryResponse
    config_version: int
    acks: int
    # Jobs running now, on every account.
    live: list[jobs_pb.Job]


class Platform:
    """gRPC stubs over one channel per service (cloud's: one per replica, its reads
    going on to the next replica when one is unreachable); every call carries the
    user's key."""

    def __init__(self, targets: ConsoleTargets, tls: Tls) -> None:
        # One channel per distinct target (`resultity up` serves both on one).
        opened: dict[str, grpc.aio.Channel] = {}
        for target in (targets.account, targets.network):
            if target not in opened:
                opened[target] = channel(target, tls)
        self._channels = list(opened.values())
        self._cloud = ReplicaChannels(targets.cloud, tls)
        account, network = opened[targets.account], opened[targets.network]
        self._accounts = account_grpc.AccountServiceStub(account)
        self._keys = keys_grpc.ApiKeyServiceStub(account)
        self._ledger = ledger_grpc.LedgerServiceStub(account)
        self._usage = usage_grpc.UsageServiceStub(account)
        self._contributions = contribution_grpc.ContributionServiceStub(account)
        self._nodes = admin_grpc.NodeAdminServiceStub(network)
        self._jobs = self._cloud.stubs(jobs_grpc.JobServiceStub)

    async def close(self) -> None:
        for opened in self._channels:
            await opened.close(grace=None)
        await self._cloud.close()

    async def caller(self, key: str) -> account_pb.GetCallerResponse:
        return await self._accounts.GetCaller(account_pb.GetCallerRequest(), **_as(key))

    async def consumer(self, key: str, account_id: str, interval: int) -> ConsumerView:
        balance, history, recent = await asyncio.gather(
            self._balance(key, account_id),
            self._usage.GetUsageHistory(
                usage_pb.GetUsageHistoryRequest(
                    account_id=account_id,
                    interval=interval,  # type: ignore[arg-type]
                    intervals=24 if interval == usage_pb.USAGE_INTERVAL_HOUR else 30,
                ),
                **_as(key),
            ),
            self._jobs.call(
                lambda jobs: jobs.ListJobs(
                    jobs_pb.ListJobsRequest(account_id=account_id, page_size=RECENT_REQUESTS),
                    **_as(key),
                )
            ),
        )
        return ConsumerView(balance, history, list(recent.jobs))

    async def balance(self, key: str, account_id: str) -> ledger_pb.Balance:
        return await self._balance(key, account_id)

    async def keys(self, key: str, account_id: str) -> list[keys_pb.ApiKey]:
        response = await self._keys.ListApiKeys(
            keys_pb.ListApiKeysRequest(account_id=account_id, page_size=100), **_as(key)
        )
        return list(response.api_keys)

    async def create_key(
        self, key: str, account_id: str, name: str, scopes: list[int]
    ) -> keys_pb.CreateApiKeyResponse:
        return await self._keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(
                account_id=account_id,
                name=name,
                scopes=scopes,  # type: ignore[arg-type]
            ),
            **_as(key),
        )

    async def revoke_key(self, key: str, api_key_id: str) -> None:
        await self._keys.RevokeApiKey(
            keys_pb.RevokeApiKeyRequest(api_key_id=api_key_id), **_as(key)
        )

    async def operator(self, key: str, account_id: str) -> OperatorView:
        nodes, earnings, policy, payouts, balance = await asyncio.gather(
            self._nodes.ListNodes(admin_pb.ListNodesRequest(), **_as(key)),
            self._contributions.GetOperatorEarnings(
                contribution_pb.GetOperatorEarningsRequest(
                    operator_account_id=account_id, epochs=EARNING_EPOCHS
                ),
                **_as(key),
            ),
            self._contributions.GetSettlementPolicy(
                contribution_pb.GetSettlementPolicyRequest(), **_as(key)
            ),
            self._ledger.ListPayouts(
                ledger_pb.ListPayoutsRequest(account_id=account_id), **_as(key)
            ),
            self._balance(key, account_id),
        )
        return OperatorView(
            list(nodes.nodes),
            list(earnings.epochs),
            policy.policy.epoch_seconds,
            list(payouts.payouts),
            balance,
        )

    async def request_payout(
        self, key: str, account_id: str, amount: int, idempotency_key: str
    ) -> ledger_pb.Payout:
        response = await self._ledger.RequestPayout(
            ledger_pb.RequestPayoutRequest(
                account_id=account_id,
                amount_micro_credits=amount,
                idempotency_key=idempotency_key,
            ),
            **_as(key),
        )
        return response.payout

    async def admin(self, key: str) -> AdminView:
        nodes, summary, config, acks, live = await asyncio.gather(
            self._nodes.ListNodes(admin_pb.ListNodesRequest(), **_as(key)),
            self._ledger.GetLedgerSummary(ledger_pb.GetLedgerSummaryRequest(), **_as(key)),
            self._nodes.GetNetworkConfig(admin_pb.GetNetworkConfigRequest(), **_as(key)),
            self._acks(key),
            self._jobs.call(
                lambda jobs: jobs.ListJobs(
                    jobs_pb.ListJobsRequest(
                        outcomes=[jobs_pb.JOB_OUTCOME_RUNNING], page_size=LIVE_JOBS
                    ),
                    **_as(key),
                )
            ),
        )
        return AdminView(list(nodes.nodes), summary, config.config.version, acks, list(live.jobs))

    async def _acks(self, key: str) -> int:
        """How many nodes acknowledged the current configuration version."""
        count, token = 0, ""
        while True:
            page = await self._nodes.ListConfigAcks(
                admin_pb.ListConfigAcksRequest(page_size=100, page_token=token), **_as(key)
            )
            count += len(page.acks)
            token = page.next_page_token
            if not token:
                return count

    async def _balance(self, key: str, account_id: str) -> ledger_pb.Balance:
        response = await self._ledger.GetBalance(
            ledger_pb.GetBalanceRequest(account_id=account_id), **_as(key)
        )
        return response.balance


class _CallOptions(TypedDict):
    metadata: Metadata
    timeout: float


def _as(key: str) -> _CallOptions:
    """The keyword arguments of a call made with ``key``."""
    return {"metadata": bearer_metadata(key), "timeout": CALL_TIMEOUT_S}
