"""Incremental JSON reading for tool-call arguments: how far a model's JSON is valid, compacted.

A model writes a call's arguments a few characters at a time, and streaming clients get
them in pieces whose concatenation must equal the final `function.arguments`. So the
arguments are never the model's raw text: `scan_json` reads one JSON value token by token
and writes each complete token in compact form (no whitespace, strings and numbers as
`json.dumps(..., ensure_ascii=False, separators=(",", ":"))` writes them). A token is
written only once nothing that follows can change it, so the compact text of a prefix is
always a prefix of the compact text of the whole: that is what makes streamed arguments
add up. For ordinary JSON the result equals `json.dumps(json.loads(raw))` compacted;
duplicate keys are kept as written (json.loads would keep only the last).

Lenient where models are sloppy and nothing is lost: raw control characters (a newline)
inside strings are accepted and written escaped. Never raises: a syntax error ends the scan
with status "error" and the compact text of the valid part.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Literal

WHITESPACE = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_START = re.compile(r"-?(?:0|[1-9][0-9]*)?(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?")
_PLAIN = re.compile(r'[^"\\]*')
_SURROGATE = re.compile("[\ud800-\udfff]")
_LITERALS = ("true", "false", "null")
MAX_DEPTH = 128
"""Nesting deeper than this is treated as an error: no schema needs it and it bounds the work."""

Status = Literal["complete", "partial", "error"]


@dataclass
class JsonScan:
    """What `scan_json` read: `compact` text of the valid part, `end` (index after it), `status`.

    "complete": one whole value was read and ends at `end`. "partial": the text ran out
    inside the value (more may come). "error": the text at `end` cannot continue the value.
    `value` is the decoded value when complete (None otherwise).
    """

    compact: str
    end: int
    status: Status
    value: object = None


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in WHITESPACE:
        pos += 1
    return pos


def dump_string(value: str) -> str:
    """`value` as a JSON string literal, non-ASCII kept, lone surrogates escaped (they cannot be UTF-8)."""
    text = json.dumps(value, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def compact_dumps(value: object) -> str:
    """The compact JSON text of a decoded value, as `scan_json` would write it."""
    if isinstance(value, str):
        return dump_string(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{dump_string(str(k))}:{compact_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(compact_dumps(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "null"
    return json.dumps(value)


def read_string(text: str, pos: int) -> tuple[str | None, int, str]:
    """Read the string literal whose opening quote is at `pos`.

    Returns (decoded value or None when unfinished/invalid, index after what was read,
    decoded text of the safely complete part). The index is len(text) when it ran out.
    """
    i = pos + 1
    n = len(text)
    safe_end = i  # end of the raw part whose escapes are all complete
    while i < n:
        plain = _PLAIN.match(text, i).end()  # a run without quotes or escapes, at C speed
        if plain > i:
            i = safe_end = plain
            continue
        ch = text[i]
        if ch == '"':
            decoded = _decode(text[pos + 1:i])
            if decoded is None:
                return None, i, _decode(text[pos + 1:safe_end]) or ""
            return decoded, i + 1, decoded
        if ch == "\\":
            width = _escape_width(text, i)
            if width is None:
                return None, i, _decode(text[pos + 1:safe_end]) or ""
            if width == 0:  # runs past the end
                break
            i += width
        else:
            i += 1
        safe_end = i
    return None, n, _decode(text[pos + 1:safe_end]) or ""


def _escape_width(text: str, i: int) -> int | None:
    """Length of the escape at `i`; 0 when the text ends inside it; None when it is invalid."""
    if i + 1 >= len(text):
        return 0
    kind = text[i + 1]
    if kind in '"\\/bfnrt':
        return 2
    if kind != "u":
        return None
    digits = text[i + 2:i + 6]
    if len(digits) < 4:
        return 0 if all(c in "0123456789abcdefABCDEF" for c in digits) else None
    if not all(c in "0123456789abcdefABCDEF" for c in digits):
        return None
    # A high surrogate is held until its low half is known, or the pair would be written
    # as two escapes now and as one character later.
    if 0xD800 <= int(digits, 16) <= 0xDBFF:
        rest = text[i + 6:i + 8]
        if rest in ("", "\\") or (rest == "\\u" and len(text) < i + 12):
            return 0
    return 6


def _decode(raw: str) -> str | None:
    try:
        return json.loads('"' + raw + '"', strict=False)
    except ValueError:
        return None


def _number(text: str, pos: int, final: bool) -> tuple[str | None, int, Status]:
    if not final and _NUMBER_START.fullmatch(text, pos):
        return None, pos, "partial"  # `12`, `2.`, `1e-`: more may follow
    match = _NUMBER.match(text, pos)
    if not match or match.end() == pos:
        if pos < len(text) and text[pos] == "-" and pos + 1 == len(text) and not final:
            return None, pos, "partial"
        return None, pos, "error"
    end = match.end()
    if end == len(text) and not final:
        return None, pos, "partial"  # more digits may follow
    if end < len(text) and text[end] in ".eE+-0123456789":
        return None, pos, "error"  # `1.`, `1e`, `01`
    token = match.group()
    value = json.loads(token)
    if isinstance(value, float) and not math.isfinite(value):
        return token, end, "complete"
    return json.dumps(value), end, "complete"


def _literal(text: str, pos: int) -> tuple[str | None, int, Status]:
    for word in _LITERALS:
        piece = text[pos:pos + len(word)]
        if piece == word:
            return word, pos + len(word), "complete"
        if piece and word.startswith(piece) and pos + len(piece) == len(text):
            return None, pos, "partial"
    return None, pos, "error"


class _Reader:
    """One scan's state: the text, the compact output so far, and the open containers."""

    def __init__(self, text: str, final: bool) -> None:
        self.text = text
        self.final = final
        self.out: list[str] = []
        self.stack: list[list[object]] = []  # [kind, state, container, pending key]
        self.result: object = None

    def scalar(self, pos: int) -> tuple[int, Status, object]:
        """Read a string, number or literal at `pos` (whitespace skipped)."""
        text = self.text
        ch = text[pos]
        if ch == '"':
            value, end, safe = read_string(text, pos)
            if value is not None:
                self.out.append(dump_string(value))
                return end, "complete", value
            if end >= len(text):
                self.out.append(dump_string(safe)[:-1])
                return len(text), "partial", None
            self.out.append(dump_string(safe)[:-1])
            return end, "error", None
        if ch == "-" or ch.isdigit():
            token, end, status = _number(text, pos, self.final)
        else:
            token, end, status = _literal(text, pos)
        if token is None:
            return pos if status == "error" else len(text), status, None
        self.out.append(token)
        return end, status, json.loads(token)


def scan_json(text: str, pos: int = 0, *, final: bool = True) -> JsonScan:
    """Read one JSON value starting at `pos` (leading whitespace skipped).

    `final`: the text is all there will be (a number at the very end is complete); when
    False a number at the end is held back, since more digits may follow.
    """
    reader = _Reader(text, final)
    try:
        end, status = _scan(reader, pos)
    except RecursionError:  # pragma: no cover - the depth limit comes first
        end, status = pos, "error"
    value = reader.result if status == "complete" else None
    return JsonScan("".join(reader.out), end, status, value)


def _scan(r: _Reader, pos: int) -> tuple[int, Status]:
    text = r.text
    n = len(text)
    # Frames: [kind ("{" or "["), expecting, container, key]; expecting is one of
    # "value", "first" (value or close), "key", "firstkey" (key or close), "colon", "sep".
    stack = r.stack
    expecting = "value"
    while True:
        pos = skip_ws(text, pos)
        if pos >= n:
            return n, "partial"
        ch = text[pos]
        frame = stack[-1] if stack else None
        if expecting in ("key", "firstkey"):
            if ch == "}" and expecting == "firstkey":
                pos, expecting = _close(r, pos)
                if expecting == "done":
                    return pos, "complete"
            elif ch == '"':
                out_len = len(r.out)
                key, end, _ = read_string(text, pos)
                if key is None:
                    del r.out[out_len:]
                    return (n, "partial") if end >= n else (end, "error")
                r.out.append(dump_string(key) + ":")
                frame[3] = key  # type: ignore[index]
                pos = skip_ws(text, end)
                if pos >= n:
                    r.out.pop()
                    return n, "partial"
                if text[pos] != ":":
                    r.out.pop()
                    return pos, "error"
                pos, expecting = pos + 1, "value"
            else:
                return pos, "error"
            continue
        if expecting == "sep":
            if ch == ",":
                r.out.append(",")
                pos += 1
                expecting = "key" if frame[0] == "{" else "value"  # type: ignore[index]
            elif ch == ("}" if frame[0] == "{" else "]"):  # type: ignore[index]
                pos, expecting = _close(r, pos)
                if expecting == "done":
                    return pos, "complete"
            else:
                return pos, "error"
            continue
        # expecting a value (or, in a fresh array, its close)
        if ch == "]" and expecting == "first":
            pos, expecting = _close(r, pos)
            if expecting == "done":
                return pos, "complete"
            continue
        if ch in "{[":
            if len(stack) >= MAX_DEPTH:
                return pos, "error"
            stack.append([ch, "", {} if ch == "{" else [], None])
            r.out.append(ch)
            pos += 1
            expecting = "firstkey" if ch == "{" else "first"
            continue
        end, status, value = r.scalar(pos)
        if status != "complete":
            return end, status
        pos = end
        if not stack:
            r.result = value
            return pos, "complete"
        _store(stack[-1], value)
        expecting = "sep"


def _store(frame: list[object], value: object) -> None:
    container = frame[2]
    if isinstance(container, dict):
        container[frame[3]] = value
    else:
        container.append(value)  # type: ignore[attr-defined]


def _close(r: _Reader, pos: int) -> tuple[int, str]:
    frame = r.stack.pop()
    r.out.append("}" if frame[0] == "{" else "]")
    if not r.stack:
        r.result = frame[2]
        return pos + 1, "done"
    _store(r.stack[-1], frame[2])
    return pos + 1, "sep"
