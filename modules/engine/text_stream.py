"""Turning a stream of token ids into safe text deltas.

Two small state machines used by the generator's token loop:
- IncrementalDetokenizer never emits half a UTF-8 character and keeps the leading space
  a token carries (it decodes a short window that starts inside the prompt).
- StopMatcher finds stop strings even when they arrive split across tokens, and holds
  back only the text that could still become a stop string, so none ever leaks out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
#: Prompt tokens decoded with the reply: enough context for the first token's spacing.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Text deltas for token ids added one at a time (vLLM's prefix/read offsets)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_tail: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_tail[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        """The new text this token completes; "" while a character is still incomplete."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (invalid bytes come out as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopMatcher:
    """Cuts the output at the first stop string, wherever token boundaries fall."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hits = [(i, s) for s in self._stops if (i := buf.find(s)) >= 0]
        if hits:
            index, self.matched = min(hits)
            self._held = ""
            return buf[:index], True
        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Text held back as a possible stop-string prefix, released at the end."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest end of `buf` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
