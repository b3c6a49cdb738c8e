"""The chat side of the extension hooks: everything from the user's text to the prompt.

ChatService.build calls `build_with_hooks` when an extension is enabled, inside
ChatService.prepare: the one chat path of the UI's chat actions and the API's chat
completions alike (`is_api` in the state tells them apart). Order (docs/EXTENSIONS.md):
state_modifier -> chat_input_modifier -> input_modifier (new user text only) ->
history_modifier -> custom_generate_chat_prompt (first answer wins) or build_prompt ->
bot_prefix_modifier (a fresh reply only). The generator then runs custom_generate_reply,
tokenizer_modifier and output_modifier with the state built here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from modules.chat.prompt import CHAT, CHAT_INSTRUCT, REPLY, BuiltPrompt, copy_messages, stop_strings
from modules.chat.types import USER, Message
from modules.core.sampling import SamplingParams
from modules.engine.extensions import ExtensionRegistry, make_state


def _is(kind: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, kind)


def chat_state(registry: ExtensionRegistry, params: SamplingParams, setup: Any, action: str,
               is_api: bool) -> dict[str, Any]:
    """The hooks' state for one chat generation, after every state_modifier."""
    state = make_state(params, is_chat=True, is_api=is_api, mode=setup.mode, action=action,
                       name1=setup.persona.name, name2=setup.character.name, user_name=setup.persona.name,
                       character_name=setup.character.name, context=setup.character.context)
    return registry.chain("state_modifier", state, check=_is(dict))


def modify_user_input(registry: ExtensionRegistry, message: Message, state: dict[str, Any]) -> str:
    """chat_input_modifier then input_modifier on the new user message, in place.

    `content` becomes what the model reads; `visible` keeps what the UI shows when it differs
    (the user's own words before a translation).
    """
    text, visible = message.content, message.shown
    for ext in registry.enabled:
        if "chat_input_modifier" in ext.hooks:
            ok, result = registry.call(ext, "chat_input_modifier", text, visible, state)
            if ok and isinstance(result, tuple) and len(result) == 2 and all(isinstance(r, str) for r in result):
                text, visible = result
    text = registry.chain("input_modifier", text, state, True, check=_is(str))
    message.content = text
    message.visible = visible if visible != text else None
    return text


def build_with_hooks(registry: ExtensionRegistry, messages: Sequence[Message], setup: Any,
                     params: SamplingParams, action: str, new_input: bool, is_api: bool,
                     build: Callable[[list[Message]], BuiltPrompt], options: Any,
                     count_tokens: Callable[[str], int]) -> BuiltPrompt:
    """The prompt for `messages` with every prompt-side hook applied; `build` is build_prompt bound to the rest.

    With `new_input`, the last user message is the one just typed (send, an API request)
    and gets the input hooks; regenerate and continue reuse text already modified.
    """
    state = chat_state(registry, params, setup, action, is_api)
    messages = list(messages)
    user_input = ""
    if new_input:
        users = [m for m in messages if m.role == USER]
        if users:
            user_input = modify_user_input(registry, users[-1], state)
    history = registry.chain("history_modifier", copy_messages(messages), check=_is(list))
    _, custom = registry.first("custom_generate_chat_prompt", user_input, state, history=history,
                               action=action, setup=setup)
    if isinstance(custom, str):
        stops = stop_strings(setup.character, setup.persona, options)
        return BuiltPrompt(custom, stops, 0, count_tokens(custom), state)
    built = build(history)
    if action == REPLY:
        built = _with_bot_prefix(registry, built, setup, state)
    return replace(built, state=state)


def _with_bot_prefix(registry: ExtensionRegistry, built: BuiltPrompt, setup: Any,
                     state: dict[str, Any]) -> BuiltPrompt:
    """bot_prefix_modifier on the open reply line ("Name:" in the chat modes, "" in instruct).

    What it adds goes into the prompt only, as in ooba: the model continues after it.
    """
    prefix = f"{setup.character.name}:" if setup.mode in (CHAT, CHAT_INSTRUCT) else ""
    new = registry.chain("bot_prefix_modifier", prefix, state, check=_is(str))
    if new == prefix or not built.text.endswith(prefix):
        return built
    text = built.text[: len(built.text) - len(prefix)] + new
    return replace(built, text=text)
