"""A llama.cpp model's prompts as token ids: a chat through the model's chat
template, a text completion's prompt as it is.

Only the control tokens the template itself writes are read as such; every
caller string, and a text completion's whole prompt (text, as OpenAI's
completions take it), is tokenized as plain text (``template_markup.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from agent.runtime.base import GenerationError
from agent.runtime.chat_prompt import template_inputs
from agent.runtime.llama_vocab import Vocab
from agent.runtime.template_markup import prompt_pieces
from core.inference import ChatMessage, ToolUse


class PromptTokenizer:
    """Tokenizes prompts with a model's vocabulary and chat template."""

    def __init__(self, llama: llama_cpp.Llama, vocab: Vocab) -> None:
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError("the GGUF has no tokenizer.chat_template")
        self._vocab = vocab
        self._source = str(template)
        self._formatter = Jinja2ChatFormatter(
            template=self._source,
            eos_token=vocab.text(llama.token_eos()),
            bos_token=vocab.text(llama.token_bos()),
            add_generation_prompt=True,
        )

    def chat(self, messages: tuple[ChatMessage, ...], tool_use: ToolUse | None) -> list[int]:
        """The messages (and tools) templated, with the generation prompt."""

        def render(caller_text: Callable[[str], str]) -> str:
            inputs = template_inputs(messages, tool_use, self._source, caller_text)
            try:
                return str(self._formatter(**inputs).prompt)
            except Exception as exc:
                # Chat templates are model-supplied Jinja; they reject input by raising.
                raise GenerationError(f"chat template rejected the messages: {exc}") from exc

        return self._vocab.tokenize(prompt_pieces(render, self._vocab.control))

    def text(self, prompt: str) -> list[int]:
        """A raw prompt, no template: plain text (BOS where the model wants one)."""
        return self._vocab.tokenize([prompt])
