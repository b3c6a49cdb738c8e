"""Building the prompt for a chat: the three modes, the stop strings, and context fitting.

- chat: the character's context (with the persona), its example dialogue, then
  "Name: text" turns, ending with "Character:" for the model to complete.
- chat-instruct: that chat transcript wrapped in an editable instruction ("Continue the
  chat dialogue below...") sent through the instruction template as one user turn.
- instruct: the instruction template over the messages, the character's context as the
  system message.

Fitting drops the oldest turns first, whole turns only (a cut always lands just before a
user message, so strict templates still see alternating roles), keeping the character
context, the persona and the greeting; lengths are counted with the loaded model's own
tokenizer. Rendering returns `(prompt, stop_strings)` and nothing else happens here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from modules.chat.tool_calls import detect_family, template_messages
from modules.chat.types import ASSISTANT, SYSTEM, TOOL, USER, Character, Message, Persona
from modules.core.errors import ContextLengthExceededError, InvalidRequestError

CHAT, CHAT_INSTRUCT, INSTRUCT = "chat", "chat-instruct", "instruct"
MODES = (CHAT, CHAT_INSTRUCT, INSTRUCT)
REPLY, CONTINUE, IMPERSONATE = "reply", "continue", "impersonate"

DEFAULT_CHAT_INSTRUCT_COMMAND = (
    'Continue the chat dialogue below. Write a single reply for the character "<|character|>".\n\n<|prompt|>'
)
GREETING_META = "greeting"
"""Message.meta key that marks the character's greeting (pinned when fitting)."""


class Renderer:
    """What the prompt builder needs from modules.chat.templates.TemplateRenderer."""

    def render(self, source: str, messages: list[dict[str, str]], **kw: object) -> str: ...

    def render_continuing(self, source: str, messages: list[dict[str, str]], **kw: object) -> str: ...


@dataclass
class PromptOptions:
    """How a chat turns into a prompt; the UI and the API fill this in."""

    mode: str = CHAT
    template: str = ""
    """Jinja2 source of the instruction template (instruct and chat-instruct)."""
    chat_instruct_command: str = DEFAULT_CHAT_INSTRUCT_COMMAND
    system_message: str = ""
    """Instruct mode's system message; empty uses the character's context."""
    bos_token: str = ""
    eos_token: str = ""
    extra_stop: list[str] = field(default_factory=list)
    template_vars: dict[str, Any] = field(default_factory=dict)
    """Variables beyond `messages` for the instruction template (`tools`, `enable_thinking`...)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}", "mode")
        if self.mode != CHAT and not self.template:
            raise InvalidRequestError(f"{self.mode} mode needs an instruction template", "instruction_template")


@dataclass(frozen=True)
class BuiltPrompt:
    text: str
    stop: list[str]
    dropped_messages: int
    """Oldest messages left out to fit the budget."""
    tokens: int
    state: dict[str, Any] | None = None
    """The extensions' state dict when extensions are enabled (the generator's hooks need it)."""


def substitute(text: str, character: Character, persona: Persona) -> str:
    """TavernAI placeholders: {{char}} / {{user}} and the legacy <BOT> / <USER>."""
    for key, value in (("{{char}}", character.name), ("<BOT>", character.name),
                       ("{{user}}", persona.name), ("<USER>", persona.name)):
        text = text.replace(key, value)
    for key, value in (("{{Char}}", character.name), ("{{User}}", persona.name)):
        text = text.replace(key, value)
    return text


def greeting_message(character: Character, persona: Persona) -> Message | None:
    """The character's first message for a new chat, marked so fitting keeps it."""
    if not character.greeting.strip():
        return None
    return Message(ASSISTANT, substitute(character.greeting, character, persona), meta={GREETING_META: True})


def build_prompt(
    messages: Sequence[Message],
    character: Character,
    persona: Persona,
    options: PromptOptions,
    renderer: Renderer,
    count_tokens: Callable[[str], int],
    budget: int,
    action: str = REPLY,
    partial: str = "",
) -> BuiltPrompt:
    """The prompt for the next reply (or to continue the last one, or to impersonate).

    `budget` is `truncation_length - max_new_tokens`. `partial` is what the user typed
    before Impersonate. Raises ContextLengthExceededError when even the pinned part and
    the newest turn do not fit.
    """
    if action not in (REPLY, CONTINUE, IMPERSONATE):
        raise InvalidRequestError(f"unknown chat action {action!r}", "action")
    if action == CONTINUE and (not messages or messages[-1].role != ASSISTANT):
        raise InvalidRequestError("there is no reply to continue", "continue_")
    pinned, turns = _split_pinned(messages, options.mode)
    cuts = [i for i, m in enumerate(turns) if m.role == USER or i == 0] or [0]

    def render(start: int) -> str:
        return _render(list(pinned) + list(turns[start:]), character, persona, options, renderer, action, partial)

    # Binary search over turn boundaries for the earliest start that fits (fewer turns,
    # fewer tokens); at most log2(turns) renders and tokenizations.
    lo, hi = 0, len(cuts) - 1
    best: tuple[int, str, int] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        text = render(cuts[mid])
        tokens = count_tokens(text)
        if tokens <= budget:
            best, hi = (cuts[mid], text, tokens), mid - 1
        else:
            lo = mid + 1
    if best is None:
        raise ContextLengthExceededError(
            f"the character context and the newest turn do not fit in {budget} tokens: shorten them, "
            "lower max_new_tokens or raise truncation_length",
            "messages",
        )
    start, text, tokens = best
    return BuiltPrompt(text, stop_strings(character, persona, options), start, tokens)


def _split_pinned(messages: Sequence[Message], mode: str) -> tuple[list[Message], list[Message]]:
    """Leading system messages and the greeting are pinned; the rest are droppable turns.

    Instruct mode leaves the greeting out, as ooba does: strict templates (Mistral,
    Gemma) refuse a conversation that starts with the assistant.
    """
    pinned: list[Message] = []
    index = 0
    while index < len(messages) and (messages[index].role == SYSTEM or messages[index].meta.get(GREETING_META)):
        if not (mode == INSTRUCT and messages[index].meta.get(GREETING_META)):
            pinned.append(messages[index])
        index += 1
    return pinned, list(messages[index:])


def stop_strings(character: Character, persona: Persona, options: PromptOptions) -> list[str]:
    """The user's stop strings plus, in the chat modes, the two speakers' next-line names."""
    stops = list(options.extra_stop)
    if options.mode in (CHAT, CHAT_INSTRUCT):
        stops += [f"\n{persona.name}:", f"\n{character.name}:"]
    return list(dict.fromkeys(s for s in stops if s))


def _render(
    messages: list[Message], character: Character, persona: Persona, options: PromptOptions,
    renderer: Renderer, action: str, partial: str,
) -> str:
    if options.mode == INSTRUCT:
        return _render_instruct(messages, character, persona, options, renderer, action, partial)
    transcript = _chat_transcript(messages, character, persona, action, partial)
    if options.mode == CHAT:
        return transcript
    return _render_chat_instruct(transcript, character, persona, options, renderer, action, partial)


def _character_block(character: Character, persona: Persona) -> str:
    """Context, persona description and example dialogue: the top of a chat prompt."""
    parts = [substitute(character.context.strip(), character, persona)]
    if persona.description.strip():
        parts.append(substitute(persona.description.strip(), character, persona))
    examples = substitute(character.example_dialogue, character, persona).replace("<START>", "").strip()
    if examples:
        parts.append(examples)
    return "\n\n".join(p for p in parts if p)


def _chat_transcript(
    messages: list[Message], character: Character, persona: Persona, action: str, partial: str
) -> str:
    """The chat-mode prompt: the character block, "Name: text" lines, and the open turn."""
    lines = []
    block = _character_block(character, persona)
    system = [m.content.strip() for m in messages if m.role == SYSTEM and m.content.strip()]
    head = "\n\n".join([block, *system]).strip()
    history = [m for m in messages if m.role != SYSTEM]
    if action == CONTINUE:
        history, last = history[:-1], history[-1]
    for message in history:
        speaker = persona.name if message.role == USER else character.name
        lines.append(f"{speaker}: {message.content}")
    if action == CONTINUE:
        lines.append(f"{character.name}: {last.content}")
    elif action == IMPERSONATE:
        lines.append(f"{persona.name}:" + (f" {partial}" if partial else ""))
    else:
        lines.append(f"{character.name}:")
    body = "\n".join(lines)
    return f"{head}\n\n{body}" if head else body


def _render_chat_instruct(
    transcript: str, character: Character, persona: Persona, options: PromptOptions,
    renderer: Renderer, action: str, partial: str,
) -> str:
    """The chat transcript (without its open last line) as one instruction, then that line."""
    body, _, open_line = transcript.rpartition("\n")
    speaker = persona.name if action == IMPERSONATE else character.name
    command = options.chat_instruct_command.replace("<|character|>", speaker).replace("<|prompt|>", body)
    command = substitute(command, character, persona)
    rendered = renderer.render(options.template, [{"role": USER, "content": command}], add_generation_prompt=True,
                               bos_token=options.bos_token, eos_token=options.eos_token)
    return rendered + open_line


def _render_instruct(
    messages: list[Message], character: Character, persona: Persona, options: PromptOptions,
    renderer: Renderer, action: str, partial: str,
) -> str:
    system = options.system_message.strip() or _character_block(character, persona)
    turns = template_messages([_template_message(m) for m in messages if m.role != SYSTEM],
                              detect_family(options.template))
    extra_system = [m.content for m in messages if m.role == SYSTEM and m.content.strip()]
    system = "\n\n".join([substitute(system, character, persona), *extra_system]).strip()
    chat = ([{"role": SYSTEM, "content": system}] if system else []) + turns
    kw = {**options.template_vars, "bos_token": options.bos_token, "eos_token": options.eos_token}
    if action == CONTINUE:
        return renderer.render_continuing(options.template, chat, **kw)
    if action == IMPERSONATE:
        return renderer.render_continuing(options.template, chat + [{"role": USER, "content": partial}], **kw)
    return renderer.render(options.template, chat, add_generation_prompt=True, **kw)


def _template_message(message: Message) -> dict[str, Any]:
    """A message as chat templates read it: OpenAI's fields, only those the turn has."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
    if message.role == TOOL:
        out.update(tool_call_id=message.tool_call_id, name=message.name)
    if message.reasoning:
        out["reasoning_content"] = message.reasoning
    return out


def with_start(messages: Sequence[Message], start_reply_with: str) -> list[Message]:
    """The messages plus an assistant turn already begun with `start_reply_with`."""
    return [*messages, Message(ASSISTANT, start_reply_with)]


def copy_messages(messages: Sequence[Message]) -> list[Message]:
    return [replace(m, swipes=list(m.swipes), meta=dict(m.meta)) for m in messages]
