"""Reports and events ready together travel together: a node's chunks and result in
one ReportBatch are relayed to a caller that takes batches as one RunJobResponse
batch, and one event per message to a caller that does not; the same events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from resultity.agent.v1 import agent_service_pb2 as pb
from resultity.agent.v1 import agent_service_pb2_grpc as pb_grpc
from resultity.common.v1 import inference_pb2 as common_pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from agent.identity import NodeIdentity, signed_hello
from agent.session import AGENT_VERSION
from core import channels
from core.convert.agent_reports import batch_to_pb
from core.convert.generation import spec_to_pb
from core.convert.job_events import job_events_from_pb
from core.inference import ChatMessage, ChatRole, GenerationSpec, JobDelta, JobFinished, Sampling
from core.node_signing import OutputDigest, result_payload
from tests.doubles.scripted_runtime import MODEL_ID
from tests.harness import NetworkServer, start_network

HELLO = pb.Hello(
    node_name="raw",
    agent_version=AGENT_VERSION,
    models=[pb.ServedModel(model=MODEL_ID, runtime="raw", context_length=2048)],
    max_concurrent_jobs=1,
)
SPEC = GenerationSpec(
    model=MODEL_ID,
    messages=(ChatMessage(ChatRole.USER, "hi"),),
    sampling=Sampling(max_tokens=8),
    max_prompt_tokens=100,
)


@pytest.fixture
async def network(postgres_dsn: str) -> AsyncIterator[NetworkServer]:
    server = await start_network(postgres_dsn)
    yield server
    await server.stop()


def _result(identity: NodeIdentity, assign: pb.AssignJob) -> pb.ConnectRequest:
    """Two chunks and the signed result, as one message."""
    output = OutputDigest()
    for text in ("Hel", "lo"):
        output.add(text)
    chunks = [
        pb.ConnectRequest(
            job_chunk=pb.JobChunk(
                job_id=assign.job_id,
                epoch=assign.epoch,
                text=text,
                token_count=1,
                prompt_tokens=3 if text == "Hel" else 0,
            )
        )
        for text in ("Hel", "lo")
    ]
    signature = identity.sign(
        result_payload(
            job_id=assign.job_id,
            epoch=assign.epoch,
            done=True,
            reason=common_pb.FINISH_REASON_STOP,
            prompt_tokens=3,
            completion_tokens=2,
            output=output,
        )
    )
    done = pb.ConnectRequest(
        job_done=pb.JobDone(
            job_id=assign.job_id,
            epoch=assign.epoch,
            finish_reason=common_pb.FINISH_REASON_STOP,
            usage=common_pb.Usage(prompt_tokens=3, completion_tokens=2),
            signature=signature,
        )
    )
    return batch_to_pb([*chunks, done])


async def _run(
    network: NetworkServer, identity: NodeIdentity, batch_events: bool
) -> list[dispatch_pb.RunJobResponse]:
    outbound: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()

    async def outgoing() -> AsyncIterator[pb.ConnectRequest]:
        while (request := await outbound.get()) is not None:
            yield request

    async with channels.insecure_channel(network.target) as channel:
        call = pb_grpc.AgentServiceStub(channel).Connect(outgoing())
        responses = aiter(call)
        challenge = (await anext(responses)).challenge
        outbound.put_nowait(signed_hello(identity, HELLO, challenge, ""))
        assert (await anext(responses)).welcome.node_id
        request = dispatch_pb.RunJobRequest(
            job_id=f"batched-{batch_events}", spec=spec_to_pb(SPEC), batch_events=batch_events
        )
        job = dispatch_grpc.DispatchServiceStub(channel).RunJob(request, metadata=network.service)
        events = [await anext(aiter(job))]
        while (response := await anext(responses)).WhichOneof("message") != "assign_job":
            pass
        outbound.put_nowait(_result(identity, response.assign_job))
        events.extend([event async for event in job])
        outbound.put_nowait(None)
        return events


async def test_a_caller_taking_batches_gets_what_was_ready_together_in_one_message(
    network: NetworkServer,
) -> None:
    identity = NodeIdentity.generate()
    async with asyncio.timeout(20):
        batched = await _run(network, identity, batch_events=True)
        single = await _run(network, identity, batch_events=False)
    assert [event.WhichOneof("event") for event in batched] == ["assigned", "batch"]
    assert [event.WhichOneof("event") for event in single] == [
        "assigned",
        "delta",
        "delta",
        "finished",
    ]
    events = [e for message in batched for e in job_events_from_pb(message)]
    assert events == [e for message in single for e in job_events_from_pb(message)]
    assert [type(event) for event in events[1:]] == [JobDelta, JobDelta, JobFinished]
    assert "".join(e.text for e in events if isinstance(e, JobDelta)) == "Hello"
