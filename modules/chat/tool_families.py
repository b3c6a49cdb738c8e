"""Each model family's tool-call syntax: how to read its calls and thinking out of a reply.

One reader per family, each a pure function of (text, final): it walks the reply once and
fills a `Scan` (content pieces, reasoning pieces, calls). With `final` False (streaming)
it stops where the text cannot be decided yet (a tail that may become a marker, a call
whose name is not known) and holds the rest back; everything it has written is then a
prefix of what the whole reply gives, which is what lets modules/chat/tool_calls.py
stream a reply by re-reading it and sending only the difference.

Rules every reader follows (and docs/TOOLS.md states):
  * a call counts from the moment its name is known; its arguments are compact JSON
    (tool_json), as far as they are valid;
  * markup that does not turn into a call (a `<tool_call>` followed by prose) stays content;
  * a call whose JSON breaks after the name keeps the valid part of its arguments, and the
    text from the break on is read as content again (a cut-off call keeps its partial
    arguments, as OpenAI's API returns them on a length cut-off).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from modules.chat.reasoning import held_prefix, split_think
from modules.chat.tool_json import WHITESPACE, compact_dumps, read_string, scan_json, skip_ws


@dataclass
class RawCall:
    """A call as read: `args` is compact JSON text (possibly unfinished), `done` when it is whole."""

    name: str
    args: str = ""
    done: bool = False
    id: str | None = None


@dataclass
class Scan:
    """What a reader found, in reply order within each kind."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[RawCall] = field(default_factory=list)


# A call reader returns (status, calls, end): "call" (calls read, continue at end),
# "content" (no call here: the opener is text), "pending" (streaming: undecided, stop).
CallResult = tuple[str, list[RawCall], int]


# ----------------------------------------------------------------------------- JSON call objects

NAME_KEYS = ("name",)
ARG_KEYS = ("arguments", "parameters")


def read_call_object(text: str, pos: int, final: bool) -> CallResult:
    """A `{"name": ..., "arguments"|"parameters": {...}}` object at `pos` (OpenAI-like and Llama's).

    Other keys are allowed after the name ("id", "type": "function"); before the name only
    "type" and the arguments may come, so a JSON answer that merely has a "name" field
    deep inside is not taken for a call.
    """
    n = len(text)
    name: str | None = None
    call_id: str | None = None
    args_scan = None
    i = skip_ws(text, pos + 1)
    first = True
    while True:
        i = skip_ws(text, i)
        if i >= n:
            return _unfinished(name, args_scan, call_id, n, final)
        if text[i] == "}" and (first or name is not None):
            if name is None:
                return "content", [], pos
            return "call", [_finish_call(name, args_scan, call_id)], i + 1
        if not first:
            if text[i] != ",":
                return _broken(name, args_scan, call_id, i)
            i = skip_ws(text, i + 1)
            if i >= n:
                return _unfinished(name, args_scan, call_id, n, final)
        first = False
        if text[i] != '"':
            return _broken(name, args_scan, call_id, i)
        key, after, _ = read_string(text, i)
        if key is None:
            return _unfinished(name, args_scan, call_id, n, final) if after >= n else _broken(name, args_scan,
                                                                                                 call_id, i)
        i = skip_ws(text, after)
        if i >= n:
            return _unfinished(name, args_scan, call_id, n, final)
        if text[i] != ":":
            return _broken(name, args_scan, call_id, i)
        i = skip_ws(text, i + 1)
        if i >= n:
            return _unfinished(name, args_scan, call_id, n, final)
        if key in NAME_KEYS and name is None:
            if text[i] != '"':
                return _broken(name, args_scan, call_id, i)
            value, after, _ = read_string(text, i)
            if value is None:
                return _unfinished(name, args_scan, call_id, n, final) if after >= n else ("content", [], pos)
            name, i = value, after
            continue
        if key in ARG_KEYS and args_scan is None:
            args_scan = scan_json(text, i, final=final)
            if args_scan.status != "complete":
                if name is None:
                    return ("pending", [], pos) if args_scan.status == "partial" and not final else ("content", [], pos)
                return "call", [_args_call(name, args_scan, call_id)], args_scan.end
            i = args_scan.end
            continue
        if key not in ("type", "id"):
            return "content", [], pos  # only a call's own keys: anything else is an answer in JSON
        other = scan_json(text, i, final=final)
        if other.status != "complete":
            return (_unfinished(name, args_scan, call_id, n, final) if other.status == "partial"
                    else _broken(name, args_scan, call_id, i))
        if key == "id" and isinstance(other.value, str):
            call_id = other.value
        if key == "type" and other.value != "function" and name is None:
            return "content", [], pos
        i = other.end


def _args_text(scan: object) -> tuple[str, bool]:
    """Compact arguments and whether they are whole; a JSON string holding JSON is unwrapped."""
    if scan is None:
        return "{}", True
    if scan.status == "complete" and isinstance(scan.value, str):  # type: ignore[attr-defined]
        inner = scan_json(scan.value, 0)  # type: ignore[attr-defined]
        if inner.status == "complete" and skip_ws(scan.value, inner.end) == len(scan.value):  # type: ignore
            return inner.compact, True
        return scan.compact, True  # type: ignore[attr-defined]
    if isinstance(getattr(scan, "compact", None), str) and scan.compact.startswith('"'):  # type: ignore
        return "", False  # a string is held until whole: it may need unwrapping
    return scan.compact, scan.status == "complete"  # type: ignore[attr-defined]


def _args_call(name: str, scan: object, call_id: str | None) -> RawCall:
    args, done = _args_text(scan)
    return RawCall(name, args, done, call_id)


def _finish_call(name: str, scan: object, call_id: str | None) -> RawCall:
    return _args_call(name, scan, call_id)


def _unfinished(name: str | None, scan: object, call_id: str | None, n: int, final: bool) -> CallResult:
    if name is None or (scan is None and not final):
        # Not a call until its arguments begin: `{"name": "Bob", "age": 3}` is an answer.
        return ("content", [], -1) if final else ("pending", [], -1)
    call = _args_call(name, scan, call_id)
    if scan is not None and scan.status == "complete":  # type: ignore[attr-defined]
        call.done = final  # the object may still gain an "id"
    return ("call" if final else "pending_call"), [call], n


def _broken(name: str | None, scan: object, call_id: str | None, at: int) -> CallResult:
    if name is None:
        return "content", [], -1
    return "call", [_args_call(name, scan, call_id)], at


# ----------------------------------------------------------------------------- marker-driven readers


def read_marked(text: str, pos: int, final: bool, scan: Scan, openers: tuple[str, ...],
                read_call: Callable[[str, int, str, bool], CallResult]) -> None:
    """Content up to each opener, then the opener's calls, until the text ends.

    `read_call(text, index, opener, final)` reads the call(s) that start at `index`.
    """
    n = len(text)
    while pos < n:
        found = [(text.find(op, pos), op) for op in openers]
        found = [(i, op) for i, op in found if i >= 0]
        if not found:
            end = n if final else held_prefix(text, pos, openers)
            scan.content.append(text[pos:end])
            return
        index, opener = min(found)
        scan.content.append(text[pos:index])
        status, calls, end = read_call(text, index, opener, final)
        if status == "content":
            scan.content.append(opener)
            pos = index + len(opener)
            continue
        scan.calls.extend(calls)
        if status in ("pending", "pending_call"):
            return
        pos = end


def after_call(text: str, pos: int, closer: str, final: bool) -> tuple[str, int]:
    """Step over whitespace and `closer` after a call; ("pending", pos) while it may still come."""
    i = skip_ws(text, pos)
    if text.startswith(closer, i):
        return "call", i + len(closer)
    if not final and closer.startswith(text[i:]):
        return "pending", pos
    return "call", pos


def _then_close(result: CallResult, text: str, closer: str, final: bool) -> CallResult:
    status, calls, end = result
    if status != "call":
        return result
    state, end = after_call(text, end, closer, final)
    return ("pending_call" if state == "pending" else "call"), calls, end


# hermes: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>

def read_hermes(text: str, index: int, opener: str, final: bool) -> CallResult:
    i = skip_ws(text, index + len(opener))
    if i >= len(text):
        return ("content", [], index) if final else ("pending", [], index)
    if text[i] != "{":
        return "content", [], index
    return _then_close(read_call_object(text, i, final), text, "</tool_call>", final)


# llama3: bare JSON first thing (several joined by ";"), or after <|python_tag|>

PYTHON_TAG = "<|python_tag|>"
_BUILTIN_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\.call\(")
_BUILTIN_ARG = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*("(?:[^"\\]|\\.)*"|-?[0-9.]+|True|False|None)\s*(,|\))')


def read_json_calls(text: str, i: int, final: bool, separators: str = ";,") -> CallResult:
    """One or more call objects from `i`, separated by `;`/`,` and whitespace."""
    calls: list[RawCall] = []
    status, found, end = read_call_object(text, i, final)
    if status != "call":
        return status, found, end
    while True:
        calls.extend(found)
        if found and not found[-1].done:
            return "call", calls, end
        j = skip_ws(text, end)
        if j < len(text) and text[j] in separators:
            k = skip_ws(text, j + 1)
            if k >= len(text):
                return ("call", calls, end) if final else ("pending_call", calls, end)
            if text[k] != "{":
                return "call", calls, end
            status, found, after = read_call_object(text, k, final)
            if status == "call":
                end = after
                continue
            if status in ("pending", "pending_call"):
                return "pending_call", calls + found, end
            return "call", calls, end
        if j >= len(text) and not final:
            return "pending_call", calls, end
        return "call", calls, end


def read_python_tag(text: str, index: int, opener: str, final: bool) -> CallResult:
    i = skip_ws(text, index + len(opener))
    if i >= len(text):
        return ("content", [], index) if final else ("pending", [], index)
    if text[i] == "{":
        return read_json_calls(text, i, final)
    match = _BUILTIN_CALL.match(text, i)
    if not match:
        if not final and re.fullmatch(r"[A-Za-z0-9_]*(\.c?a?l?l?)?", text[i:]):
            return "pending", [], index
        return "content", [], index
    args: dict[str, object] = {}
    j = match.end()
    if text.startswith(")", j):
        return "call", [RawCall(match.group(1), "{}", True)], j + 1
    while True:
        arg = _BUILTIN_ARG.match(text, j)
        if not arg:
            return ("content", [], index) if final or len(text) - j > 2000 else ("pending", [], index)
        literal = arg.group(2)
        value = {"True": True, "False": False, "None": None}.get(literal, literal)
        args[arg.group(1)] = scan_json(literal).value if literal[0] in '"-0123456789' else value
        j = arg.end()
        if arg.group(3) == ")":
            return "call", [RawCall(match.group(1), compact_dumps(args), True)], j


def scan_llama3(text: str, pos: int, final: bool, scan: Scan) -> None:
    i = skip_ws(text, pos)
    if i < len(text) and text[i] == "{":
        status, calls, end = read_json_calls(text, i, final)
        if status in ("pending", "pending_call"):
            scan.calls.extend(calls)
            return
        if status == "call":
            scan.calls.extend(calls)
            pos = end
    elif i >= len(text) and not final:
        return
    read_marked(text, pos, final, scan, (PYTHON_TAG,), read_python_tag)


# mistral: [TOOL_CALLS][{...}, ...]  or  [TOOL_CALLS]name[CALL_ID]id[ARGS]{...}

_MISTRAL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def read_mistral(text: str, index: int, opener: str, final: bool) -> CallResult:
    n = len(text)
    i = skip_ws(text, index + len(opener))
    if i >= n:
        return ("content", [], index) if final else ("pending", [], index)
    if text[i] == "[":
        j = skip_ws(text, i + 1)
        if j >= n:
            return ("content", [], index) if final else ("pending", [], index)
        if text[j] != "{":
            return "content", [], index
        status, calls, end = read_json_calls(text, j, final, separators=",")
        if status == "call" and calls and calls[-1].done:
            k = skip_ws(text, end)
            if k < n and text[k] == "]":
                end = k + 1
            elif k >= n and not final:
                return "pending_call", calls, end
        return status, calls, end
    match = _MISTRAL_NAME.match(text, i)
    if not match:
        return "content", [], index
    j = match.end()
    call_id = None
    if text.startswith("[CALL_ID]", j):
        id_match = _MISTRAL_NAME.match(text, j + len("[CALL_ID]"))
        j = id_match.end() if id_match else j + len("[CALL_ID]")
        call_id = id_match.group() if id_match else None
    if not text.startswith("[ARGS]", j):
        rest = text[j:]
        if not final and j >= n - len("[CALL_ID]") and ("[ARGS]".startswith(rest) or "[CALL_ID]".startswith(rest)):
            return "pending", [], index
        return "content", [], index
    args = scan_json(text, j + len("[ARGS]"), final=final)
    call = RawCall(match.group(), *_args_text(args), call_id)
    if args.status == "partial" and not final:
        return "pending_call", [call], n
    return "call", [call], args.end


# deepseek: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{...}\n```<｜tool▁call▁end｜>
# (V3.1: <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>)

DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
DS_CALLS_END = "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN = "<｜tool▁call▁begin｜>"
DS_CALL_END = "<｜tool▁call▁end｜>"
DS_SEP = "<｜tool▁sep｜>"


def read_deepseek(text: str, index: int, opener: str, final: bool) -> CallResult:
    n = len(text)
    i = index + len(opener)
    calls: list[RawCall] = []
    while True:
        i = skip_ws(text, i)
        if opener == DS_CALL_BEGIN and not calls:
            pass  # the call opener itself was the marker
        elif text.startswith(DS_CALL_BEGIN, i):
            i += len(DS_CALL_BEGIN)
        elif text.startswith(DS_CALLS_END, i):
            return "call", calls, i + len(DS_CALLS_END)
        elif not final and (DS_CALL_BEGIN.startswith(text[i:]) or DS_CALLS_END.startswith(text[i:])):
            return ("pending_call" if calls else "pending"), calls, i
        else:
            return ("call", calls, i) if calls else ("content", [], index)
        status, call, i = _deepseek_call(text, i, final)
        if status == "content":
            return ("call", calls, i) if calls else ("content", [], index)
        if call is not None:
            calls.append(call)
        if status == "pending":
            return ("pending_call" if calls else "pending"), calls, n
        state, i = after_call(text, i, DS_CALL_END, final)
        if state == "pending":
            return "pending_call", calls, i
        opener = DS_CALLS_BEGIN  # later calls need their own opener


def _deepseek_call(text: str, i: int, final: bool) -> tuple[str, RawCall | None, int]:
    sep = text.find(DS_SEP, i)
    if sep < 0:
        pending = not final and len(text) - i < 200 and "\n" not in text[i:]
        return ("pending" if pending else "content"), None, i
    head = text[i:sep].strip()
    j = sep + len(DS_SEP)
    json_at = skip_ws(text, j)
    if json_at < len(text) and text[json_at] == "{" and head != "function":
        name = head  # V3.1
    else:
        line_end = text.find("\n", j)
        if line_end < 0:
            return ("content", None, i) if final else ("pending", None, len(text))
        name = text[j:line_end].strip()
        json_at = line_end + 1
        if text.startswith("```json", json_at):
            json_at += len("```json")
        elif not final and "```json".startswith(text[json_at:]):
            return "pending", None, len(text)
    if not name:
        return "content", None, i
    args = scan_json(text, json_at, final=final)
    call = RawCall(name, *_args_text(args))
    if args.status == "partial" and not final:
        return "pending", call, len(text)
    end = args.end
    if args.status == "complete":
        k = skip_ws(text, end)
        if text.startswith("```", k):
            end = k + 3
        elif not final and "```".startswith(text[k:]):
            return "pending", call, len(text)
    return "call", call, end


def scan_with_think(open_tag: str, close_tag: str,
                    body: Callable[[str, int, bool, Scan], None]) -> Callable[[str, bool, bool, bool], Scan]:
    """A whole-reply reader: a think block first (see reasoning.split_think), then `body`."""

    def scan_reply(text: str, final: bool, opened: bool, tools: bool) -> Scan:
        scan = Scan()
        think = split_think(text, 0, open_tag, close_tag, opened=opened, final=final)
        if think.reasoning is not None:
            scan.reasoning.append(think.reasoning)
        if think.pending:
            return scan
        if not tools:
            end = len(text)
            scan.content.append(text[think.end:end])
            return scan
        body(text, think.end, final, scan)
        return scan

    return scan_reply


def marked_body(openers: tuple[str, ...],
                read_call: Callable[[str, int, str, bool], CallResult]) -> Callable[[str, int, bool, Scan], None]:
    def body(text: str, pos: int, final: bool, scan: Scan) -> None:
        read_marked(text, pos, final, scan, openers, read_call)

    return body


def scan_generic_body(text: str, pos: int, final: bool, scan: Scan) -> None:
    """llama.cpp's generic form: the whole reply is one JSON object (a call, calls, or a response)."""
    i = skip_ws(text, pos)
    if i >= len(text) or text[i] != "{":
        if i < len(text) or final:
            scan.content.append(text[pos:])
        return
    if not final:
        return  # undecided until the object ends, and only the whole reply decides
    whole = scan_json(text, i)
    value = whole.value if whole.status == "complete" and skip_ws(text, whole.end) == len(text) else None
    if isinstance(value, dict):
        items = value.get("tool_calls") if "tool_calls" in value else [value.get("tool_call")]
        if isinstance(items, list) and items and all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                     for c in items):
            for item in items:
                args = item.get("arguments", item.get("parameters", {}))
                if isinstance(args, str):
                    inner = scan_json(args)
                    args_text = inner.compact if inner.status == "complete" else compact_dumps(args)
                else:
                    args_text = compact_dumps(args)
                call_id = item.get("id") if isinstance(item.get("id"), str) else None
                scan.calls.append(RawCall(item["name"], args_text, True, call_id))
            return
        if "response" in value and len(value) == 1:
            response = value["response"]
            scan.content.append(response if isinstance(response, str) else compact_dumps(response))
            return
    scan.content.append(text[pos:])


def skip_markers(text: str) -> str:
    return text.strip(WHITESPACE)


# ----------------------------------------------------------------------------- gpt-oss harmony

H_MESSAGE = "<|message|>"
H_ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")
_H_MARKERS = ("<|start|>", "<|channel|>", " to=")
_H_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_H_RECIPIENT = re.compile(r"to=([^\s<]+)")


def scan_harmony(text: str, final: bool, opened: bool, tools: bool) -> Scan:
    """gpt-oss's channels after `<|start|>assistant`: analysis is reasoning, final and preambles content,
    `commentary to=functions.NAME` a call (its body the JSON arguments)."""
    scan = Scan()
    n = len(text)
    pos = 0
    if opened:
        pos = _harmony_body(text, 0, "analysis", None, final, tools, scan)
    while 0 <= pos < n:
        i = pos + len("<|start|>assistant") if text.startswith("<|start|>assistant", pos) else pos
        if not any(text.startswith(m, i) for m in _H_MARKERS):
            if not final and any(m.startswith(text[i:]) for m in (*_H_MARKERS, "<|start|>assistant")):
                return scan
            end = n if final else held_prefix(text, pos, (*_H_MARKERS, *H_ENDS))
            scan.content.append(text[pos:end])
            return scan
        header_end = text.find(H_MESSAGE, i)
        if header_end < 0 or header_end - i > 300:
            if header_end < 0 and not final and n - i <= 300:
                return scan
            scan.content.append(text[pos:] if final else text[pos:held_prefix(text, pos, H_ENDS)])
            return scan
        header = text[i:header_end]
        channel = _H_CHANNEL.search(header)
        recipient = _H_RECIPIENT.search(header)
        pos = _harmony_body(text, header_end + len(H_MESSAGE), channel.group(1) if channel else "",
                            recipient.group(1) if recipient else None, final, tools, scan)
    return scan


def _harmony_body(text: str, start: int, channel: str, recipient: str | None, final: bool, tools: bool,
                  scan: Scan) -> int:
    """Read one message's body from `start`; the index after its end marker, or -1 to stop."""
    ends = [(text.find(m, start), m) for m in H_ENDS]
    ends = [(i, m) for i, m in ends if i >= 0]
    end, marker = min(ends) if ends else (len(text), "")
    open_ended = not ends
    cut = end if (final or not open_ended) else held_prefix(text, start, H_ENDS)
    body = text[start:cut]
    after = -1 if open_ended else end + (0 if marker == "<|start|>" else len(marker))
    if recipient is not None:
        if tools and recipient.startswith("functions."):
            args = scan_json(body, 0, final=final or not open_ended)
            scan.calls.append(RawCall(recipient[len("functions."):], *_args_text(args)))
        return after  # calls to tools the client did not declare (browser, python) are dropped
    if channel == "analysis":
        if scan.reasoning:
            scan.reasoning.append("\n\n")
        scan.reasoning.append(body)
    else:
        scan.content.append(body)
    return after


# ----------------------------------------------------------------------------- Gemma 4

G_CALL = "<|tool_call>"
G_CALL_END = "<tool_call|>"
G_QUOTE = '<|"|>'
G_DROPPED = ("<|tool_response>", "<turn|>")
_G_NAME = re.compile(r"call:([A-Za-z0-9_.\-]+)\{")


def read_gemma(text: str, index: int, opener: str, final: bool) -> CallResult:
    if opener in G_DROPPED:
        return "call", [], index + len(opener)  # turn markup the model may echo; never content
    match = _G_NAME.match(text, index + len(opener))
    if not match:
        rest = text[index + len(opener):]
        if not final and len(rest) < 100 and re.fullmatch(r"(c(a(l(l(:[A-Za-z0-9_.\-]*)?)?)?)?)?", rest):
            return "pending", [], index
        return "content", [], index
    json_text, end, done = gemma_to_json(text, match.end() - 1)
    args = scan_json(json_text, 0, final=final or done)
    call = RawCall(match.group(1), *_args_text(args))
    if not done:
        if final or end < len(text):
            return "call", [call], end
        return "pending_call", [call], len(text)
    return _then_close(("call", [call], end), text, G_CALL_END, final)


def gemma_to_json(text: str, i: int) -> tuple[str, int, bool]:
    """Gemma's argument syntax (`{key:<|"|>text<|"|>,n:1}`) from `i` as JSON text.

    Returns (JSON text so far, index reached, whether the object closed). Written piece by
    piece, so the JSON of a prefix is a prefix of the JSON of the whole; a bare key is
    written once its `:` is seen, a string's tail that may be a quote marker is held.
    """
    out: list[str] = []
    stack: list[str] = []
    key_next = False
    n = len(text)
    while i < n:
        if text.startswith(G_QUOTE, i):
            close = text.find(G_QUOTE, i + len(G_QUOTE))
            inner_end = close if close >= 0 else held_prefix(text, i + len(G_QUOTE), (G_QUOTE,))
            piece = compact_dumps(text[i + len(G_QUOTE):inner_end])
            if close < 0:
                out.append(piece[:-1])
                return "".join(out), n, False
            out.append(piece)
            i = close + len(G_QUOTE)
            continue
        ch = text[i]
        if key_next and (ch.isalnum() or ch in "_-."):
            colon = text.find(":", i)
            if colon < 0:
                return "".join(out), n, False
            out.append(compact_dumps(text[i:colon]))
            i = colon
            continue
        if ch in "{[":
            stack.append(ch)
            key_next = ch == "{"
        elif ch in "}]":
            if not stack:
                return "".join(out), i, False
            stack.pop()
            out.append(ch)
            if not stack:
                return "".join(out), i + 1, True
            key_next = False
            i += 1
            continue
        elif ch == ",":
            key_next = bool(stack) and stack[-1] == "{"
        elif ch == ":":
            key_next = False
        elif ch == "<" or ch == '"':
            if G_QUOTE.startswith(text[i:]):
                return "".join(out), n, False
            return "".join(out), i, False
        out.append(ch)
        i += 1
    return "".join(out), n, False
