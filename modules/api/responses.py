"""Typed responses of every API route: the schema /docs shows is the JSON the code sends.

OpenAI shapes follow vLLM's `vllm/entrypoints/openai/protocol.py` and OpenAI's own names
(UsageInfo, CompletionLogProbs, ChatCompletionStreamResponse, DeltaMessage, ModelCard,
ErrorResponse...), trimmed to the fields this server sends; ooba's internal and KoboldAI's
responses are what SillyTavern reads (shared/docs/CLIENT_CONTRACTS.md). The routes name these
as `response_model`, and completions.py builds its JSON, stream chunks included, from them, so
a field cannot drift from its documentation.

Every model forbids unknown fields: a misspelt one fails where it is built, not in a client.
Fields that are always on the wire, null or not, have no default; a field with a default of
None is one the builder may leave out (stream chunks are dumped with `exclude_unset`, as vLLM
does): DeltaMessage's role and content, and a chat chunk's usage without include_usage.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

FinishReason = Literal["stop", "length"]
"""What OpenAI clients know; our "cancelled" is sent as "stop" (completions.FINISH)."""
ChatFinishReason = Literal["stop", "length", "tool_calls"]
"""A chat reply may also end by calling tools."""
EngineFinishReason = Literal["stop", "length", "cancelled"]
"""The engine's own reasons, which the KoboldAI routes pass on as they are."""


class Wire(BaseModel):
    """Base of every response model: unknown fields refused, so nothing is sent undocumented."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- errors
class ErrorInfo(Wire):
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, rate_limit_error, server_error...")
    param: str | None = Field(description="The request field at fault, dotted (messages.0.content), or null.")
    code: str | None = Field(description="A stable code (model_not_loaded, context_length_exceeded...) or null.")


class ErrorResponse(Wire):
    """Every error of every route, with a 4xx status (5xx only for a backend failing); also the
    payload of a stream's last chunk when a generation fails mid-stream."""

    error: ErrorInfo


_ERROR_STATUSES = {
    400: "Invalid request (the field at fault in `param`), or no model loaded",
    401: "Missing or wrong API key (when --api-key is set)",
    403: "Foreign Host or cross-site request",
    404: "No such model",
    413: "Body larger than --api-max-body",
    415: "Body not sent as JSON",
    429: "The wait queue is full; Retry-After says when to come back",
    500: "The backend failed during the generation",
    "4XX": "Any other client error, in the same shape",
}


def error_responses(*statuses: int | str) -> dict[int | str, dict[str, Any]]:
    """`responses=` documenting `statuses` as ErrorResponse (a router's list and a route's add up).

    "4XX" also keeps FastAPI from documenting a 422 the API never sends (its validation
    errors are 400s, in this shape).
    """
    return {status: {"model": ErrorResponse, "description": _ERROR_STATUSES[status]} for status in statuses}


# --------------------------------------------------------------------------- OpenAI: shared parts
class UsageInfo(Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogProbs(Wire):
    """OpenAI's legacy completions logprobs: parallel lists, one entry per generated token
    (SillyTavern reads `top_logprobs[0]` as {token: logprob})."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatCompletionLogProb(Wire):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="The token's UTF-8 bytes.")


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb]


class ChatCompletionLogProbs(Wire):
    content: list[ChatCompletionLogProbsContent] | None


# --------------------------------------------------------------------------- OpenAI: completions
class CompletionResponseChoice(Wire):
    index: int
    text: str
    logprobs: CompletionLogProbs | None
    finish_reason: FinishReason


class CompletionResponse(Wire):
    """POST /v1/completions without `stream`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionResponseStreamChoice(Wire):
    index: int
    text: str = Field(description="The text since the previous chunk (the echoed prompt in its own chunk first).")
    logprobs: CompletionLogProbs | None
    finish_reason: FinishReason | None


class CompletionStreamResponse(Wire):
    """One SSE payload of POST /v1/completions with `stream`. The chunk carrying finish_reason
    also carries `usage` (SillyTavern reads it there); with stream_options.include_usage a last
    chunk with no choices carries the totals over all prompts."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None


# --------------------------------------------------------------------------- OpenAI: chat
class FunctionCall(Wire):
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class ToolCall(Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(Wire):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = Field(default=None, description="A reasoning model's thinking, apart from "
                                          "the answer; null when there was none.")
    tool_calls: list[ToolCall] | None = Field(default=None, description="The calls the reply makes; null when it "
                                              "makes none (content is null when it said nothing else).")


class ChatCompletionResponseChoice(Wire):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatCompletionLogProbs | None
    finish_reason: ChatFinishReason


class ChatCompletionResponse(Wire):
    """POST /v1/chat/completions without `stream`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class FunctionCallDelta(Wire):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Wire):
    """A piece of one call: index always; id, type and name on its first piece; arguments in pieces."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class DeltaMessage(Wire):
    """What a chat chunk adds: the first has role (and empty content), then content, and the
    one with finish_reason is empty. Keys not set are not sent."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatCompletionResponseStreamChoice(Wire):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None
    finish_reason: ChatFinishReason | None


class ChatCompletionStreamResponse(Wire):
    """One SSE payload of POST /v1/chat/completions with `stream`. `usage` is there only with
    stream_options.include_usage: null on every chunk but a last one with no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# --------------------------------------------------------------------------- OpenAI: models, embeddings
class ModelCard(Wire):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "user"


class ModelList(Wire):
    """GET /v1/models: the loaded model first (SillyTavern shows data[0].id), then models/."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingData(Wire):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 "
                                                     "with encoding_format \"base64\".")


class EmbeddingUsage(Wire):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Wire):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# --------------------------------------------------------------------------- ooba internal
class ModelInfoResponse(Wire):
    model_name: str = Field(description="The loaded model, or \"None\".")
    lora_names: list[str]
    loader: str | None


class ModelListResponse(Wire):
    model_names: list[str]


class LoadModelResponse(Wire):
    status: Literal["OK"]
    model_name: str
    loader: str
    message: str


class StatusResponse(Wire):
    status: Literal["OK"]


class StopGenerationResponse(Wire):
    status: Literal["OK"]
    stopped: int = Field(description="How many of the caller's generations were stopped.")


class EncodeResponse(Wire):
    tokens: list[int]
    length: int


class DecodeResponse(Wire):
    text: str


class TokenCountResponse(Wire):
    length: int


class LogitsResponse(RootModel[dict[str, float]]):
    """{token text: probability} of the most likely next tokens."""


class ChatPromptResponse(Wire):
    prompt: str


# --------------------------------------------------------------------------- KoboldAI, KoboldCpp, llama.cpp
class KoboldResult(Wire):
    result: str


class KoboldCppVersion(Wire):
    result: Literal["KoboldCpp"] = Field(description="The word that makes SillyTavern use streaming, grammar, min_p.")
    version: str


class KoboldValue(Wire):
    value: int


class KoboldGeneration(Wire):
    text: str
    finish_reason: EngineFinishReason | None


class KoboldGenerateResponse(Wire):
    results: list[KoboldGeneration]


class KoboldStreamToken(Wire):
    """One `event: message` payload of /api/extra/generate/stream; finish_reason only on the last."""

    token: str
    finish_reason: EngineFinishReason | None = None


class KoboldTokenCount(Wire):
    value: int
    ids: list[int]


class KoboldAbortResponse(Wire):
    success: bool
    done: bool


class KoboldPerf(Wire):
    """KoboldCpp's /api/extra/perf: the last generation's numbers and the queue."""

    last_process: float
    last_eval: float
    last_token_count: int
    last_input_count: int
    total_gens: int
    stop_reason: int = Field(description="0 out of tokens, 1 EOS or stop string, 2 aborted, -1 none yet.")
    queue: int
    idle: int


class GenerationSettings(Wire):
    n_ctx: int


class LlamaCppProps(Wire):
    """llama.cpp server's GET /props, the part SillyTavern's KoboldCpp type reads."""

    chat_template: str
    default_generation_settings: GenerationSettings


# --------------------------------------------------------------------------- OpenAPI for SSE routes
def sse_responses(chunk: type[BaseModel], description: str, *, done: bool = True,
                  event: str | None = None) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that answers Server-Sent Events.

    Before OpenAPI 3.2 (and without `itemSchema`), a text/event-stream `schema` describes one
    event, as schemathesis reads it: an object whose `data` is a string holding one `chunk` as
    JSON (or an ErrorResponse, when the generation fails midway), or "[DONE]" at the end when
    `done`; `event` names the event type the dialect sends (KoboldCpp: "message").
    The chunk is inlined: FastAPI puts in #/components only the models a route returns or
    names for a status, and a text/event-stream body is neither.
    """
    payload: dict[str, Any] = {"type": "string", "contentMediaType": "application/json",
                               "contentSchema": {"anyOf": [inline_schema(chunk),
                                                           {"$ref": "#/components/schemas/ErrorResponse"}]}}
    data = {"anyOf": [payload, {"const": "[DONE]"}]} if done else payload
    properties: dict[str, Any] = {"data": data}
    if event is not None:
        properties["event"] = {"const": event}
    item = {"title": f"{chunk.__name__} event", "type": "object", "required": list(properties),
            "properties": properties}
    return {200: {"description": description, "content": {"text/event-stream": {"schema": item}}}}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its nested models written in place (no $refs, no $defs)."""
    schema = model.model_json_schema(mode="serialization")
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]))
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)
