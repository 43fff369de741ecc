"""Incremental detokenization with stop sequences, independent of any backend.

A backend feeds the bytes of each sampled token to ``TextStream.push`` and gets
back the text that is safe to show now:

- only whole characters: a UTF-8 sequence split across tokens is held until it
  completes (bytes that can never form a character become U+FFFD);
- nothing at or after the first stop sequence: once one appears, ``stopped``
  is set, the text before it is returned and everything later is dropped;
- a tail that could still grow into a stop sequence is held back until the
  next token rules it in or out, or ``finish`` releases it at the end.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable


class TextStream:
    def __init__(self, stop: Iterable[str] = ()) -> None:
        # An empty stop string would match at once; it means "no stop".
        self._stops = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that became showable."""
        if self.stopped:
            return ""
        return self._scan(self._decoder.decode(data))

    def finish(self) -> str:
        """End of generation: return everything still held (unless stopped)."""
        if self.stopped:
            return ""
        text = self._scan(self._decoder.decode(b"", final=True))
        if self.stopped:
            return text
        held, self._held = self._held, ""
        return text + held

    def _scan(self, new: str) -> str:
        text = self._held + new
        # Emitted text never contains the start of a stop (it is held instead),
        # so searching held + new finds every occurrence.
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._stop_prefix_length(text)
        split = len(text) - keep
        self._held = text[split:]
        return text[:split]

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop sequence."""
        for length in range(min(len(text), self._longest_stop - 1), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self._stops):
                return length
        return 0
