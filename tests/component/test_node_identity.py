"""Node identity over real gRPC: signed hellos, node tokens, signed results."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from resultity.agent.v1 import agent_service_pb2 as pb
from resultity.agent.v1 import agent_service_pb2_grpc as pb_grpc
from resultity.common.v1 import inference_pb2 as common_pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from agent.identity import NodeIdentity, signed_hello
from agent.session import AGENT_VERSION
from core import channels
from core.convert.generation import logprobs_to_pb, spec_to_pb
from core.grpc_errors import error_info
from core.inference import (
    ChatMessage,
    ChatRole,
    GenerationSpec,
    Sampling,
    TokenLogprob,
    TopLogprob,
)
from core.node_signing import OutputDigest, node_id_of, result_payload
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import NetworkServer, open_raw_session, running_platform, start_network

HELLO = pb.Hello(
    node_name="raw",
    agent_version=AGENT_VERSION,
    models=[pb.ServedModel(model=MODEL_ID, runtime="raw", context_length=2048)],
    max_concurrent_jobs=1,
)


def _refused(error: grpc.aio.AioRpcError | None, reason: str) -> str:
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(error)
    assert info is not None
    assert info.reason == reason
    return error.details() or ""


@pytest.fixture
async def network(postgres_dsn: str) -> AsyncIterator[NetworkServer]:
    server = await start_network(postgres_dsn)
    yield server
    await server.stop()


async def test_node_id_is_the_fingerprint_of_its_key(network: NetworkServer) -> None:
    identity = NodeIdentity.generate()
    _, responses, _ = await open_raw_session(
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

    _, _, error = await open_raw_session(network.target, forged)
    assert "signature" in _refused(error, "INVALID_NODE_CREDENTIALS")
    assert not network.component.service.nodes()


async def test_replayed_hello_is_refused(network: NetworkServer) -> None:
    identity = NodeIdentity.generate()
    captured: list[pb.ConnectRequest] = []

    def record(challenge: pb.Challenge) -> list[pb.ConnectRequest]:
        captured.append(signed_hello(identity, HELLO, challenge, ""))
        return captured

    _, first, _ = await open_raw_session(network.target, record)
    assert first[0].welcome.node_id
    # The same signed bytes on a new stream: the nonce is not this stream's.
    _, _, error = await open_raw_session(network.target, lambda _: captured)
    assert "challenge" in _refused(error, "INVALID_NODE_CREDENTIALS")


async def test_stale_hello_is_refused(network: NetworkServer) -> None:
    identity = NodeIdentity.generate()
    old = datetime.now(UTC) - timedelta(hours=1)
    _, _, error = await open_raw_session(
        network.target,
        lambda challenge: [signed_hello(identity, HELLO, challenge, "", signed_at=old)],
    )
    assert "clock window" in _refused(error, "INVALID_NODE_CREDENTIALS")


async def test_hello_for_another_network_is_refused(network: NetworkServer) -> None:
    identity = NodeIdentity.generate()

    def elsewhere(challenge: pb.Challenge) -> list[pb.ConnectRequest]:
        other = pb.Challenge(nonce=challenge.nonce, network_id="another-network")
        return [signed_hello(identity, HELLO, other, "")]

    _, _, error = await open_raw_session(network.target, elsewhere)
    assert "another network" in _refused(error, "INVALID_NODE_CREDENTIALS")


async def test_unsigned_hello_is_refused(network: NetworkServer) -> None:
    _, _, error = await open_raw_session(network.target, lambda _: [pb.ConnectRequest(hello=HELLO)])
    _refused(error, "INVALID_NODE_CREDENTIALS")


async def test_a_stream_without_a_hello_is_closed(postgres_dsn: str) -> None:
    network = await start_network(postgres_dsn, hello_timeout_s=0.2)
    try:
        async with asyncio.timeout(10):  # bounds the test, not the network
            _, responses, error = await open_raw_session(
                network.target, lambda _: [], keep_open=True
            )
    finally:
        await network.stop()
    assert not responses
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(error)
    assert info is not None
    assert info.reason == "SESSION_ENDED"


def _oversized(field: str) -> pb.Hello:
    hello = pb.Hello()
    hello.CopyFrom(HELLO)
    if field == "models":
        hello.models.extend(pb.ServedModel(model=f"m{index}", runtime="raw") for index in range(65))
    elif field == "model_id":
        hello.models.add(model="m" * 257, runtime="raw")
    elif field != "node_token":  # signed_hello sets the token
        setattr(hello, field, "x" * 300)
    return hello


@pytest.mark.parametrize(
    "field", ["node_name", "agent_version", "node_token", "models", "model_id"]
)
async def test_oversized_hello_fields_are_refused(network: NetworkServer, field: str) -> None:
    hello = _oversized(field)
    token = "x" * 300 if field == "node_token" else ""
    _, _, error = await open_raw_session(
        network.target,
        lambda challenge: [signed_hello(NodeIdentity.generate(), hello, challenge, token)],
    )
    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.details() or "") < 200
    assert not network.component.service.nodes()


async def test_agent_older_than_the_protocol_is_refused(network: NetworkServer) -> None:
    old = pb.Hello()
    old.CopyFrom(HELLO)
    old.agent_version = "0.1.0"
    _, _, error = await open_raw_session(
        network.target,
        lambda challenge: [signed_hello(NodeIdentity.generate(), old, challenge, "")],
    )
    assert error is not None
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "upgrade the agent" in (error.details() or "")
    assert not network.component.service.nodes()


async def test_declared_region_is_kept_and_a_malformed_one_refused(
    network: NetworkServer,
) -> None:
    identity = NodeIdentity.generate()
    in_region = pb.Hello()
    in_region.CopyFrom(HELLO)
    in_region.region = "eu-west"
    _, responses, _ = await open_raw_session(
        network.target, lambda challenge: [signed_hello(identity, in_region, challenge, "")]
    )
    assert responses[0].welcome.node_id == identity.node_id

    in_region.region = "EU West"
    _, _, error = await open_raw_session(
        network.target,
        lambda challenge: [signed_hello(NodeIdentity.generate(), in_region, challenge, "")],
    )
    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(error)
    assert info is not None
    assert info.metadata["field"] == "region"


async def test_node_tokens_are_checked_and_bind_the_operator(postgres_dsn: str) -> None:
    async with running_platform(postgres_dsn) as platform:
        identity = NodeIdentity.generate()
        for bad in ("", "rsk_not-a-token", (await platform.customer(0)).api_key):
            _, _, error = await open_raw_session(
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


STREAMED_LOGPROB = TokenLogprob("Hello", b"Hello", -0.5, (TopLogprob("Hello", b"Hello", -0.5),))
STREAMED_EMBEDDING = (0.5, 0.25)
# What the node signs, as (text, logprob, embedding): what it streamed, or not.
SIGNED = {
    "text": ("Goodbye", STREAMED_LOGPROB, STREAMED_EMBEDDING),
    "logprob": ("Hello", replace(STREAMED_LOGPROB, logprob=-0.1), STREAMED_EMBEDDING),
    "top logprob": ("Hello", replace(STREAMED_LOGPROB, top_logprobs=()), STREAMED_EMBEDDING),
    "embedding": ("Hello", STREAMED_LOGPROB, (0.5, 0.26)),
}


def _signature(
    identity: NodeIdentity,
    assign: pb.AssignJob,
    signed: tuple[str, TokenLogprob, tuple[float, ...]],
) -> bytes:
    text, logprob, embedding = signed
    output = OutputDigest()
    output.add(text, (), (logprob,), embedding)
    return identity.sign(
        result_payload(
            job_id=assign.job_id,
            epoch=assign.epoch,
            done=True,
            reason=common_pb.FINISH_REASON_STOP,
            prompt_tokens=3,
            completion_tokens=1,
            output=output,
        )
    )


@pytest.mark.parametrize("tampered", [*SIGNED, None])
async def test_result_signed_over_other_output_cuts_the_node_off(
    network: NetworkServer, tampered: str | None
) -> None:
    """A node whose signature does not cover exactly what it streamed (text,
    logprobs, embedding) is cut off and the job fails; signed honestly, it finishes."""
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
            _collect_job(
                dispatch_grpc.DispatchServiceStub(channel), spec_to_pb(spec), network.service
            )
        )
        while (response := await anext(responses)).WhichOneof("message") != "assign_job":
            pass
        assign = response.assign_job
        outbound.put_nowait(
            pb.ConnectRequest(
                job_chunk=pb.JobChunk(
                    job_id=assign.job_id,
                    epoch=assign.epoch,
                    text="Hello",
                    token_count=1,
                    logprobs=logprobs_to_pb((STREAMED_LOGPROB,)),
                    embedding=STREAMED_EMBEDDING,
                )
            )
        )
        signed = SIGNED[tampered] if tampered else ("Hello", STREAMED_LOGPROB, STREAMED_EMBEDDING)
        outbound.put_nowait(
            pb.ConnectRequest(
                job_done=pb.JobDone(
                    job_id=assign.job_id,
                    epoch=assign.epoch,
                    finish_reason=common_pb.FINISH_REASON_STOP,
                    usage=common_pb.Usage(prompt_tokens=3, completion_tokens=1),
                    signature=_signature(identity, assign, signed),
                )
            )
        )
        if tampered is None:
            events = await job
            assert events[-1].finished.usage.completion_tokens == 1
            [delta] = [e.delta for e in events if e.WhichOneof("event") == "delta"]
            assert list(delta.embedding) == list(STREAMED_EMBEDDING)
            assert delta.logprobs[0].logprob == STREAMED_LOGPROB.logprob
            outbound.put_nowait(None)
            return
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
    stub: dispatch_grpc.DispatchServiceStub,
    spec: common_pb.GenerationSpec,
    metadata: tuple[tuple[str, str], ...],
) -> list[dispatch_pb.RunJobResponse]:
    call = stub.RunJob(dispatch_pb.RunJobRequest(job_id="signed-job", spec=spec), metadata=metadata)
    return [event async for event in call]


async def test_agent_signs_its_logprobs_and_embeddings(postgres_dsn: str) -> None:
    """The real agent's results verify with logprobs and embeddings in them: its
    operator is credited (only verified results name it) and it stays connected."""
    async with running_platform(postgres_dsn) as platform:
        operator, token = await platform.operator()
        agent = await platform.start_agent(ScriptedRuntime(), node_token=token)
        logprobs = GenerationSpec(
            model=MODEL_ID,
            messages=(ChatMessage(ChatRole.USER, "hi"),),
            sampling=Sampling(max_tokens=4, logprobs=True, top_logprobs=2),
            max_prompt_tokens=100,
        )
        embedding = GenerationSpec(
            model=MODEL_ID,
            messages=(),
            sampling=Sampling(max_tokens=0),
            max_prompt_tokens=100,
            prompt="embed these words",
            embed=True,
        )
        stub = dispatch_grpc.DispatchServiceStub(platform.channel)
        for spec in (logprobs, embedding):
            events = await _collect_job(stub, spec_to_pb(spec), platform.service)
            deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
            assert any(d.logprobs for d in deltas) or any(d.embedding for d in deltas)
            [share] = events[-1].finished.node_usage
            assert (share.node_id, share.operator_account_id) == (agent.session.node_id, operator)
        assert [n.node_id for n in platform.network.service.nodes()] == [agent.session.node_id]
