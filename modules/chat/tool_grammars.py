"""GBNF for "a valid call in this family's syntax", arguments matching each tool's schema.

Built with modules.engine.grammars.GrammarBuilder (one namespace: each tool's argument
schema becomes its rules, the family's wrapper raw rules). The grammar describes the reply
from the call's opening on (what a lazy grammar's trigger starts it at), so `root` begins
with the opener. One layout per family, the one its template writes, and no optional
whitespace (as the schema rules: llama.cpp's detokenizer drops a lone space token's text). End-of-turn tokens that are also end-of-generation (`<|call|>`,
`<|eom_id|>`) are left out: after the grammar the model may only end.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from modules.core.errors import InvalidRequestError

if TYPE_CHECKING:
    from modules.chat.tool_calls import ToolFamily

ANY = r"[\s\S]*?"
"""Lazy prefix of every trigger: the grammar starts at the trigger's first group, wherever it is."""


def _trigger(opener_regex: str) -> str:
    return f"{ANY}({opener_regex})[\\s\\S]*"


TRIGGERS: Mapping[str, tuple[str, ...]] = {
    "hermes": (_trigger(r"<tool_call>"),),
    "llama3": (r"^\s*(\{\s*\"name\")[\s\S]*", _trigger(r"<\|python_tag\|>")),
    "mistral": (_trigger(r"\[TOOL_CALLS\]"),),
    "mistral_args": (_trigger(r"\[TOOL_CALLS\]"),),
    "deepseek": (_trigger("<｜tool▁calls▁begin｜>"),),
    "deepseek_v3_1": (_trigger("<｜tool▁calls▁begin｜>"),),
    "harmony": (_trigger(r"<\|channel\|>commentary to="),),
    "gemma4": (_trigger(r"<\|tool_call>"),),
    "generic": (r"^\s*(\{\s*\"tool_calls?\")[\s\S]*",),
}


def _functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError("tools must be a non-empty list of tools", "tools")
    functions = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRequestError(f"tools[{index}] has no function name", "tools")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise InvalidRequestError(f"tools[{index}].function.parameters must be a JSON schema object", "tools")
        functions.append({"name": function["name"], "parameters": dict(parameters),
                          "strict": bool(function.get("strict", False))})
    return functions


def build_call_grammar(family: ToolFamily, tools: list[dict[str, Any]], *, name: str | None = None,
                       parallel: bool = True) -> tuple[str, list[str]]:
    """(GBNF, trigger regexes) for `family`; see tool_calls.call_grammar."""
    from modules.engine.grammars import GrammarBuilder, gbnf_literal

    functions = _functions(tools)
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise InvalidRequestError(f"tool_choice names the function {name!r}, which is not in tools",
                                      "tool_choice")
    builder = GrammarBuilder("tools")
    shape = family.grammar or "generic"
    calls = []
    prefix = ""
    for function in functions:
        args = builder.add_schema(f"{function['name']}-args", function["parameters"], strict=function["strict"],
                                  param="tools")
        prefix, body = _call_body(shape, function["name"], args, gbnf_literal)
        calls.append(builder.add_rule(f"call-{function['name']}", body))
    # The text every call starts with is written once, before the choice of name: llguidance's
    # GBNF import turns an all-literal alternative into one lexeme, and two alternatives
    # sharing a first lexeme then cannot both be followed.
    call = builder.add_rule("tc-call", f"{prefix} ( {' | '.join(calls)} )")
    root = _root(shape, call, parallel, builder)
    return builder.build(root), list(TRIGGERS.get(shape, TRIGGERS["generic"]))


def _call_body(shape: str, name: str, args: str, lit: Any) -> tuple[str, str]:
    """(what every call of the family starts with, the rest for this function)."""
    if shape in ("hermes", "mistral", "generic", "llama3"):
        # The layout the family's own template writes: `{"name": "f", "arguments": {...}}`.
        key = "parameters" if shape == "llama3" else "arguments"
        return (lit('{"name": '), f'{lit(json.dumps(name))} {lit(f", {json.dumps(key)}: ")} {args} "}}"')
    if shape == "mistral_args":
        return "", f'{lit(name)} "[ARGS]" {args}'
    if shape == "deepseek":
        return ('"<｜tool▁call▁begin｜>function<｜tool▁sep｜>"',
                f'{lit(name)} "\\n```json\\n" {args} "\\n```<｜tool▁call▁end｜>"')
    if shape == "deepseek_v3_1":
        return '"<｜tool▁call▁begin｜>"', f'{lit(name)} "<｜tool▁sep｜>" {args} "<｜tool▁call▁end｜>"'
    if shape == "harmony":
        return '"<|channel|>commentary to=functions."', f'{lit(name)} " <|constrain|>json<|message|>" {args}'
    if shape == "gemma4":
        # Gemma writes arguments in its own syntax, not JSON; the values are checked for shape
        # only (llama.cpp does the same: its converter makes JSON rules).
        return '"<|tool_call>call:"', f'{lit(name)} gemma-dict "<tool_call|>"'
    raise InvalidRequestError(f"no call grammar for the {shape!r} family", "tools")


GEMMA_RULES = {
    "gemma-value": 'gemma-string | gemma-dict | gemma-array | gemma-number | "true" | "false" | "null"',
    "gemma-string": '"<|\\"|>" gemma-char* "<|\\"|>"',
    "gemma-char": '[^<] | "<" [^|] | "<|" [^"]',
    "gemma-dict": '"{" ( gemma-kv ( "," gemma-kv )* )? "}"',
    "gemma-kv": '[A-Za-z_] [A-Za-z0-9_]* ":" gemma-value',
    "gemma-array": '"[" ( gemma-value ( "," gemma-value )* )? "]"',
    "gemma-number": '"-"? [0-9]+ ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?',
}


def _root(shape: str, call: str, parallel: bool, builder: Any) -> str:
    if shape == "hermes":
        one = builder.add_rule("tc-block", f'"<tool_call>\\n" {call} "\\n</tool_call>"')
        return f'{one} ( "\\n" {one} )*' if parallel else one
    if shape == "llama3":
        return f'( "<|python_tag|>" )? {call}'
    if shape == "mistral":
        rest = f'( ", " {call} )* ' if parallel else ""
        return f'"[TOOL_CALLS][" {call} {rest}"]"'
    if shape == "mistral_args":
        one = builder.add_rule("tc-block", f'"[TOOL_CALLS]" {call}')
        return f"{one}{'+' if parallel else ''}"
    if shape in ("deepseek", "deepseek_v3_1"):
        return f'"<｜tool▁calls▁begin｜>" {call} ( "\\n" {call} ){"*" if parallel else ""} "<｜tool▁calls▁end｜>"'
    if shape == "harmony":
        analysis = '( "<|channel|>analysis<|message|>" [^<]* "<|end|><|start|>assistant" )?'
        return f"{analysis} {call}"
    if shape == "gemma4":
        for rule, body in GEMMA_RULES.items():
            builder.add_rule(rule, body)
        return f"{call}{'+' if parallel else ''}"
    if parallel:  # generic
        return f'"{{\\"tool_calls\\": [" {call} ( ", " {call} )* "]}}"'
    return f'"{{\\"tool_call\\": " {call} "}}"'
