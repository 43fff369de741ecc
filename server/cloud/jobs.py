"""The jobs API: the network's job records as an account sees them, priced, with the
log of the request a job served where one is kept.

A management key sees its own account's jobs; an admin key and the platform's
service token see every account's. A job someone else's is NOT_FOUND, as if it
did not exist.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from core.errors import InvalidArgument, NotFound, PermissionDenied
from core.ids import parse_id
from core.job_records import JobQuery, JobRecord
from server.cloud.auth import CachedAuthenticator
from server.cloud.inference_logs import InferenceLog
from server.cloud.ports import NetworkPort
from server.cloud.pricing import cost
from server.cloud.requests import MAX_MODEL_LENGTH
from server.common.credentials import bearer_credential, is_service_token

# Longer than any job or request id the platform makes.
MAX_ID_LENGTH = 256


@dataclass(frozen=True, slots=True)
class JobViewer:
    """Who reads jobs: one account's management key, or an admin (every account)."""

    account_id: str
    admin: bool

    def sees(self, record: JobRecord) -> bool:
        return self.admin or record.origin.account_id == self.account_id


@dataclass(frozen=True, slots=True)
class JobView:
    record: JobRecord
    # The record's usage at the prices its request was admitted at (micro-credits).
    cost: int


class LogReader(Protocol):
    async def for_job(self, job_id: str) -> InferenceLog | None: ...


class JobService:
    def __init__(
        self,
        network: NetworkPort,
        authenticator: CachedAuthenticator,
        logs: LogReader,
        *,
        service_token: str,
    ) -> None:
        self._network = network
        self._authenticator = authenticator
        self._logs = logs
        self._service_token = service_token

    async def viewer(self, authorization: str | None) -> JobViewer:
        """The service token reads as an admin; API keys need the management or admin
        scope (an inference key's requests are read with its account's management key)."""
        credential = bearer_credential(authorization)
        if self._service_token and is_service_token(credential, self._service_token):
            return JobViewer("", admin=True)
        caller = await self._authenticator.authenticate(authorization)
        if not (caller.may_manage or caller.admin):
            raise PermissionDenied("Reading jobs needs a key with the management scope")
        return JobViewer(caller.account_id, caller.admin)

    async def list(
        self, viewer: JobViewer, query: JobQuery, page_size: int, page_token: str
    ) -> tuple[list[JobView], str]:
        """Jobs matching ``query`` the viewer may see, newest first, and the next page's
        token."""
        records, next_token = await self._network.list_job_records(
            _scoped(viewer, _checked(query)), page_size, page_token
        )
        return [_view(record) for record in records], next_token

    async def get(
        self, viewer: JobViewer, job_id: str, *, with_log: bool
    ) -> tuple[JobView, InferenceLog | None]:
        """The job, and (``with_log``) the log of its request if one is kept."""
        _check_text(job_id, "job_id", MAX_ID_LENGTH, required=True)
        record = await self._network.job_record(job_id)
        if record is None or not viewer.sees(record):
            raise NotFound("No such job")
        log = await self._logs.for_job(job_id) if with_log else None
        return _view(record), log


def _checked(query: JobQuery) -> JobQuery:
    """``query`` with its account id in the form records keep; refused when a field is
    malformed."""
    if query.account_id:
        query = replace(query, account_id=str(parse_id(query.account_id, field="account_id")))
    _check_text(query.model, "model", MAX_MODEL_LENGTH)
    _check_text(query.request_id, "request_id", MAX_ID_LENGTH)
    return query


def _check_text(value: str, field: str, limit: int, *, required: bool = False) -> None:
    """Ids and names are printable text of a bounded length (no id the platform makes is
    anything else, and PostgreSQL text holds no NUL)."""
    if len(value) > limit or (required and not value):
        least = 1 if required else 0
        raise InvalidArgument(f"{field} must be {least} to {limit} characters", field=field)
    if not value.isprintable():
        raise InvalidArgument(f"{field} must be printable text", field=field)


def _scoped(viewer: JobViewer, query: JobQuery) -> JobQuery:
    """``query`` narrowed to what the viewer may see: an account's own jobs."""
    if viewer.admin:
        return query
    if query.account_id and query.account_id != viewer.account_id:
        raise PermissionDenied("You may only read your own account's jobs")
    return replace(query, account_id=viewer.account_id)


def _view(record: JobRecord) -> JobView:
    return JobView(record, cost(record.origin.price, record.usage))
