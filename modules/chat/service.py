"""Chat actions over the generator: send, regenerate (a new swipe), continue, start the
reply with given words, impersonate, swipe, edit, remove the last exchange.

Both faces share one chat path: `ChatService.setup` turns what a face was given (character,
mode, template, your name and persona) into a ChatSetup, and `ChatService.prepare` turns
messages + setup + sampling params into what is generated (the fitted prompt with the
extension hooks applied, and the params with the prompt's stop strings). The Chat tab's
actions below and the API's chat completions (modules/api/completions.py) both call them;
each face only maps its own input and output.

Each generating action returns a ChatStream: iterate it for GenerationChunks while the
chat's last message is updated in place, so the UI redraws from the chat. The chat is
saved when the stream ends, also when it was stopped, so a half-written reply is never
lost; `prepare(save=...)` says so explicitly: the UI's actions save, the API never does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from modules.chat.agents import (
    GENERIC,
    NO_AGENT,
    AgentOptions,
    Constraint,
    ReplyFormat,
    constraint,
    polyfill,
    reply_format,
    template_vars,
)
from modules.chat.characters import DEFAULT_CHARACTER, DEFAULT_PERSONA, CharacterStore, PersonaStore
from modules.chat.hooks import build_with_hooks
from modules.chat.prompt import (
    CHAT,
    CONTINUE,
    DEFAULT_CHAT_INSTRUCT_COMMAND,
    GREETING_META,
    IMPERSONATE,
    INSTRUCT,
    MODES,
    REPLY,
    BuiltPrompt,
    PromptOptions,
    Renderer,
    build_prompt,
    greeting_message,
)
from modules.chat.templates import TemplateChoice, TemplateStore, choose_template, load_model_patterns
from modules.chat.tool_calls import parse_reply
from modules.chat.types import ASSISTANT, SYSTEM, USER, Character, Chat, Message, Persona
from modules.core.errors import InvalidRequestError
from modules.core.sampling import SamplingParams
from modules.engine.extensions import ExtensionRegistry
from modules.engine.generation import GenerationChunk, Generator, Stream
from modules.engine.model_manager import ModelManager

log = logging.getLogger(__name__)

AUTO_TEMPLATE = "auto"
"""The template choice that means "automatic" (as None and "" do): the UI's dropdown shows it,
and API clients send it as instruction_template."""


@dataclass
class ChatSetup:
    """Who talks, how the prompt is shaped and which template renders it."""

    character: Character
    persona: Persona
    mode: str = CHAT
    template: str = ""
    """Jinja2 source of the instruction template (instruct and chat-instruct modes)."""
    chat_instruct_command: str = DEFAULT_CHAT_INSTRUCT_COMMAND
    system_message: str = ""
    agent: AgentOptions = NO_AGENT
    """Tools, a forced call or schema, and the template's thinking switches (modules/chat/agents.py)."""


@dataclass(frozen=True)
class PreparedChat:
    """What one chat generation sends to the generator, the same for every face."""

    prompt: BuiltPrompt
    """The fitted prompt (extension hooks applied); `prompt.state` is the hooks' state."""
    params: SamplingParams
    """The caller's params with the prompt's stop strings merged in (the caller's first)."""
    save: bool
    """Whether the chat is saved when its generation ends: the UI's actions save, the API never does."""
    reply: ReplyFormat | None = None
    """How the reply is split into reasoning, content and tool calls (None: plain text)."""


class ChatStream:
    """Chunks of one chat action; `text` is the message as shown, `cancel()` stops it.

    `apply(content, visible, reasoning)` writes each step into the chat: when an
    output_modifier changed the final text, `content` keeps the model's words (the next
    prompt reads them) and `visible` the modified text (what the UI shows); else `visible`
    is None. A reasoning model's thinking is split off the reply as it streams (`reasoning`,
    None when the reply was not read for it: a continued reply keeps the thinking it had).
    """

    def __init__(self, stream: Stream, apply: Callable[[str, str | None, str | None], None], prefix: str,
                 strip_leading: bool, on_end: Callable[[], None], prompt: BuiltPrompt,
                 reply: ReplyFormat | None = None) -> None:
        self._stream = stream
        self._apply = apply
        self._prefix = prefix
        self._strip = strip_leading
        self._on_end = on_end
        self._reply = reply if not prefix else None
        self.prompt = prompt
        self.text = prefix
        self.last: GenerationChunk | None = None

    def __iter__(self) -> Iterator[GenerationChunk]:
        reader = self._reply.stream_text() if self._reply is not None else None
        try:
            for chunk in self._stream:
                raw = chunk.text if chunk.original is None else chunk.original
                reasoning = None
                if reader is not None:
                    reader.feed(chunk.delta)
                    if chunk.finish_reason:
                        reader.finish()
                    if chunk.original is not None:  # an extension rewrote the text: read the model's own
                        parsed = parse_reply(raw, self._reply.family, tools=False, thinking=self._reply.thinking)
                        raw, reasoning = parsed.content, parsed.reasoning.strip()
                    else:
                        raw, reasoning = reader.content, reader.reasoning.strip()
                content = self._prefix + self._clean(raw, chunk)
                visible = None
                if chunk.original is not None:
                    visible = self._prefix + self._clean(chunk.text, chunk)
                self.text = visible if visible is not None else content
                self._apply(content, visible, reasoning)
                self.last = chunk
                yield chunk
        finally:
            self._stream.cancel()
            self._on_end()

    def _clean(self, text: str, chunk: GenerationChunk) -> str:
        text = text.lstrip() if self._strip else text
        return text.rstrip() if chunk.finish_reason else text

    def cancel(self) -> None:
        self._stream.cancel()

    def result(self) -> str:
        for _ in self:
            pass
        return self.text


class ChatService:
    """The chat actions; one per App, shared by the UI and the API.

    `save(chat)` runs when each generating action ends (HistoryStore.save in the app). It
    may change the chat in place: when another session saved the same chat meanwhile, the
    chat becomes a conflict copy with a new id and `chat.notice` set, so whoever holds the
    object (a browser tab's state) continues in the copy and can tell the user.
    """

    def __init__(self, generator: Generator, models: ModelManager, renderer: Renderer,
                 save: Callable[[Chat], object] | None = None,
                 templates: TemplateStore | None = None, patterns_file: Path | None = None,
                 extensions: ExtensionRegistry | None = None, characters: CharacterStore | None = None,
                 personas: PersonaStore | None = None) -> None:
        self.generator = generator
        self.extensions = extensions
        self.models = models
        self.renderer = renderer
        self._save = save
        self.templates = templates
        self.patterns_file = patterns_file
        self.characters = characters
        self.personas = personas

    def choose_template(self, user_choice: str | None = None) -> TemplateChoice:
        """The instruction template for the loaded model: the user's choice, else the model's
        own, else the first models/config.yaml pattern matching its name, else ChatML.

        None, "" and "auto" all mean "automatic"."""
        if self.templates is None:
            raise InvalidRequestError("no instruction templates are available", "instruction_template")
        model = self.models.current
        patterns = load_model_patterns(self.patterns_file) if self.patterns_file else []
        choice = None if user_choice == AUTO_TEMPLATE else user_choice
        return choose_template(self.models.name or "", model.info.chat_template if model else None,
                               choice, self.templates, patterns)

    # --- setup -------------------------------------------------------------------------
    def setup(self, character: str | None, mode: str | None, template: str | None,
              user_name: str | None = None, persona_text: str | None = None, system_message: str = "",
              chat_instruct_command: str | None = None, agent: AgentOptions = NO_AGENT) -> ChatSetup:
        """The ChatSetup for what a face was given; the UI and the API both call this.

        `character` None or "" is the Assistant; `mode` None is chat; `template` None, "" or
        "auto" follows the loaded model (choose_template), and is resolved only in the modes
        that render one, so chat mode never fails on a template it does not use. The persona
        is `persona()`'s. Raises InvalidRequestError for an unknown mode or a missing
        character or template.
        """
        mode = mode or CHAT
        if mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", "mode")
        if self.characters is None:
            raise InvalidRequestError("no characters are available", "character")
        return ChatSetup(
            character=self.characters.load(character or DEFAULT_CHARACTER),
            persona=self.persona(user_name, persona_text),
            mode=mode,
            template=self.choose_template(template).source if mode != CHAT else "",
            chat_instruct_command=chat_instruct_command or DEFAULT_CHAT_INSTRUCT_COMMAND,
            system_message=system_message,
            agent=agent,
        )

    def persona(self, user_name: str | None = None, persona_text: str | None = None) -> Persona:
        """Who the user is, by one rule for every face: the saved default persona
        (personas/You.yaml; name "You" when there is no file) is the base, a given name
        replaces its name and given persona text replaces its description. Blank counts as
        not given. The file is read only when something is missing, so a broken one is
        reported only where it would be used.
        """
        name = (user_name or "").strip()
        description = persona_text if persona_text and persona_text.strip() else ""
        if name and description:
            return Persona(name=name, description=description)
        base = self.personas.load(DEFAULT_PERSONA) if self.personas is not None else Persona(DEFAULT_PERSONA)
        return Persona(name=name or base.name, description=description or base.description)

    # --- building ---------------------------------------------------------------------
    def new_chat(self, setup: ChatSetup) -> Chat:
        """A fresh chat with the character; it opens with the greeting outside instruct mode."""
        chat = Chat(character=setup.character.name)
        greeting = greeting_message(setup.character, setup.persona)
        if greeting is not None and setup.mode != "instruct":
            chat.messages.append(greeting)
        return chat

    def build(self, messages: list[Message], setup: ChatSetup, params: SamplingParams,
              action: str = REPLY, partial: str = "", *, new_input: bool = False,
              is_api: bool = False) -> BuiltPrompt:
        """The prompt the model would get, fitted to the loaded model's context (the faces call
        `prepare()`, which also gives the params their stop strings).

        With extensions enabled, the prompt-side hooks run here (modules/chat/hooks.py) and
        the result carries their `state`; `new_input` marks the last user message as just
        typed, so the input hooks rewrite it in place (content, visible).
        """
        model = self.models.require()
        window = model.info.context_length
        budget = min(params.truncation_length or window, window) - params.max_new_tokens
        options = PromptOptions(
            mode=setup.mode, template=setup.template, chat_instruct_command=setup.chat_instruct_command,
            system_message=setup.system_message, bos_token=model.info.bos_token or "",
            eos_token=model.info.eos_token or "", extra_stop=list(params.stop),
            template_vars=template_vars(setup.agent, setup.template) if setup.mode == INSTRUCT else {},
        )
        # A template that renders no tools (and every non-instruct mode) gets them as text.
        messages, tool_prompt = polyfill(messages, setup.agent, setup.template, setup.mode == INSTRUCT)
        if tool_prompt:
            messages = [Message(SYSTEM, tool_prompt), *messages]
        def count(text: str) -> int:
            return len(model.encode(text, add_bos=params.add_bos_token))

        def build(history: list[Message]) -> BuiltPrompt:
            return build_prompt(history, setup.character, setup.persona, options, self.renderer, count, budget,
                                action, partial)

        if self.extensions is None or not self.extensions.active:
            return build(messages)
        return build_with_hooks(self.extensions, messages, setup, params, action, new_input, is_api, build,
                                options, count)

    def prepare(self, messages: list[Message], setup: ChatSetup, params: SamplingParams,
                action: str = REPLY, partial: str = "", *, new_input: bool = False, is_api: bool,
                save: bool) -> PreparedChat:
        """The one chat path: what is generated for `messages`, for the UI and the API alike.

        The prompt is `build()`'s (fitted to the context, extension hooks applied, `is_api`
        telling the hooks which face asks); the params get the prompt's stop strings after the
        caller's own. `save` is the face's saving rule, carried to where the generation ends:
        the Chat tab's actions save the chat, the API never does.
        """
        setup.agent.check()
        prompt = self.build(messages, setup, params, action, partial, new_input=new_input, is_api=is_api)
        stops = list(dict.fromkeys([*params.stop, *prompt.stop]))
        reply = reply_format(setup.agent, setup.template, prompt.text)
        grammar = constraint(setup.agent, reply)
        if grammar.optional and not self.models.require().capabilities.grammar:
            grammar = Constraint()
        if grammar.grammar:
            if params.grammar_string:
                raise InvalidRequestError("grammar_string cannot be combined with a forced tool call or a "
                                          "response_format schema: send one of them", "grammar_string")
            params = params.replace(grammar_string=grammar.grammar, grammar_triggers=list(grammar.triggers))
        if reply.tools or reply.thinking or reply.family.name != GENERIC:
            # The reply is read for calls and thinking, whose markup is often special tokens
            # (<|channel|>, [TOOL_CALLS]): they must reach the text to be read (and taken out).
            params = params.replace(skip_special_tokens=False)
        return PreparedChat(prompt, params.replace(stop=stops), save, reply)

    # --- generating actions ----------------------------------------------------------
    # The Chat tab's actions (is_api=False); `save` is its saving rule, passed on to prepare().
    def send(self, chat: Chat, text: str, setup: ChatSetup, params: SamplingParams,
             start_reply_with: str = "", *, save: bool = True) -> ChatStream:
        """Add the user's message and stream the character's reply."""
        if not text.strip() and not start_reply_with:
            raise InvalidRequestError("the message is empty", "text")
        user, reply = Message(USER, text), Message(ASSISTANT, start_reply_with)
        pending = [*chat.messages, user, reply]
        if start_reply_with:
            prepared = self.prepare(pending, setup, params, CONTINUE, new_input=True, is_api=False, save=save)
        else:
            prepared = self.prepare(pending[:-1], setup, params, REPLY, new_input=True, is_api=False, save=save)
        chat.messages += [user, reply]  # only once the prompt is built: a refused send leaves the chat as it was
        return self._start(chat, prepared, lambda t, v, r: _set_content(reply, t, v, r), start_reply_with,
                           strip=not start_reply_with)

    def regenerate(self, chat: Chat, setup: ChatSetup, params: SamplingParams, *, save: bool = True) -> ChatStream:
        """A new alternative for the last reply, kept beside the old ones as a swipe."""
        last = _last_reply(chat)
        prepared = self.prepare(chat.messages[:-1], setup, params, REPLY, is_api=False, save=save)
        if not last.swipes:
            last.swipes = [last.content]
            if last.reasoning:
                last.meta[SWIPE_REASONING] = [last.reasoning]
        last.swipes.append("")
        last.swipe_index = len(last.swipes) - 1
        return self._start(chat, prepared, lambda t, v, r: _set_content(last, t, v, r), "", strip=True)

    def continue_(self, chat: Chat, setup: ChatSetup, params: SamplingParams, *, save: bool = True) -> ChatStream:
        """Extend the last reply where it stopped."""
        last = _last_reply(chat, allow_greeting=True)
        prepared = self.prepare(chat.messages, setup, params, CONTINUE, is_api=False, save=save)
        return self._start(chat, prepared, lambda t, v, r: _set_content(last, t, v, r), last.content, strip=False)

    def impersonate(self, chat: Chat, setup: ChatSetup, params: SamplingParams, partial: str = "") -> ChatStream:
        """Write the user's next message (shown in the input box, not added to the chat: nothing to save)."""
        prepared = self.prepare(chat.messages, setup, params, IMPERSONATE, partial, is_api=False, save=False)
        prefix = f"{partial} " if partial and not partial.endswith(" ") else partial
        return self._start(None, prepared, lambda t, v, r: None, prefix, strip=True)

    def _start(self, chat: Chat | None, prepared: PreparedChat,
               apply: Callable[[str, str | None, str | None], None], prefix: str, strip: bool) -> ChatStream:
        prompt = prepared.prompt
        if prompt.state is None:
            stream = self.generator.submit(prompt.text, prepared.params)
        else:
            stream = self.generator.submit(prompt.text, prepared.params, state=prompt.state, is_chat=True)

        def on_end() -> None:
            if chat is not None and prepared.save and self._save is not None:
                try:
                    self._save(chat)
                except Exception:  # noqa: BLE001 - a failed save is logged; the reply stays in memory
                    log.exception("could not save the chat with %s", chat.character)

        return ChatStream(stream, apply, prefix, strip, on_end, prompt, prepared.reply)

    # --- editing -----------------------------------------------------------------------
    @staticmethod
    def swipe(chat: Chat, index: int) -> Message:
        """Show alternative `index` (negative counts from the end) of the last reply."""
        last = _last_reply(chat, allow_greeting=True)
        if not last.swipes:
            raise InvalidRequestError("the last reply has no alternatives yet: regenerate first", "swipe")
        if not -len(last.swipes) <= index < len(last.swipes):
            raise InvalidRequestError(f"there are {len(last.swipes)} alternatives; no number {index}", "swipe")
        last.swipe_index = index % len(last.swipes)
        last.content = last.swipes[last.swipe_index]
        last.visible = None  # an extension's display text belonged to the swipe shown before
        thoughts = last.meta.get(SWIPE_REASONING)
        last.reasoning = thoughts[last.swipe_index] if isinstance(thoughts, list) and \
            last.swipe_index < len(thoughts) and isinstance(thoughts[last.swipe_index], str) else ""
        return last

    @staticmethod
    def edit(chat: Chat, index: int, text: str) -> Message:
        """Replace the text of message `index` (the shown alternative, for a reply)."""
        if not -len(chat.messages) <= index < len(chat.messages):
            raise InvalidRequestError(f"the chat has no message number {index}", "index")
        message = chat.messages[index]
        _set_content(message, text)
        message.visible = None
        return message

    @staticmethod
    def remove_last(chat: Chat) -> str:
        """Remove the last exchange; returns the user's text so it can go back to the input box."""
        removable = [m for m in chat.messages if not m.meta.get(GREETING_META)]
        if not removable:
            raise InvalidRequestError("there is nothing to remove", "messages")
        user_text = ""
        if chat.messages[-1].role == ASSISTANT and not chat.messages[-1].meta.get(GREETING_META):
            chat.messages.pop()
        if chat.messages and chat.messages[-1].role == USER:
            user_text = chat.messages.pop().content
        return user_text


SWIPE_REASONING = "swipe_reasoning"
"""Message.meta key: each swipe's thinking, beside `swipes` (Message.reasoning is the shown one's)."""


def _set_content(message: Message, text: str, visible: str | None = None, reasoning: str | None = None) -> None:
    message.content = text
    message.visible = visible
    if message.swipes:
        message.swipes[message.swipe_index] = text
    if reasoning is None:
        return
    message.reasoning = reasoning
    if message.swipes:
        thoughts = message.meta.get(SWIPE_REASONING)
        thoughts = list(thoughts) if isinstance(thoughts, list) else []
        thoughts += [""] * (len(message.swipes) - len(thoughts))
        thoughts[message.swipe_index] = reasoning
        message.meta[SWIPE_REASONING] = thoughts


def _last_reply(chat: Chat, allow_greeting: bool = False) -> Message:
    if not chat.messages or chat.messages[-1].role != ASSISTANT:
        raise InvalidRequestError("the chat does not end with a reply", "messages")
    last = chat.messages[-1]
    if last.meta.get(GREETING_META) and not allow_greeting:
        raise InvalidRequestError("the greeting cannot be regenerated; send a message first", "messages")
    return last
