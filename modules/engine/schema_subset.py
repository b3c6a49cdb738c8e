"""JSON Schema -> the subset the grammar converter enforces faithfully, or a refusal that says why.

`normalise_schema` walks a client's schema once and returns a new one in which every keyword is
one the converter (modules/engine/grammars.py) translates exactly; annotations are dropped;
anything the grammar could not enforce is an InvalidRequestError naming the keyword and its JSON
pointer. The rewrite may only narrow what the schema allows, never widen it, so whatever the
grammar lets a model write still validates against the client's schema.

Sizes are bounded (depth, node count, properties, enum values, alternatives, repetition counts)
so a hostile schema cannot make a huge grammar.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from modules.core.errors import InvalidRequestError

MAX_DEPTH = 32
MAX_NODES = 2000
MAX_PROPERTIES = 256
MAX_ENUM = 1024
MAX_ALTERNATIVES = 128
#: minLength/maxLength, minItems/maxItems and regex counts: the grammar spells each repetition out.
MAX_REPEAT = 1000
MAX_PATTERN = 1000
MAX_LITERAL_CHARS = 64 * 1024
#: Integer bounds: the integer rule allows at most 16 digits.
MAX_INT_BOUND = 10**15

#: Accepted and ignored: they describe, they do not constrain.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "example", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "contentMediaType", "contentEncoding", "$defs", "definitions",
})
TYPE_KEYWORDS = {
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "number": frozenset(),
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "prefixItems", "minItems", "maxItems"}),
    "boolean": frozenset(),
    "null": frozenset(),
}
GENERIC_KEYWORDS = frozenset({"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"})
KNOWN = ANNOTATIONS | GENERIC_KEYWORDS | frozenset().union(*TYPE_KEYWORDS.values())
#: Why a known JSON Schema keyword is refused, where a reason helps more than "unsupported".
REFUSAL_HINTS = {
    "minimum": "bounds are enforced on integers only", "maximum": "bounds are enforced on integers only",
    "exclusiveMinimum": "bounds are enforced on integers only",
    "exclusiveMaximum": "bounds are enforced on integers only",
    "multipleOf": "a grammar cannot check divisibility", "uniqueItems": "a grammar cannot compare items",
    "patternProperties": "list the keys in properties", "propertyNames": "list the keys in properties",
    "minProperties": "use required", "maxProperties": "list the keys in properties",
}
STRING_FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")
ANY_VALUE: dict[str, Any] = {"type": ["object", "array", "string", "number", "boolean", "null"]}
_ABSENT = object()


def normalise_schema(schema: object, param: str, *, strict: bool = False) -> dict:
    """The enforceable equivalent (or narrowing) of `schema`; InvalidRequestError(param) if refused."""
    walker = _Normaliser(schema, param, strict)
    top = walker.node(schema, "#", 0)
    if walker.defs:
        top = {**top, "$defs": walker.defs}
    return top


@dataclass
class _Normaliser:
    root: Any
    param: str
    strict: bool
    defs: dict[str, dict] = field(default_factory=dict)
    ref_ids: dict[str, str] = field(default_factory=dict)
    nodes: int = 0

    def fail(self, message: str, ptr: str) -> InvalidRequestError:
        return InvalidRequestError(f"{self.param}: {message} (at {ptr} in the JSON schema)", self.param)

    def node(self, schema: Any, ptr: str, depth: int) -> dict:
        if depth > MAX_DEPTH:
            raise self.fail(f"the schema is nested deeper than {MAX_DEPTH} levels", ptr)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(f"the schema has more than {MAX_NODES} subschemas", ptr)
        if schema is True:
            return dict(ANY_VALUE)
        if not isinstance(schema, dict):
            raise self.fail("a subschema must be a JSON object (or true)", ptr)
        for key in schema:
            if key not in KNOWN:
                hint = REFUSAL_HINTS.get(key, "the grammar cannot enforce it")
                raise self.fail(f"JSON Schema keyword '{key}' is not supported: {hint}", ptr)
        s = {k: v for k, v in schema.items() if k not in ANNOTATIONS}
        if "$ref" in s:
            return self.ref(s, ptr, depth)
        if "allOf" in s:
            s = self.merge_all_of(s, ptr)
            return self.node(s, f"{ptr}/allOf", depth + 1)
        if "anyOf" in s or "oneOf" in s:
            return self.union(s, ptr, depth)
        if "enum" in s or "const" in s:
            return self.literals(s, ptr)
        types = self.types(s, ptr)
        if types is None:
            return dict(ANY_VALUE)
        alternatives = [self.typed(t, s, ptr, depth) for t in types]
        return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}

    # --- references and combinators ---------------------------------------------------------
    def ref(self, s: dict, ptr: str, depth: int) -> dict:
        ref = s["$ref"]
        if len(s) > 1:
            raise self.fail(f"'$ref' next to {sorted(k for k in s if k != '$ref')} is not supported: "
                            "move them into the referenced schema", ptr)
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.fail(f"$ref {ref!r} is not supported: only local references ('#/$defs/...') are", ptr)
        rid = self.ref_ids.get(ref)
        if rid is None:
            rid = f"d{len(self.ref_ids)}"
            self.ref_ids[ref] = rid  # before the walk, so a recursive schema ends
            self.defs[rid] = self.node(self.resolve(ref, ptr), ref, depth + 1)
        return {"$ref": f"#/$defs/{rid}"}

    def resolve(self, ref: str, ptr: str) -> Any:
        target = self.root
        path = ref[1:]
        if path and not path.startswith("/"):
            raise self.fail(f"$ref {ref!r} is not supported: only JSON pointers ('#/...') are", ptr)
        for raw in path.split("/")[1:] if path else []:
            part = unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise self.fail(f"$ref {ref!r} does not resolve", ptr)
        return target

    def merge_all_of(self, s: dict, ptr: str) -> dict:
        parts = s["allOf"]
        if not isinstance(parts, list) or not parts:
            raise self.fail("allOf must be a non-empty list", ptr)
        merged = {k: v for k, v in s.items() if k != "allOf"}
        for i, part in enumerate(parts):
            where = f"{ptr}/allOf/{i}"
            for _ in range(MAX_DEPTH):  # follow $ref chains to the schema they name
                if isinstance(part, dict) and set(part) - ANNOTATIONS == {"$ref"}:
                    part = self.resolve(part["$ref"], where) if isinstance(part["$ref"], str) else None
                else:
                    break
            if not isinstance(part, dict) or any(k in part for k in ("allOf", "anyOf", "oneOf", "$ref")):
                raise self.fail("allOf is supported only over object schemas (properties, required)", where)
            for key, value in part.items():
                if key in ANNOTATIONS:
                    continue
                self.merge_key(merged, key, value, where, several=len(parts) > 1)
        return merged

    def merge_key(self, merged: dict, key: str, value: Any, where: str, several: bool) -> None:
        if key == "properties" and isinstance(value, dict) and isinstance(merged.get(key, {}), dict):
            props = dict(merged.get(key, {}))
            for name, sub in value.items():
                if name in props and props[name] != sub:
                    raise self.fail(f"allOf: property '{name}' is defined twice, differently", where)
                props[name] = sub
            merged[key] = props
        elif key == "required" and isinstance(value, list):
            merged[key] = list(dict.fromkeys([*merged.get(key, []), *value]))
        elif key == "additionalProperties" and several:
            raise self.fail("allOf: additionalProperties inside a part is not supported: put it next to allOf",
                            where)
        elif key in merged and merged[key] != value:
            raise self.fail(f"allOf: '{key}' differs between parts", where)
        else:
            merged[key] = value

    def union(self, s: dict, ptr: str, depth: int) -> dict:
        if "anyOf" in s and "oneOf" in s:
            raise self.fail("anyOf and oneOf together are not supported", ptr)
        key = "anyOf" if "anyOf" in s else "oneOf"
        alternatives, rest = s[key], {k: v for k, v in s.items() if k != key}
        if not isinstance(alternatives, list) or not alternatives:
            raise self.fail(f"{key} must be a non-empty list", ptr)
        if len(alternatives) > MAX_ALTERNATIVES:
            raise self.fail(f"{key} has more than {MAX_ALTERNATIVES} alternatives", ptr)
        out = []
        for i, alt in enumerate(alternatives):
            where = f"{ptr}/{key}/{i}"
            if rest:  # A and (B1 or B2) = (A and B1) or (A and B2), when the keywords do not overlap
                if not isinstance(alt, dict) or "$ref" in alt or set(alt) & set(rest):
                    raise self.fail(f"{key} next to {sorted(rest)} is supported only when each alternative "
                                    "is an inline schema that does not repeat those keywords", where)
                alt = {**rest, **alt}
            out.append(self.node(alt, where, depth + 1))
        return {"anyOf": out}

    def literals(self, s: dict, ptr: str) -> dict:
        if "enum" in s and "const" in s:
            raise self.fail("enum and const together are not supported", ptr)
        extra = sorted(set(s) - {"enum", "const", "type"})
        if extra:
            raise self.fail(f"enum/const next to {extra} is not supported: list only allowed values", ptr)
        values = [s["const"]] if "const" in s else s["enum"]
        if not isinstance(values, list) or not values:
            raise self.fail("enum must be a non-empty list", ptr)
        if len(values) > MAX_ENUM:
            raise self.fail(f"enum has more than {MAX_ENUM} values", ptr)
        if "type" in s:
            types = s["type"] if isinstance(s["type"], list) else [s["type"]]
            values = [v for v in values if _json_type(v) in types or (_json_type(v) == "integer" and "number" in types)]
            if not values:
                raise self.fail("no enum/const value has the schema's type", ptr)
        try:
            size = sum(len(json.dumps(v, allow_nan=False)) for v in values)
        except ValueError as exc:
            raise self.fail("enum/const values must be JSON (no NaN or Infinity)", ptr) from exc
        if size > MAX_LITERAL_CHARS:
            raise self.fail(f"enum/const values exceed {MAX_LITERAL_CHARS} characters", ptr)
        return {"enum": values}

    def types(self, s: dict, ptr: str) -> list[str] | None:
        declared = s.get("type", _ABSENT)
        if declared is _ABSENT:
            used = [t for t, keywords in TYPE_KEYWORDS.items() if keywords & s.keys()]
            if len(used) > 1:
                raise self.fail(f"keywords for several types ({', '.join(used)}) without a 'type'", ptr)
            return used or None
        types = [declared] if isinstance(declared, str) else declared
        if not isinstance(types, list) or not types or len(set(map(str, types))) != len(types):
            raise self.fail("'type' must be a type name or a list of distinct ones", ptr)
        for t in types:
            if t not in TYPE_KEYWORDS:
                raise self.fail(f"unknown type {t!r}", ptr)
        return types

    def typed(self, t: str, s: dict, ptr: str, depth: int) -> dict:
        if t == "string":
            return self.string(s, ptr)
        if t == "integer":
            return self.integer(s, ptr)
        if t == "object":
            return self.object(s, ptr, depth)
        if t == "array":
            return self.array(s, ptr, depth)
        return {"type": t}

    # --- one type each ----------------------------------------------------------------------
    def count(self, s: dict, key: str, ptr: str) -> int | None:
        value = s.get(key)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.fail(f"'{key}' must be a non-negative integer", ptr)
        if value > MAX_REPEAT:
            raise self.fail(f"'{key}' over {MAX_REPEAT} is not supported (the grammar spells each one out)", ptr)
        return value

    def bounds(self, s: dict, low_key: str, high_key: str, ptr: str) -> tuple[int, int | None]:
        low, high = self.count(s, low_key, ptr) or 0, self.count(s, high_key, ptr)
        if high is not None and low > high:
            raise self.fail(f"'{low_key}' is greater than '{high_key}'", ptr)
        return low, high

    def string(self, s: dict, ptr: str) -> dict:
        fmt, pattern = s.get("format"), s.get("pattern")
        lengths = "minLength" in s or "maxLength" in s
        if fmt is not None:
            if pattern is not None or lengths:
                raise self.fail("'format' together with 'pattern' or a length is not supported", ptr)
            if fmt not in STRING_FORMATS:
                raise self.fail(f"string format {fmt!r} is not supported (supported: {', '.join(STRING_FORMATS)})",
                                ptr)
            return {"type": "string", "format": fmt}
        if pattern is not None:
            if lengths:
                raise self.fail("'pattern' together with minLength/maxLength is not supported: "
                                "put the length in the pattern", ptr)
            return {"type": "string", "pattern": self.pattern(pattern, ptr)}
        if lengths:
            low, high = self.bounds(s, "minLength", "maxLength", ptr)
            return {"type": "string", "minLength": low, **({} if high is None else {"maxLength": high})}
        return {"type": "string"}

    def pattern(self, pattern: Any, ptr: str) -> str:
        if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
            raise self.fail(f"'pattern' must be a string of at most {MAX_PATTERN} characters", ptr)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise self.fail(f"'pattern' is not a valid regular expression: {exc}", ptr) from exc
        try:
            return translate_pattern(pattern)
        except ValueError as exc:
            raise self.fail(f"'pattern' is not supported: {exc}", ptr) from exc

    def integer(self, s: dict, ptr: str) -> dict:
        low: int | None = None
        high: int | None = None
        for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            value = s.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise self.fail(f"'{key}' must be a number (draft-4 boolean exclusive bounds are not supported)",
                                ptr)
            if abs(value) > MAX_INT_BOUND:
                raise self.fail(f"'{key}' beyond ±{MAX_INT_BOUND} is not supported", ptr)
            if key == "minimum":
                bound = math.ceil(value)
            elif key == "exclusiveMinimum":
                bound = math.floor(value) + 1
            elif key == "maximum":
                bound = math.floor(value)
            else:
                bound = math.ceil(value) - 1
            if "Min" in key or key == "minimum":
                low = bound if low is None else max(low, bound)
            else:
                high = bound if high is None else min(high, bound)
        if low is not None and high is not None and low > high:
            raise self.fail("no integer lies between the bounds", ptr)
        out: dict[str, Any] = {"type": "integer"}
        if low is not None:
            out["minimum"] = low
        if high is not None:
            out["maximum"] = high
        return out

    def object(self, s: dict, ptr: str, depth: int) -> dict:
        props = s.get("properties", {})
        required = s.get("required", [])
        extra = s.get("additionalProperties", _ABSENT)
        if not isinstance(props, dict):
            raise self.fail("'properties' must be an object", ptr)
        if len(props) > MAX_PROPERTIES:
            raise self.fail(f"more than {MAX_PROPERTIES} properties", ptr)
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.fail("'required' must be a list of property names", ptr)
        if self.strict:
            if extra not in (_ABSENT, False):
                raise self.fail("strict mode needs 'additionalProperties': false", ptr)
            missing = [r for r in required if r not in props]
            if missing:
                raise self.fail(f"strict mode: required {missing} not in properties", ptr)
            required, extra = list(props), False
        props = {**props, **{r: True for r in required if r not in props}}
        if extra is _ABSENT and not props:
            return {"type": "object"}  # any object, as JSON Schema says
        out_props = {name: self.node(sub, f"{ptr}/properties/{_escape(name)}", depth + 1)
                     for name, sub in props.items()}
        wanted = set(required)
        out: dict[str, Any] = {"type": "object", "properties": out_props,
                               "required": [name for name in props if name in wanted]}
        if extra in (_ABSENT, False):
            out["additionalProperties"] = False
        else:
            out["additionalProperties"] = self.node(extra, f"{ptr}/additionalProperties", depth + 1)
        return out

    def array(self, s: dict, ptr: str, depth: int) -> dict:
        items = s.get("items", _ABSENT)
        prefix = s.get("prefixItems")
        low, high = self.bounds(s, "minItems", "maxItems", ptr)
        if isinstance(items, list):  # draft 4-7 tuples
            if prefix is not None:
                raise self.fail("'items' as a list next to 'prefixItems' is not supported", ptr)
            prefix, items = items, _ABSENT
        if prefix is not None:
            if not isinstance(prefix, list) or len(prefix) > MAX_PROPERTIES:
                raise self.fail(f"'prefixItems' must be a list of at most {MAX_PROPERTIES} schemas", ptr)
            if items not in (_ABSENT, False):
                raise self.fail("'items' after 'prefixItems' is not supported: the grammar writes exactly the "
                                "tuple's items", ptr)
            if low > len(prefix) or (high is not None and high < len(prefix)):
                raise self.fail("minItems/maxItems exclude the prefixItems tuple's length", ptr)
            return {"type": "array",
                    "prefixItems": [self.node(p, f"{ptr}/prefixItems/{i}", depth + 1) for i, p in enumerate(prefix)]}
        if items is False:
            if low > 0:
                raise self.fail("'items': false with minItems > 0 allows no array", ptr)
            return {"type": "array", "prefixItems": []}
        item = dict(ANY_VALUE) if items is _ABSENT else self.node(items, f"{ptr}/items", depth + 1)
        return {"type": "array", "items": item, "minItems": low, **({} if high is None else {"maxItems": high})}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


# --- regex patterns -> the dialect the converter passes to GBNF -----------------------------
_CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " "}
_REFUSED_CHARS = '"\\'


def _hex(ch: str) -> str:
    if ord(ch) > 0xFF:
        return f"\\u{ord(ch):04X}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08X}"
    return f"\\x{ord(ch):02X}"


def _check_char(ch: str) -> None:
    if ch in _REFUSED_CHARS or ord(ch) < 0x20 or ord(ch) == 0x7F:
        raise ValueError(f"it matches {ch!r}, which JSON must escape inside a string")


def translate_pattern(pattern: str) -> str:
    """`pattern` rewritten for the converter: anchored, escapes as character classes, lazy marks dropped.

    JSON Schema patterns search (unanchored), so a missing `^`/`$` becomes `.*`. The grammar
    writes a string's characters raw, so a pattern that could match a quote, a backslash or a
    control character is refused (`.` and `[^...]` are narrowed to exclude them).
    """
    body = pattern
    head = "" if body.startswith("^") else ".*"
    body = body[1:] if body.startswith("^") else body
    tail = ".*"
    if body.endswith("$"):
        trailing = len(body[:-1]) - len(body[:-1].rstrip("\\"))
        if trailing % 2 == 0:
            body, tail = body[:-1], ""
    return "^" + head + "(" + _translate_body(body) + ")" + tail + "$"


def _translate_body(body: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            out.append(_escape_outside(body[i + 1] if i + 1 < len(body) else ""))
            i += 2
        elif ch == "[":
            i = _char_class(body, i, out)
        elif ch == "(":
            if body.startswith("(?:", i):
                out.append("(")
                i += 3
                continue
            if body.startswith("(?", i):
                raise ValueError("lookarounds and group flags ('(?') cannot be enforced")
            out.append("(")
            i += 1
        elif ch in "*+?}" and i + 1 < len(body) and body[i + 1] == "?":
            out.append(ch)  # a lazy quantifier matches the same strings
            i += 2
        elif ch in "*+?" and i + 1 < len(body) and body[i + 1] == "+":
            raise ValueError("possessive quantifiers are not supported")
        elif ch == "{":
            end = body.find("}", i)
            counts = body[i + 1:end] if end > 0 else ""
            if not re.fullmatch(r"\d+(,\d*)?", counts):
                raise ValueError("a '{' that is not a repetition count must be escaped")
            if any(int(n) > MAX_REPEAT for n in counts.split(",") if n):
                raise ValueError(f"repetition counts over {MAX_REPEAT}")
            out.append(body[i:end + 1])
            i = end + 1
        elif ch in "^$":
            raise ValueError("'^' and '$' are supported only at the start and end")
        else:
            if ch not in ".|)*+?":
                _check_char(ch)
            out.append(ch)
            i += 1
    return "".join(out)


def _escape_outside(ch: str) -> str:
    if ch in _CLASS_ESCAPES:
        return f"[{_CLASS_ESCAPES[ch]}]"
    if ch and not ch.isalnum() and ch not in _REFUSED_CHARS:
        return f"[{_hex(ch)}]"
    raise ValueError(f"the escape '\\{ch}' cannot be enforced in a JSON string")


def _char_class(body: str, i: int, out: list[str]) -> int:
    j = i + 1
    negated = body.startswith("^", j)
    j += 1 if negated else 0
    parts: list[str] = []
    first = True
    while j < len(body) and (body[j] != "]" or first):
        ch = body[j]
        first = False
        if ch == "\\":
            nxt = body[j + 1] if j + 1 < len(body) else ""
            if nxt in _CLASS_ESCAPES:
                parts.append(_CLASS_ESCAPES[nxt])
            elif nxt and not nxt.isalnum() and nxt not in _REFUSED_CHARS:
                parts.append(_hex(nxt))
            elif negated and nxt in _REFUSED_CHARS:
                parts.append(_hex(nxt))
            else:
                raise ValueError(f"the escape '\\{nxt}' cannot be enforced in a JSON string")
            j += 2
            continue
        if not negated:
            _check_char(ch)
            if ch == "-" and parts and j + 1 < len(body) and body[j + 1] != "]":
                _check_range(parts[-1], body[j + 1])
        parts.append(_hex(ch) if ch in "[]^" or (negated and ch in _REFUSED_CHARS) else ch)
        j += 1
    if j >= len(body):
        raise ValueError("unbalanced '['")
    if negated:  # never a quote, backslash or control character, whatever the class excludes
        parts.append("\\x22\\x5C\\x7F\\x00-\\x1F")
    out.append("[" + ("^" if negated else "") + "".join(parts) + "]")
    return j + 1


def _check_range(start: str, end: str) -> None:
    if len(start) == 1 and start <= '"' <= end or len(start) == 1 and start <= "\\" <= end:
        raise ValueError(f"the range {start}-{end} includes a quote or a backslash, which JSON must escape")
