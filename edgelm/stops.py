"""Stop strings over a stream of text pieces.

A stop string may arrive split across tokens, so text that could be the start of a
stop string is held back until it either completes the stop (everything from the stop
on is dropped) or can no longer match (it is released).
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Feed new text; return what is safe to emit now."""
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        text = self._held + piece
        first = min(((text.find(s), s) for s in self.stops if s in text), default=None)
        if first is not None:
            self.stopped = True
            self._held = ""
            return text[: first[0]]
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of generation, release what was held back."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
