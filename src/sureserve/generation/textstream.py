"""Turning generated token ids into safe text deltas, with stop strings.

Tokens and characters do not line up: one character may take several byte-level tokens
(an emoji), and a stop string may start in one token and end three tokens later. So the
generated ids are decoded as a whole after every token (cheap next to a forward pass) and
only the part that can no longer change is released:

- a trailing U+FFFD is held back (an unfinished UTF-8 sequence, completed by a later token);
- the longest tail that is a prefix of some stop string is held back, so a stop string is
  never half-streamed before it is recognised;
- when a stop string appears, the text ends just before it (the stop string is not
  returned, as in the OpenAI API).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.stops = tuple(stops)
        self.text = ""  # everything decoded so far (stop string included, when hit)
        self.sent = 0  # characters already released

    def push(self, token_ids: Sequence[int], final: bool = False) -> tuple[str, bool]:
        """Decode ``token_ids`` (all generated so far); return (new safe text, stop hit).

        ``final`` releases everything held back (the sequence ended for another reason)."""
        self.text = self.tok.decode(list(token_ids), skip_special_tokens=True)
        cut = self._first_stop()
        if cut is not None:
            delta = self.text[self.sent:cut]
            self.sent = cut
            return delta, True
        end = len(self.text)
        if not final:
            end -= self._held_back()
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta, False

    @property
    def released(self) -> str:
        return self.text[:self.sent]

    def _first_stop(self) -> int | None:
        # a stop string could straddle the released part only up to its own length
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        t = self.text
        keep = len(t) - len(t.rstrip("\ufffd"))
        for s in self.stops:
            for k in range(min(len(s) - 1, len(t)), 0, -1):
                if t.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        return keep
