"""JSON Schema -> GBNF (modules/engine/grammars.py): what is enforced, what is refused, and the
proof on a real model: the tiny kit's random-weight GGUF, sampled at temperature 1 through the
App's generator and llama.cpp, writes JSON that validates against the schema for every seed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from modules.core.errors import InvalidRequestError
from modules.core.sampling import SamplingParams
from modules.engine.grammars import (
    GrammarBuilder,
    check_schema,
    integer_range_rule,
    json_object_grammar,
    json_schema_grammar,
)

jsonschema_rs = pytest.importorskip("jsonschema_rs")

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6, "description": "ignored annotation"},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                         "zip": {"type": "integer", "minimum": 0, "maximum": 99}},
                        "required": ["city", "zip"]},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "address"],
    },
    "arrays_enums_const": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["red", "green", 'say "hi"', "back\\slash", 3, None]},
                     "minItems": 2, "maxItems": 4},
            "kind": {"const": "point"},
            "pair": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 1, "maximum": 5},
                                                      {"type": "boolean"}], "items": False},
        },
        "required": ["tags", "kind", "pair"],
        "additionalProperties": False,
    },
    "any_of_and_refs": {
        "$defs": {"leaf": {"type": "object", "properties": {"v": {"type": "integer", "minimum": -3, "maximum": 3}},
                           "required": ["v"]},
                  "tree": {"type": "object", "properties": {"left": {"anyOf": [{"$ref": "#/$defs/tree"},
                                                                                {"$ref": "#/$defs/leaf"}]}}}},
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/tree"},
                       "either": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
                       "typed": {"type": ["integer", "null"], "exclusiveMinimum": 10, "exclusiveMaximum": 13}},
        "required": ["root", "either", "typed"],
    },
    "strings": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
            "either": {"type": "string", "pattern": "^(yes|no)$"},
            "day": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
            "short": {"type": "string", "minLength": 2, "maxLength": 4},
            "dotted": {"type": "string", "pattern": "^x.{1,3}y$"},
            "notq": {"type": "string", "pattern": "^[^a-z]{2}$"},
        },
        "required": ["code", "either", "day", "id", "short", "dotted", "notq"],
    },
    "integers": {
        "type": "object",
        "properties": {
            "neg": {"type": "integer", "minimum": -120, "maximum": -7},
            "excl": {"type": "integer", "exclusiveMinimum": -1, "exclusiveMaximum": 1000},
            "low": {"type": "integer", "minimum": 42},
            "high": {"type": "integer", "maximum": -15},
            "fractional": {"type": "integer", "minimum": 0.5, "maximum": 3.5},
        },
        "required": ["neg", "excl", "low", "high", "fractional"],
    },
    "all_of": {
        "allOf": [{"$ref": "#/definitions/base"},
                  {"type": "object", "properties": {"extra": {"type": "integer", "minimum": 0, "maximum": 9}},
                   "required": ["extra"]}],
        "definitions": {"base": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1,
                                                                         "maximum": 50}}, "required": ["id"]}},
    },
}


# --- integer ranges: exact, checked number by number ---------------------------------------
def _as_regex(expr: str) -> str:
    # The rule uses only "-" / digit literals, classes, groups, | and counts: quotes and spaces go.
    return expr.replace('"', "").replace(" ", "")


@pytest.mark.parametrize("low, high", [(0, 9), (-5, 119), (-120, -7), (7, 7), (0, 1000), (-1000, 0),
                                       (13, 4567), (-99, 99), (100, 199)])
def test_integer_range_rule_matches_exactly_the_range(low: int, high: int) -> None:
    pattern = re.compile(_as_regex(integer_range_rule(low, high)))
    for n in range(low - 150, high + 150):
        assert bool(pattern.fullmatch(str(n))) == (low <= n <= high), n


@pytest.mark.parametrize("low, high", [(42, None), (0, None), (-17, None), (None, -15), (None, 0), (None, 250)])
def test_half_open_integer_ranges(low: int | None, high: int | None) -> None:
    pattern = re.compile(_as_regex(integer_range_rule(low, high)))
    for n in range(-400, 400):
        inside = (low is None or n >= low) and (high is None or n <= high)
        assert bool(pattern.fullmatch(str(n))) == inside, n
    assert not pattern.fullmatch("007") and not pattern.fullmatch("-0012")


# --- refusals name the keyword and where it is ----------------------------------------------
@pytest.mark.parametrize("schema, words", [
    ([1, 2], ["must be an object"]),
    ({"type": "object", "properties": {"n": {"type": "number", "minimum": 1}}}, ["minimum", "#/properties/n"]),
    ({"type": "integer", "multipleOf": 3}, ["multipleOf", "#"]),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, ["uniqueItems"]),
    ({"not": {"type": "string"}}, ["'not'"]),
    ({"if": {}, "then": {}, "else": {}}, ["'if'"]),
    ({"type": "object", "patternProperties": {"^a": {}}}, ["patternProperties"]),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, ["dependentRequired"]),
    ({"type": "array", "contains": {"type": "integer"}}, ["contains"]),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, ["propertyNames"]),
    ({"type": "object", "minProperties": 1}, ["minProperties"]),
    ({"$ref": "https://example.com/schema.json"}, ["local references", "#"]),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, ["does not resolve", "#/properties/a"]),
    ({"type": "string", "format": "email"}, ["format 'email'"]),
    ({"type": "string", "pattern": '^a"b$'}, ["pattern", "JSON must escape"]),
    ({"type": "string", "pattern": "^(?=a)b$"}, ["lookarounds"]),
    ({"type": "string", "pattern": "^a\\1$"}, ["pattern"]),
    ({"type": "string", "pattern": "^[ -~]+$"}, ["range"]),
    ({"type": "string", "pattern": "^a", "maxLength": 3}, ["pattern", "maxLength"]),
    ({"type": "string", "maxLength": 100_000}, ["maxLength", "1000"]),
    ({"type": "integer", "minimum": 5, "maximum": 4}, ["no integer"]),
    ({"type": "integer", "minimum": 10**20}, ["minimum"]),
    ({"type": "array", "prefixItems": [{}], "items": {"type": "string"}}, ["prefixItems"]),
    ({"anyOf": [{"type": "string"}], "oneOf": [{"type": "string"}]}, ["anyOf and oneOf"]),
    ({"enum": []}, ["enum"]),
    ({"type": "strang"}, ["unknown type"]),
    ({"allOf": [{"anyOf": [{"type": "string"}]}, {"maxLength": 3}]}, ["allOf", "#/allOf/0"]),
])
def test_refusals_name_the_keyword_and_its_place(schema: Any, words: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as err:
        check_schema(schema, "response_format")
    assert err.value.param == "response_format"
    for word in words:
        assert word in str(err.value), str(err.value)


def test_hostile_sizes_are_refused_before_a_huge_grammar() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(300)}}
    enum = {"enum": list(range(2000))}
    big = {"type": "object", "properties": {f"p{i}": {"type": "array", "items": {"type": "string", "maxLength": 1000},
                                                      "maxItems": 1000} for i in range(100)}}
    for schema, word in ((deep, "deeper"), (wide, "properties"), (enum, "enum"), (big, "characters")):
        with pytest.raises(InvalidRequestError) as err:
            check_schema(schema, "tools[0].function.parameters")
        assert word in str(err.value) and err.value.param == "tools[0].function.parameters"


def test_an_unanchored_pattern_searches_and_dot_stays_inside_a_json_string() -> None:
    grammar = json_schema_grammar({"type": "string", "pattern": "ab?c"})
    assert "dot ::= [^\\x22\\x5C" in grammar  # `.*` around it: the pattern may occur anywhere
    assert json_schema_grammar({"type": "string", "pattern": "^a.c$"}) != grammar


def test_strict_mode_requires_every_property_and_no_others() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}}
    loose, strict = json_schema_grammar(schema), json_schema_grammar(schema, strict=True)
    assert loose != strict
    assert re.search(r'^schema ::= "\{" space schema-a-kv "," space schema-b-kv "\}"', strict, re.M), strict
    with pytest.raises(InvalidRequestError, match="additionalProperties"):
        check_schema({**schema, "additionalProperties": True}, "response_format", strict=True)


def test_annotations_are_accepted_and_ignored() -> None:
    plain = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    noted = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "x", "title": "T",
             "description": "d", "$comment": "c", "examples": [{"a": 1}], "default": {"a": 1},
             "type": "object", "properties": {"a": {"type": "integer", "deprecated": True, "readOnly": True}},
             "required": ["a"]}
    assert json_schema_grammar(noted) == json_schema_grammar(plain)


def test_the_builder_shares_one_namespace_between_schemas_and_raw_rules() -> None:
    builder = GrammarBuilder("tools")
    first = builder.add_schema("get weather", {"type": "object", "properties": {"city": {"type": "string"}}})
    second = builder.add_schema("get weather", {"type": "object", "properties": {"days": {"type": "integer"}}})
    wrap = builder.add_rule("call", f'"<tool_call>" ({first} | {second}) "</tool_call>"')
    assert first != second and re.fullmatch(r"[a-zA-Z0-9-]+", first)
    assert builder.add_rule("root", '"x"') not in ("root", wrap)
    grammar = builder.build(wrap)
    names = re.findall(r"^([a-zA-Z0-9-]+) ::=", grammar, re.M)
    assert names[0] == "root" and len(names) == len(set(names))


def test_the_converter_loads_without_the_native_library() -> None:
    code = ("import sys; from modules.engine.grammars import json_object_grammar; json_object_grammar(); "
            "print('llama_cpp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the proof: a random model, sampled hot, writes valid JSON ---------------------------------
pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def real_app(tiny_kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from modules.core.settings import Settings
    from modules.engine.app import App

    models = tmp_path_factory.mktemp("models")
    shutil.copy(tiny_kit.gguf_f32, models / "tiny-f32.gguf")
    app = App.create(Settings(models_dir=str(models), threads=1, threads_batch=1, ctx_size=1024, cpu=True), models)
    app.models.load("tiny-f32.gguf")
    yield app
    app.close()


def generate_json(app: Any, grammar: str, seed: int) -> Any:
    params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=600, grammar_string=grammar)
    result = app.generator.generate("Answer in JSON:", params)
    assert result.finish_reason == "stop", result.text  # the grammar completed: EOS, not the token limit
    return json.loads(result.text)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_a_random_model_writes_json_valid_against_the_schema(real_app: Any, name: str) -> None:
    schema = SCHEMAS[name]
    grammar = json_schema_grammar(schema)
    for seed in range(4):
        value = generate_json(real_app, grammar, seed)
        assert jsonschema_rs.is_valid(schema, value), (seed, value)


def test_json_object_mode_writes_an_object(real_app: Any) -> None:
    grammar = json_object_grammar()
    params = SamplingParams(temperature=0.7, top_k=5, seed=3, max_new_tokens=300, grammar_string=grammar)
    result = real_app.generator.generate("Answer in JSON:", params)
    if result.finish_reason == "stop":
        assert isinstance(json.loads(result.text), dict)
    else:  # a random model may nest forever: the prefix still opens an object
        assert result.text.startswith("{")
