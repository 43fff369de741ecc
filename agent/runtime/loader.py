"""Choosing and loading a runtime backend by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.runtime.base import Runtime
from agent.runtime.models import DEFAULT_MODEL_ID, smollm2_gguf_path

RUNTIMES = ("llama.cpp",)


@dataclass(frozen=True)
class RuntimeSettings:
    runtime: str = "llama.cpp"
    model_id: str = DEFAULT_MODEL_ID
    # Unset: the SmolLM2 GGUF bundled with the `llama` extra.
    model_path: Path | None = None
    context_length: int = 2048
    slots: int = 1
    threads: int | None = None


async def load_runtime(settings: RuntimeSettings) -> Runtime:
    if settings.runtime == "llama.cpp":
        from agent.runtime.llama_cpp import LlamaCppRuntime

        return await LlamaCppRuntime.load(
            settings.model_id,
            settings.model_path or smollm2_gguf_path(),
            context_length=settings.context_length,
            slots=settings.slots,
            n_threads=settings.threads,
        )
    raise ValueError(f"unknown runtime {settings.runtime!r}; available: {', '.join(RUNTIMES)}")
