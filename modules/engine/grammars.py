"""JSON Schema -> GBNF: the one grammar representation behind tools and `response_format`.

Why this converter: llama-cpp-python ships llama.cpp's schema converter as pure Python
(`SchemaConverter` in `llama_cpp/llama_grammar.py`). Importing it as `llama_cpp.llama_grammar`
would first run `llama_cpp/__init__`, which loads the native library (~170 ms, and the engine
layer must never load a backend), so that one file is loaded by path, once per process.

Why a normaliser in front of it: that copy of the converter silently ignores or mistranslates
several keywords (integer bounds, `required` without `properties`, constraints next to a `type`
list, `allOf` of anything but objects, `"` and `\\` in literals, raw control characters in
strings, regex escapes GBNF cannot read...). Every schema is first rewritten into the subset the
converter translates faithfully, and anything else is refused with a 400 that names the keyword
and its JSON pointer: a grammar never promises more than it enforces. The rewrite may narrow
what is allowed (an object lists only its declared keys unless `additionalProperties` says
otherwise, `oneOf` is generated as `anyOf`), never widen it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
from types import ModuleType
from typing import Any

from modules.core.errors import InvalidRequestError
from modules.engine.schema_subset import normalise_schema

#: Whole-grammar cap: a hostile schema must not make llama.cpp parse megabytes.
MAX_GRAMMAR_CHARS = 512 * 1024
CONVERTER_FILE = "llama_grammar.py"
#: JSON-safe replacements for the converter's string rules: its `char` and regex `.` let raw
#: control characters through, which no JSON parser accepts inside a string.
SAFE_RULES = {
    "char": r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])',
    "dot": r'[^"\\\x7F\x00-\x1F]',
}
_RULE_NAME_BAD = re.compile(r"[^a-zA-Z0-9-]+")
_LITERAL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal (quotes, backslashes and control characters escaped)."""
    out = []
    for ch in text:
        if ch in _LITERAL_ESCAPES:
            out.append(_LITERAL_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class GrammarBuilder:
    """Accumulates GBNF rules in one namespace; `build` makes the whole grammar.

    Rule names are sanitised and made unique, so several schemas (one per tool) and raw rules
    (a tool call's wrapper) can live in one grammar. Errors are InvalidRequestError naming the
    request field (`param`) and, for schemas, the keyword and its JSON pointer.
    """

    def __init__(self, param: str = "response_format") -> None:
        self.param = param
        self._converter = _converter_class()(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self._count = 0

    def add_schema(self, name: str, schema: dict, *, strict: bool = False, param: str | None = None) -> str:
        """Add rules for one JSON value matching `schema`; return the rule's name.

        `strict` is OpenAI's `strict: true`: every property is required and no other key may
        appear (an explicit `additionalProperties` other than false is refused, as OpenAI does).
        """
        param = param or self.param
        clean = normalise_schema(schema, param, strict=strict)
        self._count += 1
        conv = self._converter
        base = conv.fresh_name(name or "schema")
        try:
            resolved = conv.resolve_refs(clean, f"s{self._count}")
            conv.set_ref_prefix(base)
            del conv._rules[base]  # the reservation: visit names its rule `base`
            return conv.visit(resolved, base)
        except (AssertionError, ValueError, KeyError, RecursionError) as exc:
            raise InvalidRequestError(f"{param}: the JSON schema could not be turned into a grammar: {exc}",
                                      param) from exc

    def add_rule(self, name: str, body: str) -> str:
        """Add a raw GBNF rule; return its name (sanitised, and suffixed if already taken)."""
        conv = self._converter
        key = conv.fresh_name(name or "rule")
        conv._rules[key] = body
        return key

    def build(self, root_body: str) -> str:
        """The whole GBNF text: `root ::= root_body`, then every rule added so far."""
        text = f"root ::= {root_body}\n{self._converter.format_grammar()}\n"
        if len(text) > MAX_GRAMMAR_CHARS:
            raise InvalidRequestError(
                f"{self.param}: the grammar for this schema would be {len(text)} characters, over the "
                f"{MAX_GRAMMAR_CHARS} limit; simplify the schema (fewer properties, smaller maxLength/maxItems)",
                self.param)
        return text


def json_schema_grammar(schema: dict, param: str = "response_format", *, strict: bool = False) -> str:
    """GBNF for one JSON value matching `schema` (InvalidRequestError(param) if refused)."""
    builder = GrammarBuilder(param)
    return builder.build(builder.add_schema("schema", schema, strict=strict))


def json_object_grammar() -> str:
    """GBNF for any JSON object (`response_format: {"type": "json_object"}`)."""
    builder = GrammarBuilder()
    return builder.build(builder.add_schema("object", {"type": "object"}))


def check_schema(schema: object, param: str, *, strict: bool = False) -> None:
    """Raise InvalidRequestError(param) naming the keyword and where it is, if `schema` is refused.

    Refused: not an object, keywords the grammar cannot enforce, a `$ref` that is not local or
    does not resolve, a schema too deep or too big, or one whose grammar would be too big.
    """
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{param}: a JSON schema must be an object", param)
    json_schema_grammar(schema, param, strict=strict)


# --- the converter, loaded by path ---------------------------------------------------------
def _converter_path() -> str:
    spec = importlib.util.find_spec("llama_cpp")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequestError(
            "JSON schemas need llama-cpp-python's grammar converter: pip install llama-cpp-python",
            "response_format")
    return f"{list(spec.submodule_search_locations)[0]}/{CONVERTER_FILE}"


@functools.lru_cache(maxsize=1)
def _converter_module() -> ModuleType:
    path = _converter_path()
    spec = importlib.util.spec_from_file_location("_workbench_llama_grammar", path)
    if spec is None or spec.loader is None:
        raise InvalidRequestError(f"cannot load llama-cpp-python's grammar converter from {path}",
                                  "response_format")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def _converter_class() -> type:
    module = _converter_module()
    base = module.SchemaConverter
    reserved = set(module.RESERVED_NAMES) | {"root", "space"}

    class Converter(base):  # type: ignore[misc, valid-type]
        """The shipped converter with JSON-safe literals and strings, integer bounds, unique refs."""

        _ref_rules: dict[str, str]
        _ref_prefix: str = "schema"

        def fresh_name(self, name: str) -> str:
            base_name = _RULE_NAME_BAD.sub("-", name).strip("-") or "rule"
            if base_name in reserved:
                base_name += "-"
            key, i = base_name, 0
            while key in self._rules:
                key, i = f"{base_name}{i}", i + 1
            self._rules[key] = ""  # reserved until its body is known
            return key

        def set_ref_prefix(self, prefix: str) -> None:
            self._ref_prefix = prefix

        def _format_literal(self, literal: str) -> str:
            return gbnf_literal(literal)

        def _add_rule(self, name: str, rule: str) -> str:
            return super()._add_rule(name, SAFE_RULES.get(name, rule))

        def _resolve_ref(self, ref: str) -> str:
            if not hasattr(self, "_ref_rules"):
                self._ref_rules = {}
            name = self._ref_rules.get(ref)
            if name is None:
                name = self.fresh_name(f"{self._ref_prefix}-{ref.rsplit('/', 1)[-1]}")
                self._ref_rules[ref] = name
                self._rules[name] = self.visit(self._refs[ref], f"{name}-def")
            return name

        def visit(self, schema: dict, name: str) -> str:
            if schema.get("type") == "integer" and ("minimum" in schema or "maximum" in schema):
                body = integer_range_rule(schema.get("minimum"), schema.get("maximum"))
                rule_name = name + "-" if name in reserved else name
                return self._add_rule(rule_name, f"({body}) space")
            return super().visit(schema, name)

        def format_grammar(self) -> str:
            return "\n".join(f"{k} ::= {v}" for k, v in sorted(self._rules.items()) if v)

    return Converter


# --- integer ranges (a port of llama.cpp's build_min_max_int) -------------------------------
def integer_range_rule(low: int | None, high: int | None) -> str:
    """A GBNF expression for the integers in [low, high] (None: unbounded), no leading zeros."""
    out: list[str] = []
    _min_max_int(low, high, out, 16, True)
    return "".join(out)


def _more_digits(out: list[str], lo: int, hi: int | None) -> None:
    out.append("[0-9]")
    if lo == hi == 1:
        return
    out.append("{" + str(lo))
    if hi != lo:
        out.append("," + ("" if hi is None else str(hi)))
    out.append("}")


def _digit_range(out: list[str], a: str, b: str) -> None:
    out.append(f"[{a}]" if a == b else f"[{a}-{b}]")


def _uniform_range(out: list[str], lo: str, hi: str) -> None:
    i = 0
    while i < len(lo) and i < len(hi) and lo[i] == hi[i]:
        i += 1
    if i > 0:
        out.append('"' + lo[:i] + '"')
    if i >= len(lo) or i >= len(hi):
        return
    if i > 0:
        out.append(" ")
    sub_len = len(lo) - i - 1
    if sub_len <= 0:
        out.append(f"[{lo[i]}-{hi[i]}]")
        return
    lo_sub, hi_sub = lo[i + 1:], hi[i + 1:]
    zeros, nines = "0" * sub_len, "9" * sub_len
    to_reached = False
    out.append("(")
    if lo_sub == zeros:
        _digit_range(out, lo[i], chr(ord(hi[i]) - 1))
        out.append(" ")
        _more_digits(out, sub_len, sub_len)
    else:
        out.append(f"[{lo[i]}] (")
        _uniform_range(out, lo_sub, nines)
        out.append(")")
        if lo[i] < chr(ord(hi[i]) - 1):
            out.append(" | ")
            if hi_sub == nines:
                _digit_range(out, chr(ord(lo[i]) + 1), hi[i])
                to_reached = True
            else:
                _digit_range(out, chr(ord(lo[i]) + 1), chr(ord(hi[i]) - 1))
            out.append(" ")
            _more_digits(out, sub_len, sub_len)
    if not to_reached:
        out.append(" | ")
        _digit_range(out, hi[i], hi[i])
        out.append(" ")
        _uniform_range(out, zeros, hi_sub)
    out.append(")")


def _min_max_int(low: int | None, high: int | None, out: list[str], decimals: int, top: bool) -> None:
    if low is not None and high is not None:
        if low < 0 and high < 0:
            out.append('"-" (')
            _min_max_int(-high, -low, out, decimals, True)
            out.append(")")
            return
        if low < 0:
            out.append('"-" (')
            _min_max_int(0, -low, out, decimals, True)
            out.append(") | ")
            low = 0
        lo_s, hi_s = str(low), str(high)
        for digits in range(len(lo_s), len(hi_s)):
            _uniform_range(out, lo_s, "9" * digits)
            lo_s = "1" + "0" * digits
            out.append(" | ")
        _uniform_range(out, lo_s, hi_s)
        return
    fewer = max(decimals - 1, 1)
    if low is not None:
        _min_only(low, out, decimals, fewer, top)
        return
    if high is None:
        raise ValueError("an integer range needs a bound")
    if high >= 0:
        if top:
            out.append('"-" [1-9] ')
            _more_digits(out, 0, fewer)
            out.append(" | ")
        _min_max_int(0, high, out, decimals, True)
    else:
        out.append('"-" (')
        _min_max_int(-high, None, out, decimals, False)
        out.append(")")


def _min_only(low: int, out: list[str], decimals: int, fewer: int, top: bool) -> None:
    if low < 0:
        out.append('"-" (')
        _min_max_int(None, -low, out, decimals, False)
        out.append(") | [0] | [1-9] ")
        _more_digits(out, 0, decimals - 1)
    elif low == 0:
        if top:
            out.append("[0] | [1-9] ")
            _more_digits(out, 0, fewer)
        else:
            _more_digits(out, 1, decimals)
    elif low <= 9:
        c = str(low)
        start = "1" if top else "0"
        if c > start:
            _digit_range(out, start, chr(ord(c) - 1))
            out.append(" ")
            _more_digits(out, 1, fewer)
            out.append(" | ")
        _digit_range(out, c, "9")
        out.append(" ")
        _more_digits(out, 0, fewer)
    else:
        s = str(low)
        c = s[0]
        if c > "1":
            _digit_range(out, "1" if top else "0", chr(ord(c) - 1))
            out.append(" ")
            _more_digits(out, len(s), fewer)
            out.append(" | ")
        _digit_range(out, c, c)
        out.append(" (")
        _min_max_int(int(s[1:]), None, out, fewer, False)
        out.append(")")
        if c < "9":
            out.append(" | ")
            _digit_range(out, chr(ord(c) + 1), "9")
            out.append(" ")
            _more_digits(out, len(s) - 1, fewer)


def json_literal(value: Any) -> str:
    """The GBNF literal for one JSON value, as the converter writes constants."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not a JSON value")
    return gbnf_literal(json.dumps(value))
