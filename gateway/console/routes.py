"""The web console at /console: sign in with an API key, then the account's usage and
keys, an operator's nodes and earnings, and (admin keys) the fleet and the ledger.

Pages are rendered on the server (Jinja2); htmx, served from here, refreshes the
live panels. Each request calls the platform with the signed-in user's key, which
lives only in the server-side session (sessions.py): never in a URL, a page or a
log. State-changing forms carry the session's CSRF token and must come from this
origin.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import grpc
import structlog
from fastapi import APIRouter, FastAPI, Request
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import usage_service_pb2 as usage_pb
from starlette.responses import HTMLResponse, RedirectResponse, Response

from core.channels import Tls
from gateway.console import format as fmt
from gateway.console.platform import EARNING_EPOCHS, ConsoleTargets, Platform
from gateway.console.sessions import (
    Identity,
    Session,
    SessionStore,
    SessionsUnavailable,
    csrf_matches,
)

log = structlog.get_logger("gateway.console")

PREFIX = "/console"
COOKIE = "resultity_console"
_HERE = Path(__file__).parent
_STATIC = {
    "htmx.min.js": "text/javascript",
    "console.css": "text/css",
}
# A form is a few fields; anything larger is not one of ours.
_MAX_FORM_BYTES = 4096
_SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
_SCOPES = {
    "inference": keys_pb.API_KEY_SCOPE_INFERENCE,
    "management": keys_pb.API_KEY_SCOPE_MANAGEMENT,
    "admin": keys_pb.API_KEY_SCOPE_ADMIN,
}


class _Problem(Exception):
    """A request the console refuses, shown to the user (never a 5xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def console_router(
    targets: ConsoleTargets, tls: Tls, sessions: SessionStore | None = None
) -> APIRouter:
    """The console's routes; mounting them opens (and closes) its gRPC channels and
    ``sessions`` (default: in this process) with the app's lifespan."""
    store = sessions or SessionStore()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.console = Platform(targets, tls)
        try:
            yield
        finally:
            await app.state.console.close()
            await store.close()

    router = APIRouter(prefix=PREFIX, include_in_schema=False, lifespan=lifespan)
    pages = _templates()

    def platform(request: Request) -> Platform:
        console: Platform = request.app.state.console
        return console

    async def current(request: Request) -> tuple[str, Session] | None:
        session_id = request.cookies.get(COOKIE, "")
        session = await store.get(session_id) if session_id else None
        return None if session is None else (session_id, session)

    def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = pages.get_template(template).render(request=request, prefix=PREFIX, **context)
        return HTMLResponse(html, status_code=status, headers=_SECURITY_HEADERS)

    def sessions_answering(
        route: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """``route``, or a page saying so when the session store does not answer."""

        async def guarded(request: Request) -> Response:
            try:
                return await route(request)
            except SessionsUnavailable:
                log.warning("console.sessions_unavailable", exc_info=True)
                return render(
                    request,
                    "error.html",
                    503,
                    error="Sign-in is unavailable for a moment; try again shortly.",
                )

        return guarded

    def signed_in(
        page: Callable[[Request, str, Session], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """Runs ``page`` for a live session; otherwise to the sign-in page. A key that
        stopped working (revoked, account disabled) ends the session."""

        @sessions_answering
        async def handler(request: Request) -> Response:
            found = await current(request)
            if found is None:
                return _to_sign_in(request)
            session_id, session = found
            try:
                return await page(request, session_id, session)
            except _Problem as problem:
                return render(
                    request, "error.html", problem.status, session=session, error=problem.message
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    await store.end(session_id)
                    return _to_sign_in(request)
                log.info("console.platform_error", code=error.code().name)
                return render(
                    request,
                    "error.html",
                    _status_of(error),
                    session=session,
                    error=_describe(error),
                )

        return handler

    async def checked_form(request: Request, session: Session) -> dict[str, list[str]]:
        form = await _form(request)
        if not csrf_matches(session, _one(form, "csrf")):
            raise _Problem("This form expired; reload the page and try again.", 403)
        return form

    # --- signing in and out ---------------------------------------------------------

    @router.get("")
    @sessions_answering
    async def home(request: Request) -> Response:
        return _redirect("/usage" if await current(request) else "/sign-in")

    @router.get("/sign-in")
    async def sign_in_page(request: Request) -> Response:
        return render(request, "sign_in.html")

    @router.post("/sign-in")
    @sessions_answering
    async def sign_in(request: Request) -> Response:
        try:
            key = _one(await _form(request), "api_key").strip()
            if not key:
                raise _Problem("Enter an API key.")
            if len(key) > 256 or not key.isascii() or not key.isprintable():
                raise _Problem("That is not an API key.", 401)
            try:
                caller = await platform(request).caller(key)
            except grpc.aio.AioRpcError as error:
                raise _Problem(_sign_in_refusal(error), _status_of(error)) from None
            if not caller.HasField("api_key"):
                raise _Problem("Sign in with an API key (the service token has no account).")
        except _Problem as problem:
            return render(request, "sign_in.html", problem.status, error=problem.message)
        identity = Identity(
            caller.account.account_id, caller.account.name, caller.admin, caller.api_key.prefix
        )
        session_id = await store.create(identity, key)
        log.info("console.signed_in", account_id=identity.account_id, admin=identity.admin)
        response = _redirect("/usage")
        response.set_cookie(
            COOKIE,
            session_id,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def sign_out(request: Request, session_id: str, session: Session) -> Response:
        await checked_form(request, session)
        await store.end(session_id)
        response = _redirect("/sign-in")
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    # --- consumers --------------------------------------------------------------------

    async def usage(request: Request, session_id: str, session: Session) -> Response:
        daily = request.query_params.get("interval") == "day"
        interval = usage_pb.USAGE_INTERVAL_DAY if daily else usage_pb.USAGE_INTERVAL_HOUR
        view = await platform(request).consumer(
            session.api_key, session.identity.account_id, interval
        )
        return render(
            request,
            "usage.html",
            session=session,
            view=view,
            daily=daily,
            chart=Markup(fmt.usage_chart(view.history)),
        )

    async def balance(request: Request, session_id: str, session: Session) -> Response:
        found = await platform(request).balance(session.api_key, session.identity.account_id)
        return render(request, "balance.html", session=session, balance=found)

    async def keys(request: Request, session_id: str, session: Session) -> Response:
        listed = await platform(request).keys(session.api_key, session.identity.account_id)
        secret = await store.take_new_secret(session_id, session)
        return render(request, "keys.html", session=session, keys=listed, new_secret=secret)

    async def create_key(request: Request, session_id: str, session: Session) -> Response:
        form = await checked_form(request, session)
        name = _one(form, "name").strip()
        if len(name) > 200:
            raise _Problem("A key's name is at most 200 characters.")
        wanted = form.get("scope", []) or ["inference"]
        unknown = [scope for scope in wanted if scope not in _SCOPES]
        if unknown:
            raise _Problem(f"Unknown scope: {unknown[0][:32]}")
        created = await platform(request).create_key(
            session.api_key,
            session.identity.account_id,
            name,
            [_SCOPES[scope] for scope in dict.fromkeys(wanted)],
        )
        await store.show_once(session_id, session, created.secret)
        return _redirect("/keys")

    async def revoke_key(request: Request, session_id: str, session: Session) -> Response:
        await checked_form(request, session)
        await platform(request).revoke_key(session.api_key, request.path_params["key_id"])
        return _redirect("/keys")

    # --- operators ----------------------------------------------------------------------

    async def nodes(request: Request, session_id: str, session: Session) -> Response:
        view = await platform(request).operator(session.api_key, session.identity.account_id)
        chart = fmt.earnings_chart(view.earnings, view.epoch_seconds, EARNING_EPOCHS)
        return render(
            request,
            "nodes.html",
            session=session,
            view=view,
            chart=Markup(chart),
        )

    async def request_payout(request: Request, session_id: str, session: Session) -> Response:
        form = await checked_form(request, session)
        amount = _micro_credits(_one(form, "amount"))
        await platform(request).request_payout(
            session.api_key,
            session.identity.account_id,
            amount,
            # One form, one payout: a resubmitted form repeats the same request.
            _one(form, "request_id") or uuid.uuid4().hex,
        )
        return _redirect("/nodes")

    # --- admins -------------------------------------------------------------------------

    async def admin(request: Request, session_id: str, session: Session) -> Response:
        if not session.identity.admin:
            raise _Problem("This page needs an API key with the admin scope.", 403)
        view = await platform(request).admin(session.api_key)
        return render(
            request,
            "admin.html",
            session=session,
            view=view,
            fleet=fmt.fleet(view.nodes),
            versions=fmt.config_versions(view.nodes),
            node_names={node.node_id: node.node_name for node in view.nodes},
        )

    for path, method, page in (
        ("/sign-out", "POST", sign_out),
        ("/usage", "GET", usage),
        ("/usage/balance", "GET", balance),
        ("/keys", "GET", keys),
        ("/keys", "POST", create_key),
        ("/keys/{key_id}/revoke", "POST", revoke_key),
        ("/nodes", "GET", nodes),
        ("/payouts", "POST", request_payout),
        ("/admin", "GET", admin),
    ):
        router.add_api_route(path, signed_in(page), methods=[method])

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in _STATIC:
            return Response(status_code=404)
        return Response(
            (_HERE / "static" / name).read_bytes(),
            media_type=_STATIC[name],
            headers={"cache-control": "public, max-age=3600", "x-content-type-options": "nosniff"},
        )

    return router


def _templates() -> Environment:
    pages = Environment(
        loader=FileSystemLoader(_HERE / "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    pages.filters.update(
        credits=fmt.credits,
        when=fmt.when,
        node_state=fmt.node_state,
        payout_status=fmt.payout_status,
        scopes=fmt.scopes,
        job_status=fmt.job_status,
        job_nodes=fmt.job_nodes,
    )
    pages.globals["elapsed"] = fmt.elapsed
    pages.globals["running_for"] = fmt.running_for
    # Static URLs carry a digest of the file, so a new release is fetched at once.
    pages.globals["static"] = {
        name: f"{PREFIX}/static/{name}?v="
        + hashlib.sha256((_HERE / "static" / name).read_bytes()).hexdigest()[:12]
        for name in _STATIC
    }
    return pages


async def _form(request: Request) -> dict[str, list[str]]:
    """The urlencoded form of a POST from this console's own pages."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise _Problem("Forms are accepted only from the console's own pages.", 403)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            raise _Problem("That form is too large.", 413)
    try:
        return parse_qs(body.decode(), max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise _Problem("That form could not be read.") from None


def _one(form: dict[str, list[str]], name: str) -> str:
    values = form.get(name, [])
    return values[0] if values else ""


def _micro_credits(text: str) -> int:
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise _Problem("Enter an amount in credits, like 12.5.") from None
    micro = amount * fmt.MICRO
    if not amount.is_finite() or micro != micro.to_integral_value() or micro <= 0:
        raise _Problem("Enter a positive amount with at most 6 decimals.")
    return int(micro)


def _redirect(path: str) -> RedirectResponse:
    return RedirectResponse(PREFIX + path, status_code=303)


def _to_sign_in(request: Request) -> Response:
    if request.headers.get("hx-request"):
        # htmx follows this header with a full page load.
        return Response(status_code=204, headers={"hx-redirect": f"{PREFIX}/sign-in"})
    response = _redirect("/sign-in")
    response.delete_cookie(COOKIE, path=PREFIX)
    return response


def _status_of(error: grpc.aio.AioRpcError) -> int:
    return {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.FAILED_PRECONDITION: 409,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    }.get(error.code(), 503)


def _describe(error: grpc.aio.AioRpcError) -> str:
    if _status_of(error) == 503:
        return "The platform did not answer; try again in a moment."
    return error.details() or error.code().name


def _sign_in_refusal(error: grpc.aio.AioRpcError) -> str:
    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
        return "That key is unknown, revoked or expired."
    if error.code() == grpc.StatusCode.PERMISSION_DENIED:
        return (
            "That key has no management scope. Sign in with a management key "
            "(resultity account create-key ACCOUNT_ID --scope management)."
        )
    return _describe(error)
