"""OpenAI completions and chat completions: request -> engine -> response or SSE payloads.

A job is built (and validated) before any byte is sent, so a bad request is a clean 4xx,
never a broken stream. `response()` drains the generations for a JSON answer; `events()`
yields the stream chunks; both run in the threadpool (see streaming.py). Both are built from
the models in responses.py, the routes' documented schema: a chunk is its model dumped with
`exclude_unset` (as vLLM does), so a key is sent only where the model is given it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from modules.api.responses import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionMessage,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatFinishReason,
    CompletionLogProbs,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    FinishReason,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
    UsageInfo,
)
from modules.api.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, NamedToolChoice, ResponseFormat
from modules.api.state import ApiState, Caller, usage
from modules.chat.agents import AUTO, REQUIRED, AgentOptions, check_tool_turns
from modules.chat.prompt import CONTINUE, INSTRUCT, REPLY
from modules.chat.service import PreparedChat
from modules.chat.tool_calls import ReplyDelta, parse_reply
from modules.chat.types import ASSISTANT, SYSTEM, TOOL, USER, Message
from modules.core.errors import InvalidRequestError
from modules.core.sampling import SamplingParams
from modules.engine.generation import GenerationChunk, TokenLogprob
from modules.engine.grammars import json_object_grammar, json_schema_grammar

# "cancelled" is ours; OpenAI clients know only these.
FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "cancelled": "stop"}
_SYSTEM_ROLES = ("system", "developer")


def _check_n(n: int, best_of: int | None = None) -> None:
    if n != 1:
        raise InvalidRequestError(f"n must be 1 (one choice per prompt), got {n}", "n")
    if best_of not in (None, 1):
        raise InvalidRequestError(f"best_of must be 1 (one candidate per prompt), got {best_of}", "best_of")


class _Job:
    object_name = ""

    def __init__(self, state: ApiState, id_prefix: str) -> None:
        self.state = state
        self.id = f"{id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = state.app.models.name or "None"

    def _envelope(self) -> dict[str, Any]:
        """The fields every response and chunk of this job repeats, as response-model arguments."""
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model}


class CompletionJob(_Job):
    """POST /v1/completions: one choice per prompt (a string, a list of strings, or token ids)."""

    object_name = "text_completion"

    def __init__(self, state: ApiState, req: CompletionRequest, caller: Caller | None = None) -> None:
        super().__init__(state, "cmpl")
        _check_n(req.n, req.best_of)
        self.req = req
        self.prompts = req.prompts()
        params = req.to_sampling_params(state.default_params(req.max_tokens_given()))
        self.run = state.run(_with_schema(params, *response_schema(req.response_format, req.json_schema)), caller)
        self.cancel = self.run.cancel

    def _echo(self, prompt: str | list[int]) -> str:
        if not self.req.echo:
            return ""
        return prompt if isinstance(prompt, str) else self.state.app.models.require().decode(prompt)

    def response(self) -> CompletionResponse:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, prompt in enumerate(self.prompts):
            chunks = list(self.run.chunks(prompt))
            last = chunks[-1]
            prompt_tokens += last.prompt_tokens
            completion_tokens += last.completion_tokens
            echo = self._echo(prompt)
            steps = [step for chunk in chunks for step in chunk.logprobs]
            choices.append(CompletionResponseChoice(
                index=index, text=echo + last.text,
                logprobs=completion_logprobs(steps, len(echo)) if self.req.logprobs else None,
                finish_reason=FINISH[last.finish_reason or "stop"]))
        totals = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)
        return CompletionResponse(**self._envelope(), choices=choices, usage=totals)

    def _chunk(self, index: int, text: str, finish: FinishReason | None, last: GenerationChunk | None = None,
               offset: int = 0) -> dict[str, Any]:
        logprobs = completion_logprobs(last.logprobs, offset) if self.req.logprobs and last else None
        choice = CompletionResponseStreamChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
        # SillyTavern reads token usage from the chunk that carries finish_reason.
        return _payload(CompletionStreamResponse(**self._envelope(), choices=[choice],
                                                 usage=usage(last) if finish else None))

    def events(self) -> Iterator[dict[str, Any]]:
        totals: GenerationChunk | None = None
        for index, prompt in enumerate(self.prompts):
            echo = self._echo(prompt)
            if echo:
                yield self._chunk(index, echo, None)
            offset = len(echo)
            for chunk in self.run.chunks(prompt):
                if chunk.finish_reason:
                    totals = chunk
                    yield self._chunk(index, chunk.delta, FINISH[chunk.finish_reason], chunk, offset)
                elif chunk.delta:
                    yield self._chunk(index, chunk.delta, None, chunk, offset)
                offset += len(chunk.delta)
        if self.req.stream_options and self.req.stream_options.include_usage:
            yield _payload(CompletionStreamResponse(**self._envelope(), choices=[], usage=usage(totals)))


def _with_schema(params: SamplingParams, schema: dict[str, Any] | None, json_object: bool) -> SamplingParams:
    """The params constrained to JSON (matching `schema`) when the request asks for it."""
    if schema is None and not json_object:
        return params
    if params.grammar_string:
        raise InvalidRequestError("grammar_string cannot be combined with a JSON schema: send one of them",
                                  "grammar_string")
    grammar = json_schema_grammar(schema, "response_format") if schema is not None else json_object_grammar()
    return params.replace(grammar_string=grammar)


def _payload(chunk: CompletionStreamResponse | ChatCompletionStreamResponse) -> dict[str, Any]:
    """A stream chunk as the JSON object sent in its SSE event: the keys its builder set."""
    return chunk.model_dump(exclude_unset=True)


def completion_logprobs(steps: Sequence[TokenLogprob], offset: int) -> CompletionLogProbs:
    """OpenAI's legacy completions logprobs object (what SillyTavern reads as top_logprobs[0])."""
    offsets = []
    for step in steps:
        offsets.append(offset)
        offset += len(step.text)
    return CompletionLogProbs(tokens=[s.text for s in steps], token_logprobs=[s.logprob for s in steps],
                              top_logprobs=[dict(s.top) for s in steps], text_offset=offsets)


def chat_logprobs(steps: Sequence[TokenLogprob]) -> ChatCompletionLogProbs:
    """OpenAI's chat logprobs object: one entry per token with its top alternatives."""
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return ChatCompletionLogProbs(content=[
        ChatCompletionLogProbsContent(**entry(s.text, s.logprob),
                                      top_logprobs=[ChatCompletionLogProb(**entry(t, lp)) for t, lp in s.top])
        for s in steps])


_RESERVED_TEMPLATE_VARS = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token"})


def agent_options(req: ChatCompletionRequest) -> AgentOptions:
    """The request's tools, tool_choice, response_format and thinking switches, for the chat path."""
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_VARS & kwargs.keys())
    if reserved:
        raise InvalidRequestError(f"chat_template_kwargs cannot set {', '.join(reserved)}", "chat_template_kwargs")
    if req.enable_thinking is not None:
        kwargs["enable_thinking"] = req.enable_thinking
    if req.reasoning_effort is not None:
        kwargs["reasoning_effort"] = req.reasoning_effort
    choice, forced = AUTO, None
    if isinstance(req.tool_choice, NamedToolChoice):
        choice, forced = REQUIRED, req.tool_choice.function.name
    elif req.tool_choice is not None:
        choice = req.tool_choice
    schema, json_object = response_schema(req.response_format)
    tools = tuple({"type": "function", "function": t.function.model_dump(exclude_none=True)}
                  for t in req.tools or ())
    strict = bool(req.response_format and req.response_format.json_schema and req.response_format.json_schema.strict)
    return AgentOptions(tools=tools, tool_choice=choice, forced_name=forced,
                        parallel_tool_calls=req.parallel_tool_calls, response_schema=schema,
                        json_object=json_object, strict=strict, template_kwargs=kwargs)


def response_schema(fmt: ResponseFormat | None, json_schema: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any] | None, bool]:
    """(the schema the output must match, or None; whether it must be a JSON object) for a
    response_format (OpenAI's, or llama.cpp's with `schema`) or llama.cpp's json_schema field."""
    if json_schema is not None:
        return json_schema, False
    if fmt is None or fmt.type == "text":
        return None, False
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequestError("response_format json_schema needs json_schema.schema",
                                      "response_format.json_schema.schema")
        return fmt.json_schema.schema_, False
    return (fmt.schema_, False) if fmt.schema_ is not None else (None, True)


def _turn(message: ChatMessage, calls: dict[str, str]) -> Message:
    """One non-system request message as a chat Message, with its calls and results."""
    role = {ASSISTANT: ASSISTANT, TOOL: TOOL}.get(message.role, USER)
    turn = Message(role, message.text(), reasoning=message.reasoning_content or "")
    for call in message.tool_calls or ():
        arguments = call.function.arguments
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call_id = call.id or f"call_{uuid.uuid4().hex[:24]}"
        calls[call_id] = call.function.name
        turn.tool_calls.append({"id": call_id, "type": "function",
                                "function": {"name": call.function.name, "arguments": text}})
    if role == TOOL:
        turn.tool_call_id = message.tool_call_id or ""
        turn.name = message.name or calls.get(turn.tool_call_id, "")
    return turn


def chat_prompt(state: ApiState, req: ChatCompletionRequest) -> PreparedChat:
    """What /v1/chat/completions generates from for `req` (and /v1/internal/chat-prompt shows):
    the request mapped onto the one chat path, ChatService.setup and ChatService.prepare, as
    the Chat tab's are. The API never saves a chat."""
    if not req.messages:
        raise InvalidRequestError("messages must hold at least one message", "messages")
    chat = state.app.chat
    system = "\n\n".join(m.text() for m in req.messages if m.role in _SYSTEM_ROLES)
    calls: dict[str, str] = {}
    indexed = [(i, _turn(m, calls)) for i, m in enumerate(req.messages) if m.role not in _SYSTEM_ROLES]
    check_tool_turns([m for _, m in indexed], [i for i, _ in indexed])
    turns = [m for _, m in indexed]
    # OpenAI clients send their own system message; it replaces the character's context
    # in instruct mode (as in ooba). Without one, the character's context is the system.
    replaces_context = req.mode == INSTRUCT and not req.system_message
    setup = chat.setup(req.character, req.mode, req.instruction_template, user_name=req.user_name or req.name1,
                       system_message=req.system_message or (system if replaces_context else ""),
                       chat_instruct_command=req.chat_instruct_command, agent=agent_options(req))
    messages = list(turns)
    if system and not replaces_context:
        messages.insert(0, Message(SYSTEM, system))
    params = req.to_sampling_params(state.default_params(req.max_tokens_given()))
    return chat.prepare(messages, setup, params, CONTINUE if req.continue_ else REPLY,
                        new_input=not req.continue_, is_api=True, save=False)


class ChatCompletionJob(_Job):
    """POST /v1/chat/completions through the chat engine (mode, character, template)."""

    object_name = "chat.completion"

    def __init__(self, state: ApiState, req: ChatCompletionRequest, caller: Caller | None = None) -> None:
        super().__init__(state, "chatcmpl")
        _check_n(req.n)
        self.req = req
        prepared = chat_prompt(state, req)
        self.prompt, self.hook_state = prepared.prompt.text, prepared.prompt.state
        self.reply = prepared.reply
        self.run = state.run(prepared.params, caller)
        self.cancel = self.run.cancel
        self.strip = not req.continue_  # a fresh reply starts at its first visible character

    def response(self) -> ChatCompletionResponse:
        chunks = list(self.run.chunks(self.prompt, hook_state=self.hook_state))
        last = chunks[-1]
        text = last.text.lstrip() if self.strip else last.text
        steps = [step for chunk in chunks for step in chunk.logprobs]
        message = ChatCompletionMessage(role="assistant", content=text)
        finish: ChatFinishReason = FINISH[last.finish_reason or "stop"]
        if self.reply is not None:
            parsed = parse_reply(last.text, self.reply.family, tools=self.reply.tools, thinking=self.reply.thinking)
            calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                     for c in parsed.tool_calls]
            content = parsed.content.lstrip() if self.strip else parsed.content
            message = ChatCompletionMessage(role="assistant", content=content if content or not calls else None,
                                            reasoning_content=parsed.reasoning.strip() or None,
                                            tool_calls=calls or None)
            finish = "tool_calls" if calls and finish == "stop" else finish
        choice = ChatCompletionResponseChoice(index=0, message=message,
                                              logprobs=chat_logprobs(steps) if self.req.logprobs else None,
                                              finish_reason=finish)
        return ChatCompletionResponse(**self._envelope(), choices=[choice], usage=usage(last))

    def _chunk(self, delta: DeltaMessage, finish: ChatFinishReason | None,
               chunk: GenerationChunk | None = None) -> dict[str, Any]:
        # OpenAI sends "usage": null on every chunk but the last only when include_usage is on.
        with_usage = self.req.stream_options is not None and self.req.stream_options.include_usage
        extra: dict[str, Any] = {"usage": None} if with_usage else {}
        logprobs = chat_logprobs(chunk.logprobs) if self.req.logprobs and chunk is not None else None
        choice = ChatCompletionResponseStreamChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=finish)
        return _payload(ChatCompletionStreamResponse(**self._envelope(), choices=[choice], **extra))

    def events(self) -> Iterator[dict[str, Any]]:
        self.object_name = "chat.completion.chunk"
        yield self._chunk(DeltaMessage(role="assistant", content=""), None)
        last: GenerationChunk | None = None
        started = not self.strip
        reader = self.reply.stream() if self.reply is not None else None
        called = False
        for chunk in self.run.chunks(self.prompt, hook_state=self.hook_state):
            last = chunk
            pieces = reader.feed(chunk.delta) if reader is not None else [ReplyDelta("content", chunk.delta)]
            if chunk.finish_reason and reader is not None:
                pieces += reader.finish()
            sent = False
            for delta in _deltas(pieces):
                if delta.content is not None and not started:
                    delta.content = delta.content.lstrip()
                    if not delta.content:
                        continue
                    started = True
                called = called or bool(delta.tool_calls)
                yield self._chunk(delta, None, None if sent else chunk)
                sent = True
            if chunk.finish_reason:
                finish: ChatFinishReason = FINISH[chunk.finish_reason]
                finish = "tool_calls" if called and finish == "stop" else finish
                yield self._chunk(DeltaMessage(), finish, None if sent else chunk)
        if self.req.stream_options and self.req.stream_options.include_usage:
            yield _payload(ChatCompletionStreamResponse(**self._envelope(), choices=[], usage=usage(last)))


def _deltas(pieces: Sequence[ReplyDelta]) -> Iterator[DeltaMessage]:
    """Stream pieces as chunk deltas: consecutive text of one kind merged into one delta."""
    text_kind, text = "", ""
    for piece in pieces:
        if piece.kind != "tool_call" and piece.kind == text_kind:
            text += piece.text
            continue
        if text:
            yield _text_delta(text_kind, text)
        text_kind, text = "", ""
        if piece.kind == "tool_call":
            # OpenAI's shape: id, type and name on a call's first piece only (unset keys are not sent).
            if piece.id is not None:
                call = ToolCallDelta(index=piece.index, id=piece.id, type="function",
                                     function=FunctionCallDelta(name=piece.name, arguments=piece.text))
            else:
                call = ToolCallDelta(index=piece.index, function=FunctionCallDelta(arguments=piece.text))
            yield DeltaMessage(tool_calls=[call])
        else:
            text_kind, text = piece.kind, piece.text
    if text:
        yield _text_delta(text_kind, text)


def _text_delta(kind: str, text: str) -> DeltaMessage:
    return DeltaMessage(reasoning_content=text) if kind == "reasoning" else DeltaMessage(content=text)
