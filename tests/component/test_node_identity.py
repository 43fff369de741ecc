"""Node identity over real gRPC: signed hellos, node tokens, signed results."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from resultity.agent.v1 import agent_service_pb2 as pb
from resultity.agent.v1 import agent_service_pb2_grpc as pb_grpc
from resultity.common.v1 import inference_pb2 as common_pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from agent.identity import NodeIdentity, signed_hello
from server.common import channels
from server.common.grpc_errors import error_info
from server.common.inference import ChatMessage, ChatRole, GenerationSpec, Sampling
from server.common.inference_proto import spec_to_pb
from server.common.node_signing import node_id_of
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import NetworkServer, running_platform, start_network

HELLO = pb.Hello(
    node_name="raw",
    agent_version="0.1.0",
    models=[pb.ServedModel(model=MODEL_ID, runtime="raw", context_length=2048)],
    max_concurrent_jobs=1,
)

Opening = Callable[[pb.Challenge], list[pb.ConnectRequest]]


async def _open(
    target: str, opening: Opening
) -> tuple[pb.Challenge, list[pb.ConnectResponse], grpc.aio.AioRpcError | None]:
    """Answers the challenge with ``opening``; returns what came back until the end."""
    challenge: asyncio.Future[pb.Challenge] = asyncio.get_running_loop().create_future()
    responses: list[pb.ConnectResponse] = []

    async def outgoing() -> AsyncIterator[pb.ConnectRequest]:
        for request in opening(await challenge):
            yield request

    async with channels.insecure_channel(target) as channel:
        try:
            async for response in pb_grpc.AgentServiceStub(channel).Connect(outgoing()):
                if response.WhichOneof("message") == "challenge":
                    challenge.set_result(response.challenge)
                else:
                    responses.append(response)
        except grpc.aio.AioRpcError as error:
            return challenge.result(), responses, error
    return challenge.result(), responses, None


def _refused(error: grpc.aio.AioRpcError | None, reason: str) -> str:
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(error)
    assert info is not None
    assert info.reason == reason
    return error.details() or ""


@pytest.fixture
async def network() -> AsyncIterator[NetworkServer]:
    server = await start_network()
    yield server
    await server.stop()


async def test_node_id_is_the_fingerprint_of_its_key(network: NetworkServer) -> None:
    identity = NodeIdentity.generate()
    _, responses, _ = await _open(
        network.target, lambda challenge: [signed_hello(identity, HELLO, challenge, "")]
    )
    assert responses[0].welcome.node_id == node_id_of(identity.public_key) == identity.node_id


async def test_forged_signature_is_refused(network: NetworkServer) -> None:
    identity, forger = NodeIdentity.generate(), NodeIdentity.generate()

    def forged(challenge: pb.Challenge) -> list[pb.ConnectRequest]:
        request = signed_hello(identity, HELLO, challenge, "")
        # Signed by another key than the one the hello names.
        request.signed_hello.signature = forger.sign(request.signed_hello.hello)
        return [request]

    _, _, error = await _open(network.target, forged)
    assert "signature" in _refused(error, "INVALID_NODE_CREDENTIALS")
    assert not network.component.service.nodes()


async def test_replayed_hello_is_refused(network: NetworkServer) -> None:
    identity = NodeIdentity.generate()
    captured: list[pb.ConnectRequest] = []

    def record(challenge: pb.Challenge) -> list[pb.ConnectRequest]:
        captured.append(signed_hello(identity, HELLO, challenge, ""))
        return captured

    _, first, _ = await _open(network.target, record)
    assert first[0].welcome.node_id
    # The same signed bytes on a new stream: the nonce is not this stream's.
    _, _, error = await _open(network.target, lambda _: captured)
    assert "challenge" in _refused(error, "INVALID_NODE_CREDENTIALS")


async def test_stale_hello_is_refused(network: NetworkServer) -> None:
    identity = NodeIdentity.generate()
    old = datetime.now(UTC) - timedelta(hours=1)
    _, _, error = await _open(
        network.target,
        lambda challenge: [signed_hello(identity, HELLO, challenge, "", signed_at=old)],
    )
    assert "clock window" in _refused(error, "INVALID_NODE_CREDENTIALS")


async def test_hello_for_another_network_is_refused(network: NetworkServer) -> None:
    identity = NodeIdentity.generate()

    def elsewhere(challenge: pb.Challenge) -> list[pb.ConnectRequest]:
        other = pb.Challenge(nonce=challenge.nonce, network_id="another-network")
        return [signed_hello(identity, HELLO, other, "")]

    _, _, error = await _open(network.target, elsewhere)
    assert "another network" in _refused(error, "INVALID_NODE_CREDENTIALS")


async def test_unsigned_hello_is_refused(network: NetworkServer) -> None:
    _, _, error = await _open(network.target, lambda _: [pb.ConnectRequest(hello=HELLO)])
    _refused(error, "INVALID_NODE_CREDENTIALS")


async def test_node_tokens_are_checked_and_bind_the_operator(postgres_dsn: str) -> None:
    async with running_platform(postgres_dsn) as platform:
        identity = NodeIdentity.generate()
        for bad in ("", "rsk_not-a-token", (await platform.customer(0)).api_key):
            _, _, error = await _open(
                platform.target,
                lambda challenge, token=bad: [signed_hello(identity, HELLO, challenge, token)],
            )
            _refused(error, "INVALID_NODE_CREDENTIALS")
        assert not platform.network.service.nodes()

        operator, token = await platform.operator()
        agent = await platform.start_agent(ScriptedRuntime(), node_token=token)
        [node] = platform.network.service.nodes()
        assert node.node_id == agent.session.node_id
        assert node.operator_account_id == operator


async def test_result_with_a_bad_signature_cuts_the_node_off(network: NetworkServer) -> None:
    identity = NodeIdentity.generate()
    outbound: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()

    async def outgoing() -> AsyncIterator[pb.ConnectRequest]:
        while (request := await outbound.get()) is not None:
            yield request

    spec = GenerationSpec(
        model=MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, "hi"),),
        sampling=Sampling(max_tokens=8),
        max_prompt_tokens=100,
    )
    async with channels.insecure_channel(network.target) as channel:
        call = pb_grpc.AgentServiceStub(channel).Connect(outgoing())
        responses = aiter(call)
        challenge = (await anext(responses)).challenge
        outbound.put_nowait(signed_hello(identity, HELLO, challenge, ""))
        assert (await anext(responses)).welcome.node_id
        job = asyncio.create_task(
            _collect_job(dispatch_grpc.DispatchServiceStub(channel), spec_to_pb(spec))
        )
        while (response := await anext(responses)).WhichOneof("message") != "assign_job":
            pass
        assign = response.assign_job
        outbound.put_nowait(
            pb.ConnectRequest(
                job_chunk=pb.JobChunk(
                    job_id=assign.job_id, epoch=assign.epoch, text="Hello", token_count=1
                )
            )
        )
        # Signed over other text than it streamed.
        outbound.put_nowait(
            pb.ConnectRequest(
                job_done=pb.JobDone(
                    job_id=assign.job_id,
                    epoch=assign.epoch,
                    finish_reason=common_pb.FINISH_REASON_STOP,
                    usage=common_pb.Usage(prompt_tokens=3, completion_tokens=1),
                    signature=identity.sign(b"something else"),
                )
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in responses:
                pass
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        info = error_info(ended.value)
        assert info is not None
        assert info.reason == "INVALID_RESULT_SIGNATURE"
        # No other node can continue: the job fails rather than finishing on a bad result.
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await job
        assert failed.value.code() == grpc.StatusCode.ABORTED


async def _collect_job(
    stub: dispatch_grpc.DispatchServiceStub, spec: common_pb.GenerationSpec
) -> list[dispatch_pb.RunJobResponse]:
    call = stub.RunJob(dispatch_pb.RunJobRequest(job_id="signed-job", spec=spec))
    return [event async for event in call]
