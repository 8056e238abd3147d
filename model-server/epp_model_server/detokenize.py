"""Incremental detokenization with stop strings (pure).

Text deltas are produced the way vLLM's incremental detokenizer does it: decode a window of recent ids
and emit what it adds beyond the previous window, holding back output that ends in an incomplete UTF-8
sequence (the replacement character). A stop string ends generation: the text is cut before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop = list(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._emitted = 0
        self.text = ""
        self.stopped_on: str | None = None

    def add(self, token_ids: Sequence[int]) -> str:
        """Appends ids; returns the text that is now final.

        With stop strings, text that could be the start of a stop string is held back until the next
        tokens decide it (`flush` releases it when generation ends otherwise).
        """
        if self.stopped_on is not None or not token_ids:
            return ""
        self._ids.extend(token_ids)
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._tok.decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_INCOMPLETE):
            return ""
        new_text = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if not self._stop:
            self.text += new_text
            return self.flush()
        search_from = max(0, len(self.text) - self._max_stop + 1)
        self.text += new_text
        best: tuple[int, str] | None = None
        for s in self._stop:
            pos = self.text.find(s, search_from)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            self.text = self.text[: best[0]]
            self.stopped_on = best[1]
            return self.flush()
        held = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        end = max(self._emitted, len(self.text) - held)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def flush(self) -> str:
        """Releases any held-back text (call when generation ends)."""
        delta = self.text[self._emitted :]
        self._emitted = len(self.text)
        return delta
