"""A scripted cloud InferenceService for testing the gateway over real gRPC.

A test sets `cloud.script` (what to answer) and then inspects `cloud.calls`
(what the gateway sent). Domain errors go through the shared translate_errors,
so they carry the same ErrorInfo as the real cloud's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.cloud.v1 import inference_service_pb2_grpc
from resultity.common.v1 import inference_pb2

from core.errors import DomainError, InvalidApiKey, ModelNotFound
from core.grpc_errors import translate_errors
from core.metadata import AUTHORIZATION, GENERATION_MS

TEST_API_KEY = "sk-test-0123456789"
CREATED = 1_700_000_000
COMPLETION_ID = "chatcmpl-scripted"
TEXT_COMPLETION_ID = "cmpl-scripted"


@dataclass
class Script:
    """What the next calls answer."""

    text: list[str] = field(default_factory=lambda: ["Hello", " world"])
    finish_reason: inference_pb2.FinishReason.ValueType = inference_pb2.FINISH_REASON_STOP
    prompt_tokens: int = 7
    # Raised before anything is sent.
    error: DomainError | None = None
    # A raw status without ErrorInfo, as a crash or transport failure would give.
    abort: tuple[grpc.StatusCode, str] | None = None
    # Streams only: raised after the text deltas, before the finish delta.
    error_mid_stream: DomainError | None = None
    # Block (until cancelled) after the text deltas, or before answering a unary call.
    hang: bool = False
    # Reported in trailing metadata as the nodes' generation time.
    generation_ms: float = 0.0
    # Sent as initial metadata of chat completions (x-ratelimit-* entries).
    rate_limits: tuple[tuple[str, str], ...] = ()
    # Chat completions: calls (id, name, arguments) after the text; the finish reason
    # is then TOOL_CALLS. Streamed: id and name first, the arguments in two pieces.
    tool_calls: tuple[tuple[str, str, str], ...] = ()

    @property
    def chat_finish_reason(self) -> inference_pb2.FinishReason.ValueType:
        if self.tool_calls and self.finish_reason == inference_pb2.FINISH_REASON_STOP:
            return inference_pb2.FINISH_REASON_TOOL_CALLS
        return self.finish_reason


@dataclass
class Call:
    method: str
    request: Any
    metadata: dict[str, str]


class _ScriptedChatCloud(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(self, models: tuple[str, ...] = ("smollm2-135m", "llama-3-8b")) -> None:
        self.models = models
        self.script = Script()
        self.calls: list[Call] = []
        # Set when a call is cancelled by its client while the servicer runs it.
        self.cancelled = asyncio.Event()
        # Set when a hanging call has sent what it will send.
        self.hanging = asyncio.Event()

    def reset(self) -> None:
        self.script = Script()
        self.calls.clear()
        self.cancelled.clear()
        self.hanging.clear()

    async def _begin(self, method: str, request: Any, context: Any) -> None:
        metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        self.calls.append(Call(method, request, metadata))
        if metadata.get(AUTHORIZATION) != f"Bearer {TEST_API_KEY}":
            raise InvalidApiKey("Incorrect API key provided.")
        if self.script.abort is not None:
            await context.abort(*self.script.abort)
        if self.script.error is not None:
            raise self.script.error

    async def _hang(self) -> None:
        self.hanging.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    def _usage(self) -> inference_pb2.Usage:
        return inference_pb2.Usage(
            prompt_tokens=self.script.prompt_tokens, completion_tokens=len(self.script.text)
        )

    def _logprobs(
        self, params: pb.ChatCompletionParams | pb.CompletionParams, text: str
    ) -> list[Any]:
        """One made-up logprob per scripted piece, when the request asks for them."""
        if not params.logprobs:
            return []
        top = [
            inference_pb2.TopLogprob(token=text, bytes=text.encode(), logprob=-0.25 * (rank + 1))
            for rank in range(params.top_logprobs)
        ]
        return [
            inference_pb2.TokenLogprob(
                token=text, bytes=text.encode(), logprob=-0.25, top_logprobs=top
            )
        ]

    @translate_errors
    async def CreateChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: Any
    ) -> pb.CreateChatCompletionResponse:
        await self._begin("CreateChatCompletion", request, context)
        await context.send_initial_metadata(self.script.rate_limits)
        if self.script.hang:
            await self._hang()
        context.set_trailing_metadata(((GENERATION_MS, str(self.script.generation_ms)),))
        return pb.CreateChatCompletionResponse(
            id=COMPLETION_ID,
            model=request.params.model,
            created=Timestamp(seconds=CREATED),
            choices=[
                pb.ChatCompletionChoice(
                    index=index,
                    message=inference_pb2.ChatMessage(
                        role=inference_pb2.CHAT_ROLE_ASSISTANT,
                        content="".join(self.script.text),
                        tool_calls=[
                            inference_pb2.ToolCall(id=id_, name=name, arguments=arguments)
                            for id_, name, arguments in self.script.tool_calls
                        ],
                    ),
                    finish_reason=self.script.chat_finish_reason,
                    logprobs=[
                        item
                        for text in self.script.text
                        for item in self._logprobs(request.params, text)
                    ],
                )
                for index in range(request.params.n or 1)
            ],
            usage=self._usage(),
            billing=pb.Billing(charged_micro_credits=42),
        )

    @translate_errors
    async def StreamChatCompletion(
        self, request: pb.StreamChatCompletionRequest, context: Any
    ) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        await self._begin("StreamChatCompletion", request, context)
        await context.send_initial_metadata(self.script.rate_limits)

        def message(**fields: Any) -> pb.StreamChatCompletionResponse:
            return pb.StreamChatCompletionResponse(
                id=COMPLETION_ID,
                model=request.params.model,
                created=Timestamp(seconds=CREATED),
                **fields,
            )

        yield message(
            choices=[pb.ChatCompletionDelta(index=0, role=inference_pb2.CHAT_ROLE_ASSISTANT)]
        )
        for text in self.script.text:
            logprobs = self._logprobs(request.params, text)
            yield message(
                choices=[pb.ChatCompletionDelta(index=0, content=text, logprobs=logprobs)]
            )
        for index, (id_, name, arguments) in enumerate(self.script.tool_calls):
            half = len(arguments) // 2
            for piece in (
                pb.ToolCallDelta(index=index, id=id_, name=name),
                pb.ToolCallDelta(index=index, arguments=arguments[:half]),
                pb.ToolCallDelta(index=index, arguments=arguments[half:]),
            ):
                yield message(choices=[pb.ChatCompletionDelta(index=0, tool_calls=[piece])])
        if self.script.hang:
            await self._hang()
        if self.script.error_mid_stream is not None:
            raise self.script.error_mid_stream
        finish = self.script.chat_finish_reason
        yield message(choices=[pb.ChatCompletionDelta(index=0, finish_reason=finish)])
        yield message(usage=self._usage(), billing=pb.Billing(charged_micro_credits=42))

    @translate_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        await self._begin("ListModels", request, context)
        return pb.ListModelsResponse(
            models=[
                pb.Model(id=model, owned_by="resultity", created=Timestamp(seconds=CREATED))
                for model in self.models
            ]
        )


class ScriptedCloud(_ScriptedChatCloud):
    """Also serves text completions (every choice answers the scripted text) and
    single models."""

    @translate_errors
    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.GetModelResponse:
        await self._begin("GetModel", request, context)
        if request.model not in self.models:
            raise ModelNotFound(request.model)
        return pb.GetModelResponse(
            model=pb.Model(
                id=request.model, owned_by="resultity", created=Timestamp(seconds=CREATED)
            )
        )

    def _choice_count(self, params: pb.CompletionParams) -> int:
        return len(params.prompts) * (params.n or 1)

    @translate_errors
    async def CreateCompletion(
        self, request: pb.CreateCompletionRequest, context: Any
    ) -> pb.CreateCompletionResponse:
        await self._begin("CreateCompletion", request, context)
        params = request.params
        context.set_trailing_metadata(((GENERATION_MS, str(self.script.generation_ms)),))
        return pb.CreateCompletionResponse(
            id=TEXT_COMPLETION_ID,
            model=params.model,
            created=Timestamp(seconds=CREATED),
            choices=[
                pb.CompletionChoice(
                    index=index,
                    text="".join(self.script.text),
                    finish_reason=self.script.finish_reason,
                    logprobs=[
                        item for text in self.script.text for item in self._logprobs(params, text)
                    ],
                )
                for index in range(self._choice_count(params))
            ],
            usage=self._usage(),
            billing=pb.Billing(charged_micro_credits=42),
        )

    @translate_errors
    async def StreamCompletion(
        self, request: pb.StreamCompletionRequest, context: Any
    ) -> AsyncIterator[pb.StreamCompletionResponse]:
        await self._begin("StreamCompletion", request, context)
        params = request.params

        def message(**fields: Any) -> pb.StreamCompletionResponse:
            return pb.StreamCompletionResponse(
                id=TEXT_COMPLETION_ID,
                model=params.model,
                created=Timestamp(seconds=CREATED),
                **fields,
            )

        yield message()
        for index in range(self._choice_count(params)):
            for text in self.script.text:
                logprobs = self._logprobs(params, text)
                delta = pb.CompletionDelta(index=index, text=text, logprobs=logprobs)
                yield message(choices=[delta])
            if self.script.error_mid_stream is not None:
                raise self.script.error_mid_stream
            delta = pb.CompletionDelta(index=index, finish_reason=self.script.finish_reason)
            yield message(choices=[delta])
        yield message(usage=self._usage(), billing=pb.Billing(charged_micro_credits=42))

    @translate_errors
    async def CreateEmbeddings(
        self, request: pb.CreateEmbeddingsRequest, context: Any
    ) -> pb.CreateEmbeddingsResponse:
        """Input i embeds as (i, 0.5, -0.25)."""
        await self._begin("CreateEmbeddings", request, context)
        return pb.CreateEmbeddingsResponse(
            model=request.model,
            embeddings=[
                pb.Embedding(index=index, values=[float(index), 0.5, -0.25])
                for index in range(len(request.inputs))
            ],
            usage=inference_pb2.Usage(prompt_tokens=self.script.prompt_tokens),
            billing=pb.Billing(charged_micro_credits=42),
        )


async def start_cloud(cloud: ScriptedCloud) -> tuple[grpc.aio.Server, str]:
    """A gRPC server on a free local port hosting `cloud`; returns it and its target."""
    server = grpc.aio.server()
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(cloud, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"
