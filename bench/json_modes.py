"""Do JSON modes finish? `response_format: json_object` with the bundled SmolLM2.

``python -m bench.json_modes`` (method and last results: bench/README.md).

Each of 20 varied prompts that ask for JSON runs through the llama.cpp runtime
the agent uses (``LlamaCppRuntime``, bundled SmolLM2-135M-Instruct, one slot)
with ``response_format: json_object``, greedy and sampled (temperature 0.7,
fixed seeds), under two grammars:

- ``library``: llama-cpp-python's ``JSON_GBNF``, what the runtime used before
  (free whitespace, unbounded nesting and strings);
- ``bounded``: the runtime's own JSON grammar (``agent.runtime.sampling``).

A reply counts as finished when its finish reason is ``stop`` and its text
parses as a JSON object. Each reply records the machine's load
(bench/machine_load.py); its seconds are stated across replies.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

from llama_cpp.llama_grammar import JSON_GBNF

from agent.runtime import json_grammar, sampling
from agent.runtime.base import Finished, GenerationRequest, TokenText
from agent.runtime.llama_cpp import LlamaCppRuntime
from agent.runtime.models import DEFAULT_MODEL_ID, smollm2_gguf_path
from bench.machine_load import MARKS, LoadSample, MachineLoad, cell
from core import event_loop
from core.inference import (
    ChatMessage,
    ChatRole,
    FinishReason,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
)

SYSTEM = "You are a helpful assistant. Answer in JSON."
PROMPTS = (
    "Describe a cat as a JSON object with its name, age and color.",
    "Give me a JSON object listing three fruits and their colors.",
    "Return the capital cities of France, Spain and Italy as JSON.",
    "Create a JSON user profile with a name, an email and a list of hobbies.",
    "Output a JSON object describing today's weather: temperature, humidity, conditions.",
    "Write a pancake recipe as JSON with ingredients and steps.",
    "Represent a book (title, author, year, genres) as JSON.",
    "Write a JSON object that maps the numbers one to five to their squares.",
    "Give a JSON summary of the first four planets of the solar system.",
    "Produce a JSON shopping cart with items, quantities and a total price.",
    "Return JSON with the keys question and answer for a trivia question about history.",
    "Describe a car in JSON: make, model, year and features.",
    "Create a JSON configuration for a web server: host, port, TLS enabled, routes.",
    "Translate 'hello' into French, Spanish and German and answer in JSON.",
    "Recommend a movie in JSON: title, reason and a rating out of ten.",
    "Is 17 a prime number? Answer in JSON and include your reasoning.",
    "List the days of the week in JSON.",
    "Describe a company in JSON with its employees, each with a name and a role.",
    "Give the sentiment and keywords of 'I love sunny days at the beach' as JSON.",
    "Represent the chess move knight from g1 to f3 as a JSON object.",
)
# Odd prompts get the system message, so both chat shapes are covered.
GRAMMARS = {"library": JSON_GBNF, "bounded": json_grammar.JSON_OBJECT_GBNF}
SAMPLED_TEMPERATURE = 0.7


@dataclass(frozen=True)
class Outcome:
    grammar: str
    prompt: int
    temperature: float
    finish_reason: str
    completion_tokens: int
    parses: bool
    seconds: float
    text: str
    load: LoadSample

    @property
    def finished(self) -> bool:
        return self.finish_reason == FinishReason.STOP and self.parses


def _messages(index: int, prompt: str) -> tuple[ChatMessage, ...]:
    user = ChatMessage(ChatRole.USER, prompt)
    return (ChatMessage(ChatRole.SYSTEM, SYSTEM), user) if index % 2 else (user,)


def _parses_as_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


async def _run_one(
    runtime: LlamaCppRuntime,
    grammar: str,
    index: int,
    temperature: float,
    max_tokens: int,
    load: MachineLoad,
) -> Outcome:
    request = GenerationRequest(
        model=DEFAULT_MODEL_ID,
        messages=_messages(index, PROMPTS[index]),
        sampling=Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            seed=index,
            response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT),
        ),
        max_prompt_tokens=1024,
    )
    parts: list[str] = []
    finished: Finished | None = None
    load.wait_for_quiet()
    round_began = load.start()
    began = time.monotonic()
    # The runtime's json_object grammar, replaced meanwhile.
    with mock.patch.object(sampling, "JSON_OBJECT_GBNF", GRAMMARS[grammar]):
        async for event in runtime.generate(request):
            if isinstance(event, TokenText):
                parts.append(event.text)
            elif isinstance(event, Finished):
                finished = event
    assert finished is not None
    seconds = round(time.monotonic() - began, 2)
    sample = load.stop(round_began, f"{grammar} t={temperature} #{index}")
    text = "".join(parts)
    return Outcome(
        grammar,
        index,
        temperature,
        finished.reason.value,
        finished.completion_tokens,
        _parses_as_object(text),
        seconds,
        text,
        sample,
    )


async def _main(args: argparse.Namespace, load: MachineLoad) -> list[Outcome]:
    runtime = await LlamaCppRuntime.load(
        DEFAULT_MODEL_ID, smollm2_gguf_path(), n_threads=args.threads
    )
    outcomes = []
    try:
        for grammar in args.grammar:
            for temperature in args.temperature:
                for index in range(len(PROMPTS)):
                    outcome = await _run_one(
                        runtime, grammar, index, temperature, args.max_tokens, load
                    )
                    outcomes.append(outcome)
                    print(
                        f"{grammar:8} t={temperature} #{index:2} {outcome.finish_reason:6} "
                        f"{outcome.completion_tokens:4} tokens parses={outcome.parses} "
                        f"{outcome.seconds:.2f} s | {outcome.load.describe()}",
                        flush=True,
                    )
                    if args.json is not None:
                        with args.json.open("a") as replies:
                            replies.write(json.dumps(asdict(outcome)) + "\n")
    finally:
        await runtime.close()
    return outcomes


def _summary(outcomes: Sequence[Outcome]) -> list[dict[str, object]]:
    rows = []
    for grammar in dict.fromkeys(o.grammar for o in outcomes):
        for temperature in dict.fromkeys(o.temperature for o in outcomes):
            group = [o for o in outcomes if o.grammar == grammar and o.temperature == temperature]
            rows.append(
                {
                    "grammar": grammar,
                    "temperature": temperature,
                    "finished": sum(o.finished for o in group),
                    "stop": sum(o.finish_reason == FinishReason.STOP for o in group),
                    "parses": sum(o.parses for o in group),
                    "of": len(group),
                    "mean_completion_tokens": round(
                        sum(o.completion_tokens for o in group) / len(group), 1
                    ),
                    "seconds": round(sum(o.seconds for o in group), 1),
                    "seconds_per_reply": cell(
                        [o.seconds for o in group], [o.load for o in group], "{:.2f}"
                    ),
                }
            )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.json_modes", description=__doc__)
    parser.add_argument(
        "--grammar", action="append", choices=sorted(GRAMMARS), help="default: both"
    )
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--temperature",
        action="append",
        type=float,
        help=f"default: 0 (greedy) and {SAMPLED_TEMPERATURE}",
    )
    parser.add_argument("--json", type=Path, help="append every reply here, one JSON per line")
    args = parser.parse_args(argv)
    args.grammar = args.grammar or list(GRAMMARS)
    args.temperature = args.temperature or [0.0, SAMPLED_TEMPERATURE]
    load = MachineLoad()  # the runtime runs in this process
    for row in _summary(event_loop.run(_main(args, load))):
        print(json.dumps(row))
    print(f"seconds_per_reply: median [min..max] sd; {MARKS}")
    print(load.summary())


if __name__ == "__main__":
    main()
