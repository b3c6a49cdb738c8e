"""OpenAI completions and chat completions: request -> engine -> response or SSE payloads.

A job is built (and validated) before any byte is sent, so a bad request is a clean 4xx,
never a broken stream. `response()` drains the generations for a JSON answer; `events()`
yields the stream chunks; both run in the threadpool (see streaming.py). Both are built from
the models in responses.py, the routes' documented schema: a chunk is its model dumped with
`exclude_unset` (as vLLM does), so a key is sent only where the model is given it.
"""

from __future__ import annotations

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
    CompletionLogProbs,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    FinishReason,
    UsageInfo,
)
from modules.api.schemas import ChatCompletionRequest, CompletionRequest
from modules.api.state import ApiState, Caller, usage
from modules.chat.prompt import CONTINUE, INSTRUCT, REPLY
from modules.chat.service import PreparedChat
from modules.chat.types import ASSISTANT, SYSTEM, USER, Message
from modules.core.errors import InvalidRequestError
from modules.engine.generation import GenerationChunk, TokenLogprob

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
        self.run = state.run(req.to_sampling_params(state.default_params(req.max_tokens_given())), caller)
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


def chat_prompt(state: ApiState, req: ChatCompletionRequest) -> PreparedChat:
    """What /v1/chat/completions generates from for `req` (and /v1/internal/chat-prompt shows):
    the request mapped onto the one chat path, ChatService.setup and ChatService.prepare, as
    the Chat tab's are. The API never saves a chat."""
    if not req.messages:
        raise InvalidRequestError("messages must hold at least one message", "messages")
    chat = state.app.chat
    system = "\n\n".join(m.text() for m in req.messages if m.role in _SYSTEM_ROLES)
    turns = [Message(ASSISTANT if m.role == ASSISTANT else USER, m.text())
             for m in req.messages if m.role not in _SYSTEM_ROLES]
    # OpenAI clients send their own system message; it replaces the character's context
    # in instruct mode (as in ooba). Without one, the character's context is the system.
    replaces_context = req.mode == INSTRUCT and not req.system_message
    setup = chat.setup(req.character, req.mode, req.instruction_template, user_name=req.user_name or req.name1,
                       system_message=req.system_message or (system if replaces_context else ""),
                       chat_instruct_command=req.chat_instruct_command)
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
        if req.response_format is not None and req.response_format.type != "text":
            raise InvalidRequestError(
                f"response_format {req.response_format.type!r} is not supported; use \"text\" "
                "(or a GBNF grammar in grammar_string)", "response_format")
        self.req = req
        prepared = chat_prompt(state, req)
        self.prompt, self.hook_state = prepared.prompt.text, prepared.prompt.state
        self.run = state.run(prepared.params, caller)
        self.cancel = self.run.cancel
        self.strip = not req.continue_  # a fresh reply starts at its first visible character

    def response(self) -> ChatCompletionResponse:
        chunks = list(self.run.chunks(self.prompt, hook_state=self.hook_state))
        last = chunks[-1]
        text = last.text.lstrip() if self.strip else last.text
        steps = [step for chunk in chunks for step in chunk.logprobs]
        choice = ChatCompletionResponseChoice(index=0, message=ChatCompletionMessage(role="assistant", content=text),
                                              logprobs=chat_logprobs(steps) if self.req.logprobs else None,
                                              finish_reason=FINISH[last.finish_reason or "stop"])
        return ChatCompletionResponse(**self._envelope(), choices=[choice], usage=usage(last))

    def _chunk(self, delta: DeltaMessage, finish: FinishReason | None,
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
        for chunk in self.run.chunks(self.prompt, hook_state=self.hook_state):
            last = chunk
            delta = chunk.delta if started else chunk.delta.lstrip()
            started = started or bool(delta)
            if delta:
                yield self._chunk(DeltaMessage(content=delta), None, chunk)
            if chunk.finish_reason:
                yield self._chunk(DeltaMessage(), FINISH[chunk.finish_reason], None if delta else chunk)
        if self.req.stream_options and self.req.stream_options.include_usage:
            yield _payload(ChatCompletionStreamResponse(**self._envelope(), choices=[], usage=usage(last)))
