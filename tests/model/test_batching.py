"""Several generations in one llama.cpp context, against the real SmolLM2-135M model:
greedy output is the same batched as alone, a cancelled stream leaves the others
alone, and a chat's next turn reuses the cached tokens of the previous one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agent.runtime.base import Finished, GenerationRequest, Started, TokenText, Waiting
from agent.runtime.llama_cpp import LlamaCppRuntime
from agent.runtime.models import DEFAULT_MODEL_ID, smollm2_gguf_path
from core.inference import ChatMessage, ChatRole, Continuation, FinishReason, Sampling
from core.prompt_prefixes import prefix_fingerprints

PROMPTS = (
    "Write a long story about a dragon.",
    "Name a colour and explain why you like it.",
    "What is the capital of France? Tell me about it.",
    "Explain gravity to a child.",
)
SLOTS = 4


async def _runtime(slots: int = SLOTS) -> LlamaCppRuntime:
    return await LlamaCppRuntime.load(
        DEFAULT_MODEL_ID, smollm2_gguf_path(), context_length=512, slots=slots
    )


@pytest.fixture
async def batched() -> AsyncIterator[LlamaCppRuntime]:
    runtime = await _runtime()
    yield runtime
    await runtime.close()


@pytest.fixture
async def alone() -> AsyncIterator[LlamaCppRuntime]:
    """A second copy for reference runs, one generation at a time."""
    runtime = await _runtime()
    yield runtime
    await runtime.close()


def _request(messages: tuple[ChatMessage, ...], max_tokens: int = 40) -> GenerationRequest:
    return GenerationRequest(
        model=DEFAULT_MODEL_ID,
        messages=messages,
        sampling=Sampling(max_tokens=max_tokens, temperature=0.0),
        max_prompt_tokens=400,
    )


def _ask(prompt: str, max_tokens: int = 40) -> GenerationRequest:
    return _request((ChatMessage(ChatRole.USER, prompt),), max_tokens)


async def _run(
    runtime: LlamaCppRuntime, request: GenerationRequest, waits: list[Waiting] | None = None
) -> tuple[str, tuple[int, ...], Finished]:
    """The generation's text, token ids and end; its Waiting events go to ``waits``."""
    text, ids, finished = "", (), None
    async for event in runtime.generate(request):
        if isinstance(event, Waiting) and waits is not None:
            waits.append(event)
        elif isinstance(event, TokenText):
            text += event.text
            ids += event.token_ids
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None
    return text, ids, finished


@pytest.mark.model
async def test_concurrent_greedy_streams_equal_their_runs_alone(
    batched: LlamaCppRuntime, alone: LlamaCppRuntime
) -> None:
    expected = [await _run(alone, _ask(prompt)) for prompt in PROMPTS]

    together = await asyncio.gather(*(_run(batched, _ask(prompt)) for prompt in PROMPTS))

    assert together == expected
    assert all(finished.completion_tokens > 0 for _, _, finished in together)


@pytest.mark.model
async def test_more_streams_than_slots_wait_and_all_finish(batched: LlamaCppRuntime) -> None:
    prompts = [f"Count to {n}." for n in range(SLOTS * 2)]
    results = await asyncio.gather(*(_run(batched, _ask(p, 6)) for p in prompts))
    assert [finished.completion_tokens for _, _, finished in results] == [6] * len(prompts)


@pytest.mark.model
async def test_a_cancelled_stream_leaves_the_others_as_they_were(
    batched: LlamaCppRuntime, alone: LlamaCppRuntime
) -> None:
    expected = [await _run(alone, _ask(prompt)) for prompt in PROMPTS[1:]]
    first_text = asyncio.Event()

    async def cancelled() -> None:
        async for event in batched.generate(_ask(PROMPTS[0], 400)):
            if isinstance(event, TokenText):
                first_text.set()

    victim = asyncio.create_task(cancelled())
    others = asyncio.gather(*(_run(batched, _ask(prompt)) for prompt in PROMPTS[1:]))
    await first_text.wait()
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim

    assert await others == expected


@pytest.mark.model
async def test_a_follow_up_turn_reuses_the_cached_conversation_and_answers_as_cold(
    batched: LlamaCppRuntime, alone: LlamaCppRuntime
) -> None:
    system = ChatMessage(ChatRole.SYSTEM, "You are a helpful assistant who loves lighthouses.")
    first = (system, ChatMessage(ChatRole.USER, "Describe a lighthouse in two sentences."))
    reply, _, _ = await _run(batched, _request(first))
    follow_up = (
        *first,
        ChatMessage(ChatRole.ASSISTANT, reply),
        ChatMessage(ChatRole.USER, "Who lives there?"),
    )
    # The conversation so far, as the router will fingerprint the follow-up.
    held = prefix_fingerprints(DEFAULT_MODEL_ID, None, follow_up[:3])
    assert held[-1] in batched.cached_prefixes()
    assert batched.cached_prefixes()[0] == held[-1]  # newest, longest first
    reused_before = batched.reused_tokens

    warm = await _run(batched, _request(follow_up))
    cold = await _run(alone, _request(follow_up))

    assert warm == cold
    # Nearly all of the follow-up's prompt came from the cache: the first turn's
    # prompt and reply, up to where the template closes the reply.
    reused = batched.reused_tokens - reused_before
    assert reused > 0.8 * cold[2].prompt_tokens
    # The generation's end says so (the agent's metrics count it); cold evaluated all.
    assert warm[2].cached_prompt_tokens == reused
    assert cold[2].cached_prompt_tokens < 0.5 * cold[2].prompt_tokens


@pytest.mark.model
async def test_a_continuation_in_a_batch_equals_the_uninterrupted_run(
    batched: LlamaCppRuntime, alone: LlamaCppRuntime
) -> None:
    text, ids, finished = await _run(alone, _ask(PROMPTS[0]))
    delivered = 12
    delivered_text, delivered_ids, _ = await _run(alone, _ask(PROMPTS[0], delivered))
    continued = GenerationRequest(
        model=DEFAULT_MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, PROMPTS[0]),),
        sampling=Sampling(max_tokens=finished.completion_tokens - delivered, temperature=0.0),
        max_prompt_tokens=400,
        continuation=Continuation(delivered_text, delivered, delivered_ids),
    )

    results = await asyncio.gather(
        _run(batched, continued), *(_run(batched, _ask(p)) for p in PROMPTS[1:])
    )

    rest, rest_ids, _ = results[0]
    assert delivered_ids + rest_ids == ids
    assert delivered_text + rest == text


@pytest.mark.model
async def test_a_generation_cancelled_while_queued_ends_without_waiting_for_a_slot() -> None:
    single = await _runtime(slots=1)
    try:
        started = asyncio.Event()

        async def running() -> None:
            async for event in single.generate(_ask(PROMPTS[0], 400)):
                if isinstance(event, TokenText):
                    started.set()

        long = asyncio.create_task(running())
        await started.wait()
        submitted = asyncio.Event()

        async def waiting() -> None:
            async for event in single.generate(_ask(PROMPTS[1])):
                if isinstance(event, Started):
                    submitted.set()  # queued behind the only slot's generation

        queued = asyncio.create_task(waiting())
        await submitted.wait()
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert not long.done()  # the slot's generation goes on meanwhile
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
    finally:
        await single.close()


@pytest.mark.model
async def test_generations_that_outgrow_the_cache_are_preempted_and_still_finish() -> None:
    # 5 slots of 256 tokens share cells for 4 contexts (1024): 5 generations of
    # about 35 prompt and 215 sampled tokens outgrow them.
    crowded = await LlamaCppRuntime.load(
        DEFAULT_MODEL_ID, smollm2_gguf_path(), context_length=256, slots=5
    )
    try:
        prompts = [f"Write a very long story about the number {n}." for n in range(5)]
        waits: list[Waiting] = []
        results = await asyncio.gather(*(_run(crowded, _ask(p, 215), waits) for p in prompts))
        assert crowded.preemptions > 0
        # A preempted generation is told it waits (the network's sign of a working node).
        assert waits
    finally:
        await crowded.close()
    for text, ids, finished in results:
        assert finished.completion_tokens == len(ids) > 0
        assert finished.completion_tokens == 215 or finished.reason is FinishReason.STOP
        assert text


def _turns(topic: str) -> tuple[ChatMessage, ...]:
    return (
        ChatMessage(ChatRole.SYSTEM, f"You are a helpful assistant who loves {topic}."),
        ChatMessage(ChatRole.USER, f"Describe {topic} in two sentences."),
    )


def _follow_up(first: tuple[ChatMessage, ...], reply: str) -> tuple[ChatMessage, ...]:
    return (*first, ChatMessage(ChatRole.ASSISTANT, reply), ChatMessage(ChatRole.USER, "Why?"))


@pytest.mark.model
async def test_a_one_slot_node_keeps_a_conversation_while_it_answers_others(
    alone: LlamaCppRuntime,
) -> None:
    single = await _runtime(slots=1)
    try:
        first = _turns("lighthouses")
        reply, _, _ = await _run(single, _request(first))
        # Another request (another user's, or a canary) takes the only slot meanwhile;
        # it shares the template's first tokens with the conversation, in cells of
        # its own sequence, and answers as alone.
        reused_before = single.reused_tokens
        assert await _run(single, _ask(PROMPTS[1])) == await _run(alone, _ask(PROMPTS[1]))
        assert single.reused_tokens > reused_before
        follow_up = _follow_up(first, reply)
        held = prefix_fingerprints(DEFAULT_MODEL_ID, None, follow_up[:3])
        assert held[-1] in single.cached_prefixes()
        reused_before = single.reused_tokens

        warm = await _run(single, _request(follow_up))
        cold = await _run(alone, _request(follow_up))

        assert warm == cold
        assert single.reused_tokens - reused_before > 0.8 * cold[2].prompt_tokens
    finally:
        await single.close()


@pytest.mark.model
async def test_idle_conversations_make_room_least_recently_used_first() -> None:
    # One slot of 256 cells: six conversations of about 70 tokens outgrow them.
    single = await LlamaCppRuntime.load(
        DEFAULT_MODEL_ID, smollm2_gguf_path(), context_length=256, slots=1
    )
    try:
        topics = ("lighthouses", "volcanoes", "penguins", "glaciers", "deserts", "comets")
        held = []
        for topic in topics:
            first = _turns(topic)
            reply, _, _ = await _run(single, _request(first, 40))
            follow_up = _follow_up(first, reply)
            held.append((follow_up, prefix_fingerprints(DEFAULT_MODEL_ID, None, follow_up[:3])))
        cached = single.cached_prefixes()
        assert held[0][1][-1] not in cached  # evicted, and no longer advertised
        assert held[-1][1][-1] == cached[0]  # the newest, first

        follow_up, _ = held[0]
        reused_before = single.reused_tokens
        _, _, finished = await _run(single, _request(follow_up, 1))
        assert single.reused_tokens - reused_before < 0.5 * finished.prompt_tokens
        assert finished.cached_prompt_tokens == single.reused_tokens - reused_before
    finally:
        await single.close()
