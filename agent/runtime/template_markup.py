"""A rendered chat prompt split into the template's control tokens and plain text.

A chat template writes its control tokens (ChatML's ``<|im_start|>``,
``<|im_end|>``) as text. Tokenizing the rendered prompt with special tokens
parsed would also read a caller's text that spells them as control tokens: a
message could end its turn early or forge a system turn. So only the control
tokens the template itself writes become control tokens; every caller string
(content, names, tool calls and results, tool definitions) stays plain text.

How: the template is rendered with every caller string and again with each
replaced by a sentinel (a random nonce and an index, which no caller string
contains). Control tokens are looked for only between the sentinels; in the
real rendering the caller strings take the sentinels' places. The text between
two control tokens is tokenized as one piece, template and caller text alike,
as llama.cpp splits a prompt at its special tokens, so a prompt without markup
in its caller text gets exactly the tokens a whole-string tokenization gives.

A template that transforms what it is given (``| trim``, ``| tojson`` escaping
quotes, a branch on a message's text) renders something else than the
sentinels' places filled in. Then the real rendering is split at every control
token, which is safe only if those are the template's own: the same ones, in
the same order, as in the sentinel rendering; otherwise the request is refused.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping

from agent.runtime.base import InvalidRequest

# Plain text to tokenize as such, or a control token's id.
Piece = str | int
# Renders the prompt with each caller string as the given function maps it.
Render = Callable[[Callable[[str], str]], str]

MESSAGES_FIELD = "messages"


class ControlTokens:
    """The texts of a vocabulary's control tokens (those llama.cpp reads from text
    only when special tokens are parsed) and their ids."""

    def __init__(self, ids: Mapping[str, int]) -> None:
        self._ids = dict(ids)
        self._texts = {token: text for text, token in self._ids.items()}
        # Longest first, as llama.cpp matches them.
        texts = sorted(self._ids, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(text) for text in texts)) if texts else None

    def text(self, token: int) -> str:
        return self._texts[token]

    def split(self, text: str) -> list[Piece]:
        """The text with every control token's spelling read as that token."""
        if self._pattern is None:
            return [text] if text else []
        pieces: list[Piece] = []
        start = 0
        for match in self._pattern.finditer(text):
            if match.start() > start:
                pieces.append(text[start : match.start()])
            pieces.append(self._ids[match.group()])
            start = match.end()
        if start < len(text):
            pieces.append(text[start:])
        return pieces


def prompt_pieces(render: Render, control: ControlTokens) -> list[Piece]:
    """The prompt ``render`` makes, as plain text runs and the control tokens the
    template itself writes (adjacent text merged into one run)."""
    real = render(_verbatim)
    while True:
        sentinels = _Sentinels()
        marked = render(sentinels)
        if not any(sentinels.nonce in text for text in sentinels.texts):
            break
    parts = sentinels.pattern.split(marked)
    pieces: list[Piece] = []
    for index, part in enumerate(parts):
        if index % 2:
            pieces.append(sentinels.texts[int(part)])
        else:
            pieces.extend(control.split(part))
    if _spelled(pieces, control) == real:
        return _merged(pieces)
    template_tokens = [piece for piece in pieces if isinstance(piece, int)]
    split = control.split(real)
    if [piece for piece in split if isinstance(piece, int)] != template_tokens:
        raise InvalidRequest(
            "message text contains the model's control tokens, which its chat template "
            "does not let the node keep as plain text",
            MESSAGES_FIELD,
        )
    return split


def _verbatim(text: str) -> str:
    return text


class _Sentinels:
    """Stands in for caller strings, remembering them (empty ones stay empty: they hold
    no markup, and templates test them for emptiness)."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(16)
        self.pattern = re.compile(f"{self.nonce}_([0-9]+)_")
        self.texts: list[str] = []

    def __call__(self, text: str) -> str:
        if not text:
            return text
        self.texts.append(text)
        return f"{self.nonce}_{len(self.texts) - 1}_"


def _spelled(pieces: list[Piece], control: ControlTokens) -> str:
    return "".join(piece if isinstance(piece, str) else control.text(piece) for piece in pieces)


def _merged(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        elif piece != "":
            merged.append(piece)
    return merged
