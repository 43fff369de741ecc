"""Pydantic models of the jobs API's JSON (GET /v1/jobs, GET /v1/jobs/{job_id}): the
jobs that ran an account's requests, in the shape of OpenAI's list objects."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

JobStatus = Literal["running", "finished", "failed", "cancelled"]


class JobNode(BaseModel):
    node_id: str
    # The assignment's fencing epoch: 1 for the first node, then one per move.
    epoch: int
    operator_account_id: str | None
    # Unix seconds.
    assigned_at: int


class JobUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class JobPrice(BaseModel):
    prompt_micro_credits_per_token: int
    completion_micro_credits_per_token: int


class InferenceLog(BaseModel):
    """The request the job served and its answer, kept for accounts that opted in."""

    request: dict[str, Any]
    response: dict[str, Any]
    job_ids: list[str]
    created_at: int
    expires_at: int


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    # The x-request-id of the request the job served.
    request_id: str
    account_id: str
    subcloud_id: str | None
    model: str
    nodes: list[JobNode]
    usage: JobUsage
    price: JobPrice
    cost_micro_credits: int
    status: JobStatus
    # A finished job's finish reason; why a failed or cancelled one ended.
    detail: str | None
    # Unix seconds; null until it happens.
    created_at: int
    finished_at: int | None
    # Milliseconds from the job's start to its first token and to its end.
    time_to_first_token_ms: float | None
    duration_ms: float | None
    # Only with ?with_log=true, when the request was logged.
    log: InferenceLog | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    # Pass as page_token for the next page; null on the last.
    next_page_token: str | None
