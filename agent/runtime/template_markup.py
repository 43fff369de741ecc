"""A rendered chat prompt split into the template's control tokens and plain text.

A chat template writes its control tokens (ChatML's ``<|im_start|>``,
``<|im_end|>``) as text. Tokenizing the rendered prompt with special tokens
parsed would also read a caller's text that spells them as control tokens: a
message could end its turn early or forge a system turn. So only the control
tokens the template itself writes become control tokens; every caller string
(content, names, tool calls and results, tool definitions) stays plain text.

How: the template is rendered as it is, and again with each caller string
wrapped in markers (a random nonce, which no caller string contains). Control
tokens are looked for only outside the markers; what is inside is the caller's
text as the template wrote it (``| tojson`` escapes it, the markers stay). If
that rendering without its markers is the real one, the text between two
control tokens is tokenized as one piece, template and caller text alike, as
llama.cpp splits a prompt at its special tokens: a prompt without markup in
its callers' text gets exactly the tokens a whole-string tokenization gives.

A template that changes what it is given otherwise (``| trim`` on text with
outer spaces, a branch on a message's text) renders something else. Then the
real rendering is split at every control token, which is safe only if those
are the template's own: the same ones, in the same order, as it writes with
stand-ins for the caller strings; if not, the request is refused.
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
        markers = _Markers()
        wrapped = render(markers.wrap)
        if not any(markers.nonce in text for text in markers.texts):
            break
    pieces = markers.pieces(wrapped, control)
    if pieces is not None and _spelled(pieces, control) == real:
        return _merged(pieces)
    # The template changed what it was given: its control tokens are those it writes
    # around stand-ins that hold none.
    template_tokens = _tokens(control.split(render(markers.stand_in)))
    split = control.split(real)
    if _tokens(split) != template_tokens:
        raise InvalidRequest(
            "message text contains the model's control tokens, which its chat template "
            "does not let the node keep as plain text",
            MESSAGES_FIELD,
        )
    return split


def _verbatim(text: str) -> str:
    return text


class _Markers:
    """Marks caller strings in a rendering with a nonce of digits (which no caller
    string contains, and which case changes, trimming and JSON escaping keep).
    Empty strings stay empty: they hold no markup, and templates test them."""

    def __init__(self) -> None:
        self.nonce = f"{secrets.randbits(128):039d}"
        self._pattern = re.compile(f"{self.nonce}([01])")
        self.texts: list[str] = []

    def wrap(self, text: str) -> str:
        if not text:
            return text
        self.texts.append(text)
        return f"{self.nonce}0{text}{self.nonce}1"

    def stand_in(self, text: str) -> str:
        return self.nonce if text else text

    def pieces(self, wrapped: str, control: ControlTokens) -> list[Piece] | None:
        """The rendering with the template's text split at control tokens and the
        (rendered) caller text between its markers kept whole; None if the markers do
        not pair up."""
        pieces: list[Piece] = []
        start = 0
        inside = False
        for match in self._pattern.finditer(wrapped):
            if inside != (match.group(1) == "1"):
                return None
            text = wrapped[start : match.start()]
            pieces.extend([text] if inside else control.split(text))
            inside = not inside
            start = match.end()
        if inside:
            return None
        pieces.extend(control.split(wrapped[start:]))
        return pieces


def _tokens(pieces: list[Piece]) -> list[int]:
    return [piece for piece in pieces if isinstance(piece, int)]


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
