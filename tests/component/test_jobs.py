"""The jobs API and inference logs over real gRPC and PostgreSQL: an account reads its
own jobs (model, nodes, tokens, cost, timings, outcome) and nobody else's, admins read
all, filtered and paged; full request logs are kept only for accounts (and subclouds)
that opted in, and deleted once their retention ends."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.cloud.v1 import job_service_pb2 as jobs_pb
from resultity.cloud.v1 import job_service_pb2_grpc as jobs_grpc
from resultity.cloud.v1 import subcloud_service_pb2 as sc_pb
from resultity.cloud.v1 import subcloud_service_pb2_grpc as sc_grpc
from resultity.common.v1 import inference_logging_pb2 as logging_pb
from resultity.common.v1 import inference_pb2 as common_pb

from core.grpc_errors import error_info
from server.cloud.inference_log_store import PostgresInferenceLogStore
from server.cloud.inference_logs import LogSweeper
from server.common.database import create_pool
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import DEFAULT_SCRIPT, MODEL_ID, ScriptedRuntime
from tests.harness import Platform, running_platform, until

Metadata = tuple[tuple[str, str], ...]
MANAGEMENT = keys_pb.API_KEY_SCOPE_MANAGEMENT


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        await running.start_agent(ScriptedRuntime())
        yield running


def _jobs(platform: Platform) -> jobs_grpc.JobServiceStub:
    return jobs_grpc.JobServiceStub(platform.channel)


async def _chat(
    platform: Platform, metadata: Metadata, request_id: str
) -> pb.CreateChatCompletionResponse:
    return await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(
            params=pb.ChatCompletionParams(
                model=MODEL_ID,
                messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
            )
        ),
        metadata=(*metadata, ("x-request-id", request_id)),
    )


async def _refusal(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    info = error_info(refused.value)
    return refused.value.code(), "" if info is None else info.reason


async def _finished_jobs(platform: Platform, metadata: Metadata, count: int) -> list[jobs_pb.Job]:
    listed = await until(
        lambda: _jobs(platform).ListJobs(jobs_pb.ListJobsRequest(), metadata=metadata),
        lambda page: (
            len(page.jobs) == count
            and all(job.outcome == jobs_pb.JOB_OUTCOME_FINISHED for job in page.jobs)
        ),
    )
    return list(listed.jobs)


async def test_an_account_reads_its_own_jobs_priced_timed_and_with_their_nodes(
    platform: Platform,
) -> None:
    ada, bob = await platform.customer(1_000_000), await platform.customer(1_000_000)
    ada_key = await platform.key(ada.account_id, MANAGEMENT)
    answers = [await _chat(platform, ada.metadata, f"ada-{i}") for i in (1, 2)]
    await _chat(platform, bob.metadata, "bob-1")

    jobs = await _finished_jobs(platform, ada_key, 2)
    # Newest first.
    assert [job.request_id for job in jobs] == ["ada-2", "ada-1"]
    [node] = platform.network.service.nodes()
    for job, answer in zip(jobs, reversed(answers), strict=True):
        assert (job.account_id, job.subcloud_id, job.model) == (ada.account_id, "", MODEL_ID)
        assert [(n.node_id, n.epoch, n.operator_account_id) for n in job.nodes] == [
            (node.node_id, 1, node.operator_account_id)
        ]
        assert job.usage == answer.usage
        # One job per request here: the job's cost is what the ledger charged.
        assert job.cost_micro_credits == answer.billing.charged_micro_credits > 0
        assert job.price.prompt_micro_credits_per_token == SMOLLM2_135M.price.prompt
        assert (job.outcome, job.detail) == (jobs_pb.JOB_OUTCOME_FINISHED, "stop")
        created, first, finished = (
            stamp.ToDatetime() for stamp in (job.created, job.first_token, job.finished)
        )
        assert job.nodes[0].assigned.ToDatetime() == created <= first <= finished

    got = await _jobs(platform).GetJob(
        jobs_pb.GetJobRequest(job_id=jobs[0].job_id), metadata=ada_key
    )
    assert got.job == jobs[0]
    assert not got.HasField("log")

    # Bob's job is not Ada's to see, nor is his account's listing.
    bob_key = await platform.key(bob.account_id, MANAGEMENT)
    [bob_job] = await _finished_jobs(platform, bob_key, 1)
    assert await _refusal(
        _jobs(platform).GetJob(jobs_pb.GetJobRequest(job_id=bob_job.job_id), metadata=ada_key)
    ) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    assert await _refusal(
        _jobs(platform).ListJobs(
            jobs_pb.ListJobsRequest(account_id=bob.account_id), metadata=ada_key
        )
    ) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    # An inference key reads no jobs, not even its own account's.
    assert await _refusal(
        _jobs(platform).ListJobs(jobs_pb.ListJobsRequest(), metadata=ada.metadata)
    ) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


async def test_admins_filter_and_page_every_accounts_jobs(platform: Platform) -> None:
    ada, bob = await platform.customer(1_000_000), await platform.customer(1_000_000)
    admin = await platform.key(bob.account_id, keys_pb.API_KEY_SCOPE_ADMIN)
    before = datetime.now(UTC)
    for request_id in ("ada-1", "ada-2", "ada-3"):
        await _chat(platform, ada.metadata, request_id)
    await _chat(platform, bob.metadata, "bob-1")
    stub = _jobs(platform)

    async def listed(**fields: object) -> list[str]:
        response = await stub.ListJobs(jobs_pb.ListJobsRequest(**fields), metadata=admin)  # type: ignore[arg-type]
        return [job.request_id for job in response.jobs]

    mine = {"account_id": ada.account_id}
    await until(
        lambda: listed(**mine, outcomes=[jobs_pb.JOB_OUTCOME_FINISHED]), lambda r: len(r) == 3
    )
    assert await listed(**mine) == ["ada-3", "ada-2", "ada-1"]
    assert await listed(account_id=bob.account_id) == ["bob-1"]
    assert await listed(request_id="ada-2") == ["ada-2"]
    assert await listed(**mine, model=MODEL_ID) == ["ada-3", "ada-2", "ada-1"]
    assert await listed(**mine, model="another-model") == []
    assert await listed(**mine, outcomes=[jobs_pb.JOB_OUTCOME_RUNNING]) == []
    assert await listed(**mine, created_after=_stamp(before)) == ["ada-3", "ada-2", "ada-1"]
    assert await listed(**mine, created_before=_stamp(before)) == []

    pages, token = [], ""
    while True:
        page = await stub.ListJobs(
            jobs_pb.ListJobsRequest(**mine, page_size=2, page_token=token), metadata=admin
        )
        pages.append([job.request_id for job in page.jobs])
        token = page.next_page_token
        if not token:
            break
    assert pages == [["ada-3", "ada-2"], ["ada-1"]]

    for bad in (
        jobs_pb.ListJobsRequest(account_id="not-a-uuid"),
        jobs_pb.ListJobsRequest(page_token="garbage"),
        jobs_pb.ListJobsRequest(page_size=-1),
        jobs_pb.ListJobsRequest(created_after=_stamp(before), created_before=_stamp(before)),
        jobs_pb.ListJobsRequest(outcomes=[99]),  # type: ignore[list-item]
        jobs_pb.ListJobsRequest(created_after=Timestamp(seconds=10**12)),
        # A forged cursor whose job id could not be stored.
        jobs_pb.ListJobsRequest(
            page_token=base64.urlsafe_b64encode(b"2026-01-01T00:00:00|\x00").decode()
        ),
    ):
        assert await _refusal(stub.ListJobs(bad, metadata=admin)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ), bad


async def test_inference_logs_are_kept_only_with_consent_and_deleted_after_retention(
    platform: Platform, postgres_dsn: str
) -> None:
    ada, bob = await platform.customer(1_000_000), await platform.customer(1_000_000)
    ada_key = await platform.key(ada.account_id, MANAGEMENT)
    # Ada opts in, with her own management key, before her keys are first used.
    opted = await account_grpc.AccountServiceStub(platform.channel).SetAccountInferenceLogging(
        account_pb.SetAccountInferenceLoggingRequest(
            account_id=ada.account_id,
            inference_logging=logging_pb.InferenceLogging(enabled=True, retention_days=3),
        ),
        metadata=ada_key,
    )
    assert opted.account.inference_logging == logging_pb.InferenceLogging(
        enabled=True, retention_days=3
    )
    # Logs are written in order: once Ada's is in, Bob's would have been too.
    await _chat(platform, bob.metadata, "bob-unlogged")
    await _chat(platform, ada.metadata, "ada-logged")
    [ada_job] = await _finished_jobs(platform, ada_key, 1)
    logged = await _log(platform, ada_job.job_id, ada_key)
    assert logged.job_ids == [ada_job.job_id]
    assert logged.expires.ToDatetime() - logged.created.ToDatetime() == timedelta(days=3)
    request, response = dict(logged.request), dict(logged.response)
    assert (request["endpoint"], request["model"]) == ("chat.completions", MODEL_ID)
    [message] = request["messages"]
    assert (message["role"], message["content"]) == ("user", "hi")
    assert response["status"] == "completed"
    assert dict(response["choices"][0])["text"] == DEFAULT_SCRIPT

    admin = await platform.key(ada.account_id, keys_pb.API_KEY_SCOPE_ADMIN)
    [bob_job] = await _finished_jobs(platform, await platform.key(bob.account_id, MANAGEMENT), 1)
    assert not (await _get(platform, bob_job.job_id, admin)).HasField("log")

    # A subcloud's keys are logged only once the subcloud opts in too.
    subclouds = sc_grpc.SubcloudServiceStub(platform.channel)
    subcloud = (
        await subclouds.CreateSubcloud(
            sc_pb.CreateSubcloudRequest(
                name="research", models=[sc_pb.SubcloudModel(model=MODEL_ID)]
            ),
            metadata=ada_key,
        )
    ).subcloud
    bound = await subclouds.CreateSubcloudApiKey(
        sc_pb.CreateSubcloudApiKeyRequest(subcloud_id=subcloud.subcloud_id, name="bound"),
        metadata=ada_key,
    )
    bound_key = (("authorization", f"Bearer {bound.secret}"),)
    await _chat(platform, bound_key, "in-subcloud-unlogged")
    await subclouds.UpdateSubcloud(
        sc_pb.UpdateSubcloudRequest(
            subcloud=sc_pb.Subcloud(
                subcloud_id=subcloud.subcloud_id,
                inference_logging=logging_pb.InferenceLogging(enabled=True, retention_days=1),
            ),
            update_mask=FieldMask(paths=["inference_logging"]),
        ),
        metadata=ada_key,
    )
    await _chat(platform, bound_key, "in-subcloud-logged")
    by_request = {job.request_id: job for job in await _finished_jobs(platform, ada_key, 3)}
    in_subcloud = by_request["in-subcloud-logged"]
    assert in_subcloud.subcloud_id == subcloud.subcloud_id
    sub_log = await _log(platform, in_subcloud.job_id, ada_key)
    # The shorter retention of the two.
    assert sub_log.expires.ToDatetime() - sub_log.created.ToDatetime() == timedelta(days=1)
    unlogged = by_request["in-subcloud-unlogged"]
    assert not (await _get(platform, unlogged.job_id, ada_key)).HasField("log")

    # The sweeper deletes each log once its retention has ended.
    pool = await create_pool(postgres_dsn, max_size=1)
    try:
        store = PostgresInferenceLogStore(pool)
        now = datetime.now(UTC)
        await LogSweeper(store, clock=lambda: now + timedelta(days=2)).sweep()
        assert not (await _get(platform, in_subcloud.job_id, ada_key)).HasField("log")
        assert (await _get(platform, ada_job.job_id, ada_key)).HasField("log")
        await LogSweeper(store, clock=lambda: now + timedelta(days=4)).sweep()
        assert await store.for_job(ada_job.job_id) is None
    finally:
        await pool.close()


async def _get(platform: Platform, job_id: str, metadata: Metadata) -> jobs_pb.GetJobResponse:
    return await _jobs(platform).GetJob(
        jobs_pb.GetJobRequest(job_id=job_id, with_log=True), metadata=metadata
    )


async def _log(platform: Platform, job_id: str, metadata: Metadata) -> jobs_pb.InferenceLog:
    found = await until(lambda: _get(platform, job_id, metadata), lambda r: r.HasField("log"))
    return found.log


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp
