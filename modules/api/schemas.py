"""Wire schemas of the three API families: OpenAI, ooba's internal routes, KoboldAI.

Every request model allows extra keys (SillyTavern sends ~70, most not ours) and types the
known ones with the shapes real clients send (see ../shared/docs/CLIENT_CONTRACTS.md).
Range rules live in SamplingParams, which names the bad field; the schema only documents
the same ranges, with each field's help, taken from SamplingParams' metadata by `_sampler`
(so the OpenAPI page and API fuzzers know them)
and enforces two kinds of bound itself: integers that would overflow a C int in a loader,
and the input limits below, which keep one request from costing unbounded time or memory.
Request models own `to_sampling_params(defaults)`, which lays the fields the client set
over `defaults`, translating the KoboldAI and OpenAI aliases to our names.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from modules.core.errors import InvalidRequestError
from modules.core.sampling import PARAM_FIELDS, SamplingParams

# --------------------------------------------------------------------------- input limits
# Every cap on the size of a request, in one place. A request over one gets a 400 naming the
# field. Each is far above what real clients send (SillyTavern: depth 3, 2 stop strings, no
# grammar, a handful of bans), and low enough that matching, parsing and sampling stay cheap.
MAX_JSON_DEPTH = 32
"""Nesting of objects and arrays in a body, unknown keys included (SillyTavern's is 3)."""
MAX_PROMPTS = 64
"""Prompts in one /v1/completions call when `prompt` is a list of strings."""
MAX_PROMPT_TOKENS = 1 << 20
"""Token ids in a prompt given as ids (more than any context a loader opens)."""
MAX_STOP_STRINGS = 64
"""Stop strings per field; SillyTavern adds one per group-chat member to the user's own."""
MAX_STOP_CHARS = 1000
"""Characters in one stop string (they are matched against every new token)."""
MAX_TOKEN_WINDOW = 4_194_304
"""Tokens the penalty windows (repetition_penalty_range, dry_penalty_last_n) may look back:
the largest context --ctx-size allows. llama.cpp sizes its window as asked: 2**31 made one
2-token request take 8 s, and DRY's did not answer in 20 s (found by tests/api/test_fuzz.py)."""
MAX_GRAMMAR_CHARS = 256 * 1024
"""Characters in a GBNF grammar."""
MAX_LOGIT_BIAS = 1024
"""Entries in logit_bias."""
MAX_BANNED_TOKENS = 4096
"""Token ids in custom_token_bans (a list, or a comma-separated string)."""
MAX_LIST_ITEMS = 64
"""Entries in the small lists of names: sampler_priority, dry_sequence_breakers."""
MAX_MESSAGES = 10_000
"""Messages in one chat completion."""
MAX_CONTENT_PARTS = 256
"""Parts of one message's content when it is a list."""
MAX_CHOICES = 128
"""n and best_of (OpenAI's own bound); only 1 is served, a larger one is a clear 400."""
MAX_TOP_LOGPROBS = 20
"""Alternatives reported per token (logprobs on completions, top_logprobs on chat)."""
MAX_TOP_LOGITS = 1000
"""Entries /v1/internal/logits answers."""
MAX_DECODE_TOKENS = 1 << 20
"""Token ids in one /v1/internal/decode call."""
MAX_EMBEDDING_INPUTS = 2048
"""Strings in one /v1/embeddings call (OpenAI's bound)."""
MAX_OPTIONS = 64
"""Keys in a model load's args and settings."""
MAX_TOOLS = 128
"""Tools in one chat completion (OpenAI's bound)."""
MAX_TOOL_CALLS = 128
"""Calls in one assistant message of the history."""

_SURROGATE = re.compile("[\ud800-\udfff]")
# Union members in a validation error's location ("stop", "list[constrained-str]", 3):
# not field names, so they are left out of the `param` we report.
_UNION_TAG = re.compile(r"[\[\-]|^(str|int|float|bool|list|dict|none)$")

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=-(2**31), le=2**32 - 1)]
TokenId = Count


def _doc(low: float | None = None, high: float | None = None, *, low_open: bool = False,
         enum: list[Any] | None = None) -> Any:
    """A rule checked later (by SamplingParams or the job), shown in the OpenAPI schema only (see
    the module doc): the OpenAPI page tells clients, and a fuzzer draws mostly acceptable bodies."""
    extra: dict[str, Any] = {}
    if low is not None:
        extra["exclusiveMinimum" if low_open else "minimum"] = low
    if high is not None:
        extra["maximum"] = high
    if enum is not None:
        extra["enum"] = enum
    return Field(json_schema_extra=extra)


Window = Annotated[int, Field(ge=-(2**31), le=MAX_TOKEN_WINDOW)]


def _sampler(name: str) -> Any:
    """A request field for the SamplingParams field `name` (ours or a client's alias of it): None
    by default, described by the field's help, its range and choices shown in the OpenAPI schema
    (on the number in the type, as `_doc` does) and checked by SamplingParams (see the module doc)."""
    meta = PARAM_FIELDS[name].metadata
    low, high = meta.get("bounds", (None, None))
    rules: dict[str, Any] = {}
    if low is not None:
        rules["exclusiveMinimum" if meta.get("low_open") else "minimum"] = low
    if high is not None:
        rules["maximum"] = high
    if "choices" in meta:
        rules["enum"] = list(meta["choices"])

    def show_rules(schema: dict[str, Any]) -> None:
        for arm in schema.get("anyOf", [schema]):
            if arm.get("type") in ("number", "integer"):
                arm.update(rules)

    return Field(default=None, description=meta["help"], json_schema_extra=show_rules if rules else None)
StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
ShortText = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Grammar = Annotated[str, Field(max_length=MAX_GRAMMAR_CHARS)]


def capped(limit: int, min_length: int = 0) -> Any:
    """A list's bound. fail_fast stops at its first bad item: without it a million bad token
    ids made a million errors, and FastAPI spent 20 s turning them into one 400."""
    return Field(min_length=min_length, max_length=limit, fail_fast=True)


StopList = Annotated[list[StopText], capped(MAX_STOP_STRINGS)]


def check_json(value: Any) -> None:
    """Refuse a body nested deeper than MAX_JSON_DEPTH or holding text that is not Unicode.

    A lone surrogate ("\\ud800" in JSON) decodes to a Python str that cannot be encoded to
    UTF-8: the tokenizer, the log and any answer that echoes it would fail later, so it is
    refused here, naming the field. Walks iteratively: a deep body must not exhaust the stack.
    """
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise _body_error("json_too_deep", f"nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays",
                              path)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            if isinstance(key, str) and _is_bad_text(key):
                raise _bad_text(path, "a key")  # the key itself cannot be named: it is the bad text
            if isinstance(item, str):
                if _is_bad_text(item):
                    raise _bad_text(path + (key,), "text")
            elif isinstance(item, (dict, list)):
                stack.append((item, path + (key,)))


def _is_bad_text(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _bad_text(path: tuple[Any, ...], what: str) -> PydanticCustomError:
    return _body_error("invalid_unicode", f"{what} with a lone UTF-16 surrogate (such as \\ud800), which is not "
                                          "Unicode: send valid text", path)


def _body_error(kind: str, message: str, path: tuple[Any, ...]) -> PydanticCustomError:
    param = ".".join(str(p) for p in path) or "body"
    return PydanticCustomError(kind, message, {"param": param})


def validation_param(error: dict[str, Any]) -> str | None:
    """The field a pydantic error is about, as the client spells it ("stop", "messages.3.content")."""
    ctx = error.get("ctx") or {}
    if isinstance(ctx.get("param"), str):
        return ctx["param"]
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    return ".".join(p for p in loc if not _UNION_TAG.search(p)) or None


class Loose(BaseModel):
    """Base of every request part: unknown keys are kept and ignored, never a 422."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Body(Loose):
    """Base of every request body: the raw JSON is checked (depth, text) before the fields."""

    @model_validator(mode="before")
    @classmethod
    def _check_raw_json(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_json(data)
        return data


# Our name <- aliases clients use, first one set wins (ours first, then OpenAI, then KoboldAI).
_ALIASES: dict[str, tuple[str, ...]] = {
    "max_new_tokens": ("max_tokens", "max_completion_tokens", "max_new_tokens", "max_length"),
    "repetition_penalty": ("repetition_penalty", "rep_pen"),
    "repetition_penalty_range": ("repetition_penalty_range", "rep_pen_range"),
    "typical_p": ("typical_p", "typical"),
    "mirostat_mode": ("mirostat_mode", "mirostat"),
    "seed": ("seed", "sampler_seed"),
    "grammar_string": ("grammar_string", "grammar"),
    "truncation_length": ("truncation_length", "max_context_length"),
}
_STOP_FIELDS = ("stop", "stopping_strings", "stop_sequence")


class SamplerFields(Body):
    """Every sampler field of the contract, with the value types real clients send; each field's
    description and range come from SamplingParams (`_sampler`)."""

    max_tokens: Int32 | None = _sampler("max_new_tokens")
    max_completion_tokens: Int32 | None = _sampler("max_new_tokens")
    max_new_tokens: Int32 | None = _sampler("max_new_tokens")
    max_length: Int32 | None = _sampler("max_new_tokens")
    temperature: float | None = _sampler("temperature")
    top_k: Int32 | None = _sampler("top_k")
    top_p: float | None = _sampler("top_p")
    min_p: float | None = _sampler("min_p")
    typical_p: float | None = _sampler("typical_p")
    typical: float | None = _sampler("typical_p")
    top_n_sigma: float | None = _sampler("top_n_sigma")
    repetition_penalty: float | None = _sampler("repetition_penalty")
    rep_pen: float | None = _sampler("repetition_penalty")
    repetition_penalty_range: Window | None = _sampler("repetition_penalty_range")
    rep_pen_range: Window | None = _sampler("repetition_penalty_range")
    presence_penalty: float | None = _sampler("presence_penalty")
    frequency_penalty: float | None = _sampler("frequency_penalty")
    mirostat_mode: Int32 | None = _sampler("mirostat_mode")
    mirostat: Int32 | None = _sampler("mirostat_mode")
    mirostat_tau: float | None = _sampler("mirostat_tau")
    mirostat_eta: float | None = _sampler("mirostat_eta")
    dry_multiplier: float | None = _sampler("dry_multiplier")
    dry_base: float | None = _sampler("dry_base")
    dry_allowed_length: Int32 | None = _sampler("dry_allowed_length")
    dry_penalty_last_n: Window | None = _sampler("dry_penalty_last_n")
    dry_sequence_breakers: (Annotated[str, Field(max_length=MAX_LIST_ITEMS * MAX_STOP_CHARS)]
                            | Annotated[list[StopText], capped(MAX_LIST_ITEMS)] | None) = _sampler("dry_sequence_breakers")
    xtc_threshold: float | None = _sampler("xtc_threshold")
    xtc_probability: float | None = _sampler("xtc_probability")
    temperature_last: bool | None = _sampler("temperature_last")
    sampler_priority: (Annotated[list[ShortText], capped(MAX_LIST_ITEMS)]
                       | Annotated[str, Field(max_length=MAX_LIST_ITEMS * 32)] | None) = _sampler("sampler_priority")
    seed: Seed | None = _sampler("seed")
    sampler_seed: Seed | None = _sampler("seed")
    stop: StopText | StopList | None = _sampler("stop")
    stopping_strings: StopList | StopText | None = _sampler("stop")
    stop_sequence: StopList | StopText | None = _sampler("stop")
    ban_eos_token: bool | None = _sampler("ban_eos_token")
    custom_token_bans: (Annotated[str, Field(max_length=MAX_BANNED_TOKENS * 8, json_schema_extra={
                            "pattern": "^[0-9,; ]*$"})]
                        | Annotated[list[TokenId], capped(MAX_BANNED_TOKENS)] | None) = _sampler("custom_token_bans")
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS, json_schema_extra={
        "propertyNames": {"pattern": "^[0-9]+$"}})] | None = _sampler("logit_bias")
    grammar_string: Grammar | None = _sampler("grammar_string")
    grammar: Grammar | None = _sampler("grammar_string")
    truncation_length: Int32 | None = _sampler("truncation_length")
    max_context_length: Int32 | None = _sampler("truncation_length")
    add_bos_token: bool | None = _sampler("add_bos_token")
    skip_special_tokens: bool | None = _sampler("skip_special_tokens")

    @field_validator("custom_token_bans")
    @classmethod
    def _count_bans(cls, value: str | list[int] | None) -> str | list[int] | None:
        if isinstance(value, str) and value.count(",") + value.count(";") >= MAX_BANNED_TOKENS:
            raise ValueError(f"at most {MAX_BANNED_TOKENS} token ids")
        return value

    def max_tokens_given(self) -> bool:
        return any(getattr(self, name) is not None for name in _ALIASES["max_new_tokens"])

    def to_sampling_params(self, defaults: SamplingParams) -> SamplingParams:
        """`defaults` with the fields this request set; raises InvalidRequestError naming a bad one."""
        return self.base_sampling_params(defaults)

    def base_sampling_params(self, defaults: SamplingParams) -> SamplingParams:
        """The shared mapping of request fields (and their client aliases) onto SamplingParams."""
        values: dict[str, Any] = {}
        sent_as: dict[str, str] = {}
        given = {k: v for k, v in self.__dict__.items() if v is not None and k in type(self).model_fields}
        for name in SamplingParams.field_names():
            for alias in _ALIASES.get(name, (name,)):
                if alias in given:
                    values[name], sent_as[name] = given[alias], alias
                    break
        stops = [s for f in _STOP_FIELDS for s in _as_list(given.get(f))]
        if stops:
            values["stop"] = list(dict.fromkeys(stops))
        try:
            return SamplingParams.from_mapping(values, base=defaults)
        except InvalidRequestError as exc:
            alias = sent_as.get(exc.param or "", exc.param)
            if alias == exc.param:
                raise
            # Name the field the client sent (max_tokens), not our internal one (max_new_tokens).
            raise InvalidRequestError(f"{alias}: {exc}", alias) from None


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# --------------------------------------------------------------------------- OpenAI
class JsonSchemaFormat(Loose):
    name: Annotated[str, Field(max_length=64)] = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Loose):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    """llama.cpp's server takes the schema here too (with type json_object)."""


class StreamOptions(Loose):
    include_usage: bool = False


Choices = Annotated[int, Field(ge=1, le=MAX_CHOICES), _doc(1, 1)]  # one choice is served; more: a clear 400


class CompletionRequest(SamplerFields):
    """POST /v1/completions (also what SillyTavern's text-completion presets send)."""

    model: str | None = None
    prompt: (str | Annotated[list[str], capped(MAX_PROMPTS)]
             | Annotated[list[TokenId], capped(MAX_PROMPT_TOKENS)])
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    n: Choices = 1
    best_of: Choices | None = None
    response_format: ResponseFormat | None = None
    json_schema: dict[str, Any] | None = None
    """llama.cpp's server field: the completion must be JSON matching this schema."""

    def prompts(self) -> list[str | list[int]]:
        """Each prompt to complete: a string, or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if all(isinstance(p, str) for p in self.prompt):
            return list(self.prompt)
        return [list(self.prompt)]  # type: ignore[arg-type]


class TextPart(Loose):
    type: Annotated[str, _doc(enum=["text"])] = "text"
    text: str | None = None


FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]


class FunctionCallIn(Loose):
    name: FunctionName
    arguments: str | dict[str, Any] = "{}"
    """JSON text as OpenAI sends it (an object is taken too, as some clients send one)."""


class ToolCallIn(Loose):
    """A call an assistant message of the history made."""

    id: Annotated[str, Field(max_length=256)] | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], capped(MAX_CONTENT_PARTS)] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCallIn], capped(MAX_TOOL_CALLS)] | None = None
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None
    reasoning_content: str | None = None
    """A past reply's thinking (as this server and DeepSeek's API return it)."""

    def text(self) -> str:
        """The content as one string; text parts are joined, other parts refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidRequestError(f"only text content is supported, got a {part.type!r} part", "messages")
            parts.append(part.text)
        return "".join(parts)


class FunctionDef(Loose):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(Loose):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(Loose):
    name: FunctionName


class NamedToolChoice(Loose):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplerFields):
    """POST /v1/chat/completions with ooba's extras (mode, character, instruction_template...)."""

    model: str | None = None
    messages: Annotated[list[ChatMessage], capped(MAX_MESSAGES, min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Choices = 1
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolDef], capped(MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=MAX_OPTIONS)] | None = None
    """Extra variables for the model's chat template (vLLM's and llama.cpp's field)."""
    mode: Literal["chat", "chat-instruct", "instruct"] = "instruct"
    character: str | None = None
    instruction_template: str | None = None
    user_name: str | None = None
    name1: str | None = None
    system_message: str | None = None
    chat_instruct_command: str | None = None
    continue_: bool = False

    def to_sampling_params(self, defaults: SamplingParams) -> SamplingParams:
        """As for completions, with OpenAI chat's `logprobs: true` + `top_logprobs: N`."""
        wanted = (self.top_logprobs or 1) if self.logprobs else 0
        params = self.model_copy(update={"logprobs": None}).base_sampling_params(defaults)
        return params.replace(logprobs=wanted)


# --------------------------------------------------------------------------- internal (ooba)
class EncodeRequest(Body):
    text: str
    add_bos_token: bool = True


class DecodeRequest(Body):
    tokens: Annotated[list[TokenId], capped(MAX_DECODE_TOKENS)]
    skip_special_tokens: bool = True


class LoadModelRequest(Body):
    model_name: str
    args: Annotated[dict[str, Any], Field(max_length=MAX_OPTIONS)] = Field(default_factory=dict)
    """Loader options (ctx_size, threads, n_gpu_layers...) and `loader` to choose one."""
    settings: Annotated[dict[str, Any], Field(max_length=MAX_OPTIONS)] = Field(default_factory=dict)


class LogitsRequest(SamplerFields):
    prompt: str
    top_logits: Annotated[int, Field(ge=1, le=MAX_TOP_LOGITS)] = 50
    use_samplers: bool = False


# --------------------------------------------------------------------------- KoboldAI
class KoboldGenerateRequest(SamplerFields):
    """POST /api/v1/generate and /api/extra/generate/stream."""

    prompt: str


class KoboldAbortRequest(Body):
    """POST /api/extra/abort: `genkey` names the one generation to stop (KoboldCpp's multiuser mode)."""

    genkey: str | None = Field(default=None, max_length=256)


class KoboldTokenCountRequest(Body):
    prompt: str
    special: bool = False


class EmbeddingsRequest(Body):
    """POST /v1/embeddings."""

    model: str | None = None
    input: str | Annotated[list[str], capped(MAX_EMBEDDING_INPUTS, min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
