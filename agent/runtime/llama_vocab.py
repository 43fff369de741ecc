"""A llama.cpp model's vocabulary: tokenizing, token pieces, log-probabilities."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

import llama_cpp
import llama_cpp.llama_cpp as llama_lib
import numpy as np

from agent.runtime.template_markup import ControlTokens, Piece
from core.inference import TokenLogprob, TopLogprob, token_text

# Tokens llama.cpp reads from text only when special tokens are parsed.
_CONTROL_ATTRS = llama_lib.LLAMA_TOKEN_ATTR_CONTROL | llama_lib.LLAMA_TOKEN_ATTR_UNKNOWN


class Vocab:
    """Tokenizer-level calls on a model's vocabulary (thread-safe in llama.cpp)."""

    def __init__(self, llama: llama_cpp.Llama) -> None:
        self._llama = llama
        self._ptr = llama_lib.llama_model_get_vocab(llama.model)
        # Bytes of the longest token (81 for SmolLM2); found once, in ~0.1 s.
        self.longest_piece = max(len(self.piece(token)) for token in range(self.size))
        self.control = ControlTokens(
            {
                self.text(token): token
                for token in range(self.size)
                if llama_lib.llama_vocab_get_attr(self._ptr, token) & _CONTROL_ATTRS
                and self.text(token)
            }
        )

    def tokenize(self, pieces: Iterable[Piece]) -> list[int]:
        """A prompt: its text pieces as plain text, its control tokens as they are
        (template_markup.py), and BOS where the model wants one."""
        tokens: list[int] = []
        for piece in pieces:
            tokens.extend(self.tokenize_text(piece) if isinstance(piece, str) else [piece])
        bos = llama_lib.llama_vocab_bos(self._ptr)
        # Templates usually write BOS themselves; add it only where the model
        # wants one and the template left it out.
        if llama_lib.llama_vocab_get_add_bos(self._ptr) and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        return tokens

    @property
    def size(self) -> int:
        return int(llama_lib.llama_vocab_n_tokens(self._ptr))

    def tokenize_text(self, text: str) -> list[int]:
        """Plain text (special-token markup stays text), no BOS."""
        if not text:
            return []
        tokens: list[int] = self._llama.tokenize(text.encode(), add_bos=False, special=False)
        return tokens

    def is_end(self, token: int) -> bool:
        return bool(llama_lib.llama_vocab_is_eog(self._ptr, token))

    def piece(self, token: int) -> bytes:
        # Own buffer handling: llama-cpp-python's detokenize mangles pieces over 32 bytes.
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = llama_lib.llama_token_to_piece(self._ptr, token, buffer, size, 0, False)
            if n >= 0:
                return buffer.raw[:n]
            size = -n

    def text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(llama_lib.llama_vocab_get_text(self._ptr, token)).decode()

    def logprob(
        self, ctx: llama_lib.llama_context_p, row: int, token: int, top: int
    ) -> TokenLogprob:
        """The token's log-probability under the model's raw distribution (before
        temperature, penalties or grammar) in the last decode's logits ``row``, and the
        ``top`` most likely tokens there."""
        pointer = llama_lib.llama_get_logits_ith(ctx, row)
        logits = np.ctypeslib.as_array(pointer, shape=(self.size,)).astype(np.float64)
        peak = float(logits.max())
        normalizer = peak + float(np.log(np.exp(logits - peak).sum()))
        alternatives: tuple[TopLogprob, ...] = ()
        if top > 0:
            best = np.argpartition(-logits, top - 1)[:top]
            best = best[np.argsort(-logits[best], kind="stable")]
            pieces = [self.piece(int(i)) for i in best]
            alternatives = tuple(
                TopLogprob(token_text(piece), piece, float(logits[i]) - normalizer)
                for piece, i in zip(pieces, best, strict=True)
            )
        piece = self.piece(token)
        logprob = float(logits[token]) - normalizer
        return TokenLogprob(token_text(piece), piece, logprob, alternatives)
