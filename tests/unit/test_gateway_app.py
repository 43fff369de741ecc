"""Cross-cutting behaviour of the gateway app that needs no cloud."""

from __future__ import annotations

import httpx
from starlette.requests import Request
from starlette.responses import Response

from gateway.app import create_app


async def _explode(_: Request) -> Response:
    raise RuntimeError("bug")


async def test_unhandled_error_becomes_a_500_envelope_with_request_id() -> None:
    app = create_app("127.0.0.1:1")
    app.add_route("/boom", _explode)
    transport = httpx.ASGITransport(app=app)

    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get("/boom")

    assert response.status_code == 500
    assert len(response.headers["x-request-id"]) == 32
    assert response.json() == {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


async def test_missing_key_needs_no_cloud() -> None:
    # The lifespan (and so the cloud channel) never runs under ASGITransport.
    transport = httpx.ASGITransport(app=create_app("127.0.0.1:1"))

    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.post("/v1/chat/completions", json={})

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
