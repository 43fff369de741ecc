"""Probes: `GET /health` (the process answers) and `GET /ready` (cloud is reachable
and at least one model is servable, which cloud's gRPC health service reports for
its inference service)."""

from __future__ import annotations

import grpc
from fastapi import APIRouter, Request
from grpc_health.v1 import health_pb2, health_pb2_grpc
from resultity.cloud.v1 import inference_service_pb2
from starlette.responses import JSONResponse

INFERENCE_SERVICE = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
# A probe must answer quickly even when cloud does not.
CHECK_TIMEOUT_S = 2.0

router = APIRouter(include_in_schema=False)


def health_stub(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(channel)


@router.get("/health")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    stub: health_pb2_grpc.HealthStub = request.app.state.cloud_health
    try:
        answer = await stub.Check(
            health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE), timeout=CHECK_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as error:
        return _not_ready(f"cloud unreachable: {error.code().name}")
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        return _not_ready("no model is servable")
    return JSONResponse({"status": "ready"})


def _not_ready(reason: str) -> JSONResponse:
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
