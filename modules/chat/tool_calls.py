"""Tool calls and reasoning in a model's reply: the families' syntax, parsed, streamed and constrained.

The chat path renders the model's own template with `tools=` (template_messages shapes
OpenAI messages the way Hugging Face templates expect), detects the family from the
template (`detect_family`), and hands the reply to `parse_reply` or, streaming, to a
`ReplyStream`. `call_grammar` gives the GBNF for "a valid call in this family's syntax"
and the trigger regexes of a lazy grammar. Each family's reader lives in
modules/chat/tool_families.py; docs/TOOLS.md is the user-facing description.

A stream re-reads the whole reply on each piece (the readers are linear and replies are
short) and sends only what is new; since a reader never writes what later text could
change, the pieces always add up to `parse_reply` of the whole.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from modules.chat.reasoning import thinking_opened
from modules.chat.tool_families import (
    DS_CALL_BEGIN,
    DS_CALLS_BEGIN,
    G_CALL,
    G_DROPPED,
    Scan,
    marked_body,
    read_deepseek,
    read_gemma,
    read_hermes,
    read_mistral,
    scan_generic_body,
    scan_harmony,
    scan_llama3,
    scan_with_think,
)
from modules.chat.tool_json import WHITESPACE

SLOW_READ_S = 0.001
"""A re-read slower than this (seconds) makes the stream wait for more text before the next."""
SLOW_READ_FRACTION = 64
"""...namely for 1/64 of the reply so far: a few tokens on a long call, so pieces still flow."""

__all__ = [
    "ToolCall", "ParsedReply", "ReplyDelta", "ToolFamily", "TOOL_FAMILIES", "CallGrammar", "detect_family",
    "template_supports_tools", "generic_tool_prompt", "template_messages", "thinking_opened", "parse_reply",
    "ReplyStream", "call_grammar", "new_call_id",
]


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: `arguments` is compact JSON text (OpenAI's `function.arguments`)."""

    id: str
    name: str
    arguments: str


@dataclass
class ParsedReply:
    """A reply split into the visible answer, the thinking, and the calls."""

    content: str
    reasoning: str
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ReplyDelta:
    """One streamed piece: content or reasoning text, or a piece of call `index`'s arguments.

    `id` and `name` are set on the first delta of each call only.
    """

    kind: Literal["content", "reasoning", "tool_call"]
    text: str = ""
    index: int = 0
    id: str | None = None
    name: str | None = None


Reader = Callable[[str, bool, bool, bool], Scan]


@dataclass(frozen=True)
class ToolFamily:
    """A model family's call syntax.

    `markers`: strings in a chat template that identify the family (all must appear, and
    none of `absent`);
    `read`: the reply reader, `(text, final, opened, tools) -> Scan`; `think`: its
    reasoning tags (open, close), or None; `call_id_length`: 9 for Mistral, whose templates
    refuse other ids, 0 for OpenAI-style "call_..." ids; `grammar`: the name of its call
    grammar shape (see call_grammar).
    """

    name: str
    markers: tuple[str, ...]
    read: Reader
    think: tuple[str, str] | None = ("<think>", "</think>")
    call_id_length: int = 0
    grammar: str = ""
    absent: tuple[str, ...] = ()


def _think_reader(body: Callable[..., None], tags: tuple[str, str] = ("<think>", "</think>")) -> Reader:
    return scan_with_think(tags[0], tags[1], body)


TOOL_FAMILIES: Mapping[str, ToolFamily] = {
    family.name: family for family in (
        ToolFamily("harmony", ("<|channel|>",), scan_harmony, ("<|channel|>analysis<|message|>", "<|end|>"),
                   grammar="harmony"),
        ToolFamily("gemma4", ("<|tool_call>call:",),
                   _think_reader(marked_body((G_CALL, *G_DROPPED), read_gemma), ("<|channel>thought", "<channel|>")),
                   ("<|channel>thought", "<channel|>"), grammar="gemma4"),
        ToolFamily("deepseek_v3_1", ("tool▁call▁begin",),
                   _think_reader(marked_body((DS_CALLS_BEGIN, DS_CALL_BEGIN), read_deepseek)),
                   grammar="deepseek_v3_1", absent=("```json",)),
        ToolFamily("deepseek", ("tool▁call▁begin",),
                   _think_reader(marked_body((DS_CALLS_BEGIN, DS_CALL_BEGIN), read_deepseek)), grammar="deepseek"),
        ToolFamily("mistral_args", ("[TOOL_CALLS]", "[ARGS]"),
                   _think_reader(marked_body(("[TOOL_CALLS]",), read_mistral), ("[THINK]", "[/THINK]")),
                   ("[THINK]", "[/THINK]"), call_id_length=9, grammar="mistral_args"),
        ToolFamily("mistral", ("[TOOL_CALLS]",),
                   _think_reader(marked_body(("[TOOL_CALLS]",), read_mistral), ("[THINK]", "[/THINK]")),
                   ("[THINK]", "[/THINK]"), call_id_length=9, grammar="mistral"),
        ToolFamily("hermes", ("<tool_call>",), _think_reader(marked_body(("<tool_call>",), read_hermes)),
                   grammar="hermes"),
        ToolFamily("llama3", ("<|start_header_id|>", "<|python_tag|>"), _think_reader(scan_llama3), None,
                   grammar="llama3"),
        ToolFamily("generic", (), _think_reader(scan_generic_body), grammar="generic"),
    )
}
"""Families by name, in the order detect_family tries them (the most specific markers first)."""


def detect_family(template_source: str | None) -> ToolFamily:
    """The family whose markers all appear in the template; "generic" for any other (or None)."""
    source = template_source if isinstance(template_source, str) else ""
    for family in TOOL_FAMILIES.values():
        if (family.markers and all(marker in source for marker in family.markers)
                and not any(marker in source for marker in family.absent)):
            return family
    # Llama 3.x templates that never show <|python_tag|> still ask for {"name", "parameters"}.
    if "<|start_header_id|>" in source and '"parameters"' in source:
        return TOOL_FAMILIES["llama3"]
    return TOOL_FAMILIES["generic"]


_PROBE_TOOL = "zz_probe_tool_7f3a"


def template_supports_tools(template_source: str | None) -> bool:
    """Whether the template writes the `tools` it is given into the prompt itself.

    Found the way llama.cpp finds it: render a one-message chat with a made-up tool and
    look for the tool's name in the prompt. A template that fails to render says False.
    """
    if not isinstance(template_source, str) or "tools" not in template_source:
        return False
    from modules.chat.templates import TemplateRenderer
    from modules.core.errors import InvalidRequestError

    tool = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}
    try:
        prompt = TemplateRenderer(cache_size=1).render(template_source, [{"role": "user", "content": "hi"}],
                                                       tools=[tool])
    except InvalidRequestError:
        return False
    return _PROBE_TOOL in prompt


def generic_tool_prompt(tools: list[dict[str, Any]], tool_choice: object = "auto") -> str:
    """System text that describes `tools` and the generic JSON reply form (llama.cpp's generic handler).

    The reply is one JSON object: `{"tool_call": {"name", "arguments"}}` (or
    `{"tool_calls": [...]}`), or `{"response": "..."}` when no tool is needed.
    """
    functions = [t.get("function", t) for t in tools if isinstance(t, Mapping)]
    names = [f.get("name") for f in functions if isinstance(f, Mapping)]
    lines = [
        "You can call the following tools (JSON schemas of their arguments):",
        json.dumps(functions, ensure_ascii=False, indent=2),
        "",
        "Reply with one JSON object and nothing else: either",
        '{"tool_call": {"name": "<tool name>", "arguments": {<arguments>}}}',
        'to call a tool, or {"response": "<your answer>"} to answer directly.',
    ]
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name")
        lines.append(f'You must call the tool "{name}".')
    elif tool_choice == "required":
        lines.append("You must call one of the tools: " + ", ".join(str(n) for n in names) + ".")
    return "\n".join(lines)


def new_call_id(family: ToolFamily | None = None) -> str:
    """A fresh call id: "call_" and 24 hex digits, or 9 letters and digits for Mistral."""
    if family is not None and family.call_id_length:
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        return "".join(secrets.choice(alphabet) for _ in range(family.call_id_length))
    return "call_" + secrets.token_hex(12)


def _fit_id(call_id: object, family: ToolFamily | None) -> Any:
    """`call_id` as the family's templates accept it: Mistral's 9 characters, derived stably."""
    if family is None or not family.call_id_length or not isinstance(call_id, str):
        return call_id
    if len(call_id) == family.call_id_length and call_id.isalnum():
        return call_id
    digest = hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()
    return digest[:family.call_id_length]


def _arguments_object(arguments: object) -> object:
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # templates print it as it is


def template_messages(messages: list[dict[str, Any]], family: ToolFamily | None = None) -> list[dict[str, Any]]:
    """OpenAI chat messages shaped as Hugging Face chat templates expect them (new dicts).

    Assistant `tool_calls` get `function.arguments` as a dict (transformers and vLLM do
    this; templates write it with `tojson`), `type: "function"`, and lose the key when
    empty (templates test `'tool_calls' in message`); a None content becomes "" (kept
    None beside calls for DeepSeek, left out for gpt-oss, as their templates test it); tool messages keep `tool_call_id` and `name`; a past turn's
    `reasoning_content` is kept (also as `thinking`, gpt-oss's name) for the templates
    that use it. With `family` Mistral, call ids become the 9 characters its templates
    demand (the same id gives the same 9). With family "generic" (templates without tool
    support), calls and results are written as JSON text in ordinary turns.
    """
    shaped: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, Mapping):
            shaped.append(message)
            continue
        msg = dict(message)
        calls = msg.pop("tool_calls", None)
        if msg.get("content") is None:
            _empty_content(msg, family, bool(calls))
        if isinstance(calls, list) and calls:
            msg["tool_calls"] = [_template_call(call, family) for call in calls]
        reasoning = msg.get("reasoning_content") or msg.pop("reasoning", None)
        if isinstance(reasoning, str) and reasoning:
            msg["reasoning_content"] = reasoning
            msg["thinking"] = reasoning
        if msg.get("role") == "tool" and "tool_call_id" in msg:
            msg["tool_call_id"] = _fit_id(msg["tool_call_id"], family)
        if family is not None and family.name == "generic":
            msg = _generic_turn(msg)
        shaped.append(msg)
    return shaped


def _empty_content(msg: dict[str, Any], family: ToolFamily | None, has_calls: bool) -> None:
    # Most templates concatenate content ("" is safe); DeepSeek's writes an empty extra turn
    # for "" after calls (it tests `is not none`), gpt-oss's tests `"content" in message`.
    name = family.name if family is not None else ""
    if has_calls and name.startswith("deepseek"):
        msg["content"] = None
    elif has_calls and name == "harmony":
        msg.pop("content", None)
    else:
        msg["content"] = ""


def _template_call(call: object, family: ToolFamily | None) -> object:
    if not isinstance(call, Mapping):
        return call
    out = dict(call)
    out.setdefault("type", "function")
    if "id" in out:
        out["id"] = _fit_id(out["id"], family)
    function = out.get("function")
    if isinstance(function, Mapping):
        out["function"] = {**function, "arguments": _arguments_object(function.get("arguments", {}))}
    return out


def _generic_turn(msg: dict[str, Any]) -> dict[str, Any]:
    """A call or a result as JSON text, for templates that know no tools (as minja's polyfills write it)."""
    if msg.get("tool_calls"):
        calls = [{"name": c["function"].get("name"), "arguments": c["function"].get("arguments"),
                  **({"id": c["id"]} if "id" in c else {})}
                 for c in msg.pop("tool_calls") if isinstance(c, Mapping) and isinstance(c.get("function"), Mapping)]
        body = {"tool_calls": calls} if len(calls) != 1 else {"tool_call": calls[0]}
        msg["content"] = ((msg.get("content") or "") + "\n" + json.dumps(body, ensure_ascii=False)).strip()
        return msg
    if msg.get("role") == "tool":
        result = {"tool_response": {"tool": msg.get("name"), "content": msg.get("content"),
                                    "tool_call_id": msg.get("tool_call_id")}}
        return {"role": "user", "content": json.dumps(result, ensure_ascii=False)}
    return msg


# ----------------------------------------------------------------------------- parsing


def _read(text: str, family: ToolFamily, tools: bool, thinking: bool, final: bool) -> Scan:
    if not isinstance(text, str):
        text = ""
    return family.read(text, final, thinking, tools)


def _joined(pieces: list[str]) -> str:
    return "".join(pieces).strip(WHITESPACE)


def _partial_text(pieces: list[str]) -> str:
    # Trailing whitespace is held: it is dropped if the reply ends or a call follows.
    return "".join(pieces).strip(WHITESPACE)


def parse_reply(text: str, family: ToolFamily, *, tools: bool, thinking: bool) -> ParsedReply:
    """The reply `text` split into content, reasoning and calls by `family`'s syntax.

    `tools` False: calls are not looked for (the text is content, reasoning still split);
    `thinking` True: the prompt opened a think block, so the text starts inside it.
    Never raises: text that is not a call (bad JSON before a call's name) stays content;
    see docs/TOOLS.md for the exact rules.
    """
    scan = _read(text, family, tools, thinking, final=True)
    calls = [ToolCall(call.id or new_call_id(family), call.name, call.args) for call in scan.calls]
    return ParsedReply(_joined(scan.content), _joined(scan.reasoning), calls)


class ReplyStream:
    """Streams a reply's content, reasoning and call pieces as the model writes it.

    `feed(delta)` returns what can be shown now; markup, and any tail that may still turn
    into markup, is held until it is decided. `finish()` flushes at the end of the
    generation. The deltas add up to `result()`, which is `parse_reply` of the whole text
    (with the call ids the stream handed out).
    """

    def __init__(self, family: ToolFamily, *, tools: bool, thinking: bool) -> None:
        self.family = family
        self.tools = tools
        self.thinking = thinking
        self._text: list[str] = []
        self._content = ""
        self._reasoning = ""
        self._calls: list[tuple[str, str, str]] = []  # (id, name, arguments sent)
        self._finished = False
        self._waiting = 0
        self._slow = False

    @property
    def text(self) -> str:
        return "".join(self._text)

    def feed(self, delta: str) -> list[ReplyDelta]:
        if self._finished or not isinstance(delta, str) or not delta:
            return []
        self._text.append(delta)
        self._waiting += len(delta)
        # Re-reading is linear in the reply; when one read grows slow (long JSON arguments),
        # read again only after a few % more text, which keeps a long call linear overall.
        if self._slow and self._waiting * SLOW_READ_FRACTION < self._length():
            return []
        return self._emit(final=False)

    def _length(self) -> int:
        return sum(len(piece) for piece in self._text)

    def finish(self) -> list[ReplyDelta]:
        if self._finished:
            return []
        out = self._emit(final=True)
        self._finished = True
        return out

    def result(self) -> ParsedReply:
        reply = parse_reply(self.text, self.family, tools=self.tools, thinking=self.thinking)
        calls = [ToolCall(self._calls[i][0], call.name, call.arguments) if i < len(self._calls) else call
                 for i, call in enumerate(reply.tool_calls)]
        return ParsedReply(reply.content, reply.reasoning, calls)

    def _emit(self, final: bool) -> list[ReplyDelta]:
        started = time.perf_counter()
        text = self.text
        self._text = [text]
        scan = _read(text, self.family, self.tools, self.thinking, final)
        self._slow = time.perf_counter() - started > SLOW_READ_S
        self._waiting = 0
        out: list[ReplyDelta] = []
        reasoning = (_joined if final else _partial_text)(scan.reasoning)
        if reasoning.startswith(self._reasoning) and len(reasoning) > len(self._reasoning):
            out.append(ReplyDelta("reasoning", reasoning[len(self._reasoning):]))
            self._reasoning = reasoning
        content = (_joined if final else _partial_text)(scan.content)
        if content.startswith(self._content) and len(content) > len(self._content):
            out.append(ReplyDelta("content", content[len(self._content):]))
            self._content = content
        for index, call in enumerate(scan.calls):
            if index < len(self._calls):
                call_id, name, sent = self._calls[index]
                if call.args.startswith(sent) and len(call.args) > len(sent):
                    out.append(ReplyDelta("tool_call", call.args[len(sent):], index))
                    self._calls[index] = (call_id, name, call.args)
            elif index == len(self._calls):
                call_id = call.id or new_call_id(self.family)
                self._calls.append((call_id, call.name, call.args))
                out.append(ReplyDelta("tool_call", call.args, index, call_id, call.name))
        return out


# ----------------------------------------------------------------------------- grammars


@dataclass
class CallGrammar:
    """GBNF for the family's call(s), and the regexes that switch it on in a lazy grammar."""

    gbnf: str
    triggers: list[str]


def call_grammar(family: ToolFamily, tools: list[dict[str, Any]], *, name: str | None = None,
                 parallel: bool = True) -> CallGrammar:
    """GBNF for one (with `parallel`, one or more) call(s) in `family`'s syntax, arguments per schema.

    `name` restricts it to that function (tool_choice naming one). `triggers` are regexes
    for a lazy grammar (tool_choice "auto"): the grammar applies from the first group of
    the first match on (llama.cpp's PATTERN triggers), so each matches a call's opening.
    Raises InvalidRequestError (param "tools") for a tool without a name or a schema the
    grammar builder cannot enforce, and (param "tool_choice") for a name not in `tools`.
    """
    from modules.chat.tool_grammars import build_call_grammar

    gbnf, triggers = build_call_grammar(family, tools, name=name, parallel=parallel)
    return CallGrammar(gbnf, triggers)

