"""Wire schemas of the three API families: OpenAI, ooba's internal routes, KoboldAI.

Every request model allows extra keys (SillyTavern sends ~70, most not ours) and types the
known ones with the shapes real clients send (see ../shared/docs/CLIENT_CONTRACTS.md).
Range rules live in SamplingParams, which names the bad field; the bounds here only keep
absurd integers away from C code (a 10**30 top_k would overflow a C int in a loader).
Request models own `to_sampling_params(defaults)`, which lays the fields the client set
over `defaults`, translating the KoboldAI and OpenAI aliases to our names.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modules.errors import InvalidRequestError
from modules.sampling import SamplingParams

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=-(2**31), le=2**32 - 1)]

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


class Loose(BaseModel):
    """Base of every request: unknown keys are kept and ignored, never a 422."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class SamplerFields(Loose):
    """Every sampler field of the contract, with the value types real clients send."""

    max_tokens: Int32 | None = None
    max_completion_tokens: Int32 | None = None
    max_new_tokens: Int32 | None = None
    max_length: Int32 | None = None
    temperature: float | None = None
    top_k: Int32 | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    typical: float | None = None
    top_n_sigma: float | None = None
    repetition_penalty: float | None = None
    rep_pen: float | None = None
    repetition_penalty_range: Int32 | None = None
    rep_pen_range: Int32 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    mirostat_mode: Int32 | None = None
    mirostat: Int32 | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: Int32 | None = None
    dry_penalty_last_n: Int32 | None = None
    dry_sequence_breakers: str | list[str] | None = None
    xtc_threshold: float | None = None
    xtc_probability: float | None = None
    temperature_last: bool | None = None
    sampler_priority: list[str] | str | None = None
    seed: Seed | None = None
    sampler_seed: Seed | None = None
    stop: str | list[str] | None = None
    stopping_strings: list[str] | str | None = None
    stop_sequence: list[str] | str | None = None
    ban_eos_token: bool | None = None
    custom_token_bans: str | list[Count] | None = None
    logit_bias: dict[str, float] | None = None
    grammar_string: str | None = None
    grammar: str | None = None
    truncation_length: Int32 | None = None
    max_context_length: Int32 | None = None
    add_bos_token: bool | None = None
    skip_special_tokens: bool | None = None

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
class StreamOptions(Loose):
    include_usage: bool = False


class CompletionRequest(SamplerFields):
    """POST /v1/completions (also what SillyTavern's text-completion presets send)."""

    model: str | None = None
    prompt: str | list[str] | list[Int32]
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    n: Annotated[int, Field(ge=1, le=2**31 - 1)] = 1

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
    type: str = "text"
    text: str | None = None


class ChatMessage(Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

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


class ResponseFormat(Loose):
    type: str = "text"


class ChatCompletionRequest(SamplerFields):
    """POST /v1/chat/completions with ooba's extras (mode, character, instruction_template...)."""

    model: str | None = None
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=2**31 - 1)] = 1
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
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
class EncodeRequest(Loose):
    text: str
    add_bos_token: bool = True


class DecodeRequest(Loose):
    tokens: list[Count]
    skip_special_tokens: bool = True


class LoadModelRequest(Loose):
    model_name: str
    args: dict[str, Any] = Field(default_factory=dict)
    """Loader options (ctx_size, threads, n_gpu_layers...) and `loader` to choose one."""
    settings: dict[str, Any] = Field(default_factory=dict)


class LogitsRequest(SamplerFields):
    prompt: str
    top_logits: Annotated[int, Field(ge=1, le=1000)] = 50
    use_samplers: bool = False


# --------------------------------------------------------------------------- KoboldAI
class KoboldGenerateRequest(SamplerFields):
    """POST /api/v1/generate and /api/extra/generate/stream."""

    prompt: str


class KoboldTokenCountRequest(Loose):
    prompt: str
    special: bool = False


class EmbeddingsRequest(Loose):
    """POST /v1/embeddings."""

    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
