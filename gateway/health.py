"""Probes: `GET /health` (the process answers) and `GET /ready` (a cloud replica is
reachable and has a model servable, which cloud's gRPC health service reports for
its inference service). Every replica is asked at once: the gateway serves while
any one does."""

from __future__ import annotations

import grpc
from fastapi import APIRouter, Request
from grpc_health.v1 import health_pb2, health_pb2_grpc
from resultity.cloud.v1 import inference_service_pb2
from starlette.responses import JSONResponse

from core.replica_channels import ReplicatedStub

INFERENCE_SERVICE = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
# A probe must answer quickly even when cloud does not.
CHECK_TIMEOUT_S = 2.0
_SERVING = health_pb2.HealthCheckResponse.SERVING

router = APIRouter(include_in_schema=False)


@router.get("/health")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    stub: ReplicatedStub[health_pb2_grpc.HealthStub] = request.app.state.cloud_health
    check = health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE)
    answers = await stub.each(lambda replica: replica.Check(check, timeout=CHECK_TIMEOUT_S))
    statuses = [each.status for each in answers if not isinstance(each, grpc.aio.AioRpcError)]
    if _SERVING in statuses:
        return JSONResponse({"status": "ready"})
    if statuses:
        return _not_ready("no model is servable")
    codes = sorted({each.code().name for each in answers if isinstance(each, grpc.aio.AioRpcError)})
    return _not_ready(f"cloud unreachable: {', '.join(codes)}")


def _not_ready(reason: str) -> JSONResponse:
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
