"""Chat tab: talk with a character, stream replies, swipe, edit, and keep past chats.

The browser session's Chat object lives in a gr.State, so two browser tabs never mix
chats; saved chats are files under logs/chat/CHARACTER/ shared by everyone. Every action
is one call into app.chat (ChatService) or app.history (HistoryStore); this module only
builds components and wires them (STYLE rule 13). When two tabs have the same chat open
and the other one saved first, this tab's save becomes a conflict copy (HistoryStore.save):
the tab says so, in a toast and on the status line, and continues in the copy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.chat.prompt import CHAT, MODES
from modules.chat.service import ChatSetup, ChatStream
from modules.chat.types import SAVED_AS_COPY, Chat
from modules.core.errors import ModelNotLoadedError, WorkbenchError
from modules.engine.app import App
from modules.ui import chat_view, extensions_ui
from modules.ui.common import sampling_from_state

log = logging.getLogger(__name__)
AUTO = "auto"
LOAD_FIRST = "Load a model first: no model is loaded (pick one in the Model tab and press Load)."
_REDRAW_S = 0.05  # redraw at most ~20 times a second: fast models would flood the browser


@dataclass
class ChatWidgets:
    """The tab's components, so the wiring helpers can name them."""

    state: gr.State
    chatbot: gr.Chatbot
    text: gr.Textbox
    start_with: gr.Textbox
    swipe: gr.Markdown
    stats: gr.Markdown
    character: gr.Dropdown
    mode: gr.Radio
    template: gr.Dropdown
    template_reason: gr.Markdown
    user_name: gr.Textbox
    persona: gr.Textbox
    persona_pick: gr.Dropdown
    chats: gr.Dropdown
    title: gr.Textbox
    buttons: dict[str, gr.Button]

    @property
    def setup_inputs(self) -> list[Any]:
        return [self.character, self.mode, self.template, self.user_name, self.persona]

    @property
    def view(self) -> list[Any]:
        """What every action redraws: the chat, its state, the swipe counter, stats, the chat list."""
        return [self.chatbot, self.state, self.swipe, self.stats, self.chats]


def create_ui(app: App, params_state: gr.State, demo: gr.Blocks | None = None) -> ChatWidgets:
    """Build the tab; with `demo`, the browser session's chat opens when the page loads."""
    w = _layout(app)
    _wire_generation(app, w, params_state)
    _wire_editing(app, w)
    _wire_history(app, w)
    if demo is not None:
        demo.load(lambda *values: _open_latest(app, *values), w.setup_inputs, w.view, api_visibility="private")
        demo.load(lambda t: _template_reason(app, t), [w.template], w.template_reason, api_visibility="private")
    return w


def refresh_on_show(app: App, w: ChatWidgets, tab: gr.Tab) -> None:
    """When the Chat tab is shown again: re-list characters (the Character tab may have changed
    them) and say which template "auto" means now (the loaded model may have changed)."""
    def on_show(character: str, template: str) -> list[Any]:
        names = app.characters.list()
        value = character if character in names else (names[0] if names else None)
        return [gr.update(choices=names, value=value), _template_reason(app, template),
                gr.update(choices=app.personas.list())]

    tab.select(on_show, [w.character, w.template], [w.character, w.template_reason, w.persona_pick],
               api_visibility="private")


def _layout(app: App) -> ChatWidgets:
    characters = app.characters.list()
    default_character = "Assistant" if "Assistant" in characters or not characters else characters[0]
    picture = _picture(app, default_character)
    buttons: dict[str, gr.Button] = {}
    with gr.Row():
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(label="Chat", height=520, buttons=["copy", "copy_all"], editable="all",
                                 avatar_images=(None, picture), elem_id="chat-log")
            with gr.Row(equal_height=True):
                buttons["prev"] = gr.Button("<", size="sm", min_width=40, scale=0, elem_id="swipe-prev")
                swipe = gr.Markdown("", elem_id="swipe-label", min_width=50)
                buttons["next"] = gr.Button(">", size="sm", min_width=40, scale=0, elem_id="swipe-next")
                stats = gr.Markdown("", elem_id="chat-stats", min_width=300)
            text = gr.Textbox(label="Message", lines=2, placeholder="Send a message", elem_id="chat-input")
            with gr.Row():
                for name, variant in (("Send", "primary"), ("Stop", "stop"), ("Regenerate", "secondary"),
                                      ("Continue", "secondary"), ("Impersonate", "secondary"),
                                      ("Remove last", "secondary")):
                    buttons[name] = gr.Button(name, variant=variant, min_width=90,  # type: ignore[arg-type]
                                              elem_id=f"chat-{name.lower().replace(' ', '-')}")
            start_with = gr.Textbox(label="Start reply with", placeholder="Sure thing!", elem_id="chat-start-with")
        with gr.Column(scale=2):
            character = gr.Dropdown(characters or ["Assistant"], value=default_character, label="Character")
            mode = gr.Radio(list(MODES), value=CHAT, label="Mode")
            template = gr.Dropdown([AUTO, *app.templates.list()], value=AUTO, label="Instruction template",
                                   info="Used in instruct and chat-instruct modes")
            template_reason = gr.Markdown("")
            persona_pick = gr.Dropdown(app.personas.list(), value=None, label="Saved persona",
                                       info="Fills in your name and persona")
            with gr.Row():
                user_name = gr.Textbox(value="You", label="Your name")
                persona = gr.Textbox(label="Persona", placeholder="Who you are, for the character", lines=2)
            chats = gr.Dropdown([], label="Past chats", elem_id="past-chats", allow_custom_value=False)
            with gr.Row():
                for name in ("New", "Branch", "Delete"):
                    buttons[name] = gr.Button(name, size="sm", elem_id=f"chat-{name.lower()}")
            with gr.Row():
                title = gr.Textbox(label="Title", placeholder="A name for this chat", scale=3)
                buttons["Rename"] = gr.Button("Rename", size="sm", scale=1, elem_id="chat-rename")
    return ChatWidgets(gr.State(None), chatbot, text, start_with, swipe, stats, character, mode, template,
                       template_reason, user_name, persona, persona_pick, chats, title, buttons)


# --------------------------------------------------------------------------- generation


def _wire_generation(app: App, w: ChatWidgets, params_state: gr.State) -> None:
    # One running stream per browser session, so Stop in one tab never stops another's.
    running: dict[str, ChatStream] = {}
    inputs = [w.state, w.text, w.start_with, params_state, *w.setup_inputs]
    outputs = [*w.view, w.text]

    def action(kind: str) -> Callable[..., Iterator[list[Any]]]:
        # Named parameters, not *args: gradio injects `request` only into a named one.
        def handler(chat: Chat | None, text: str, start_with: str, params: dict[str, Any], character: str,
                    mode: str, template: str, user_name: str, persona: str,
                    request: gr.Request) -> Iterator[list[Any]]:
            try:
                setup = _setup(app, character, mode, template, user_name, persona)
                chat = chat if chat is not None else app.chat.new_chat(setup)
                sampling = sampling_from_state(params)
                stream = _start(app, kind, chat, text, start_with, setup, sampling)
            except ModelNotLoadedError:
                raise _error(LOAD_FIRST) from None
            except WorkbenchError as exc:
                raise _error(str(exc)) from None
            running[request.session_hash] = stream
            try:
                yield from _drive(app, chat, stream, kind, text)
            finally:
                running.pop(request.session_hash, None)
        return handler

    for name, kind in (("Send", "send"), ("Regenerate", "regenerate"), ("Continue", "continue"),
                       ("Impersonate", "impersonate")):
        w.buttons[name].click(action(kind), inputs, outputs, concurrency_limit=4,
                              api_name=f"chat_{kind}")
    w.text.submit(action("send"), inputs, outputs, concurrency_limit=4, api_visibility="private")

    def on_stop(request: gr.Request) -> None:
        stream = running.get(request.session_hash)
        if stream is not None:
            stream.cancel()

    w.buttons["Stop"].click(on_stop, None, None, concurrency_limit=None, api_name="chat_stop")


def _start(app: App, kind: str, chat: Chat, text: str, start_with: str, setup: ChatSetup,
           sampling: Any) -> ChatStream:
    """One chat action through the chat path the API shares (ChatService.prepare); the Chat tab
    saves its chats (logs/chat/), which the API never does."""
    if kind == "send":
        return app.chat.send(chat, text, setup, sampling, start_reply_with=start_with, save=True)
    if kind == "regenerate":
        return app.chat.regenerate(chat, setup, sampling, save=True)
    if kind == "continue":
        return app.chat.continue_(chat, setup, sampling, save=True)
    return app.chat.impersonate(chat, setup, sampling, partial=text)


def _drive(app: App, chat: Chat, stream: ChatStream, kind: str, text: str) -> Iterator[list[Any]]:
    """Redraw while the stream runs; the input box is cleared on send and filled on impersonate."""
    box: Any = "" if kind == "send" else gr.update()
    start, shown = time.perf_counter(), 0.0
    try:
        for chunk in stream:
            now = time.perf_counter()
            if chunk.finish_reason is None and now - shown < _REDRAW_S:
                continue
            shown = now
            if kind == "impersonate":
                box = stream.text
            yield [*_view(app, chat, stats=chat_view.stats_text(chunk, now - start), chats=gr.update()), box]
    except WorkbenchError as exc:
        raise _error(f"Generation failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a backend failure must leave the UI usable
        log.exception("chat generation failed")
        raise _error(f"Generation failed: {type(exc).__name__}: {exc}") from None
    finally:
        extensions_ui.show_errors(app)
        notice = _take_notice(chat)  # the save ran when the stream ended, also when it failed
    # The stream saved the chat when it ended: now it has an id for the past-chats list
    # (a new one if the save became a conflict copy, so the list selects the copy).
    seconds = time.perf_counter() - start
    stats = chat_view.status_text(chat_view.stats_text(stream.last, seconds), notice)
    final = [*_view(app, chat, stats=stats), box]
    if kind == "impersonate":
        final[-1] = stream.text
    yield final


# --------------------------------------------------------------------------- editing


def _wire_editing(app: App, w: ChatWidgets) -> None:
    def on_swipe(step: int) -> Callable[[Chat | None], list[Any]]:
        def handler(chat: Chat | None) -> list[Any]:
            target = chat_view.swipe_target(chat, step)
            if chat is None or target is None:
                return _view(app, chat, chats=gr.update())
            app.chat.swipe(chat, target)
            return _saved_view(app, chat)
        return handler

    def on_edit(chat: Chat | None, event: gr.EditData) -> list[Any]:
        if chat is None:
            return _view(app, chat)
        index = event.index[0] if isinstance(event.index, (tuple, list)) else event.index
        try:
            app.chat.edit(chat, chat_view.chat_index(chat, int(index)), chat_view.edited_text(event.value))
        except (IndexError, WorkbenchError) as exc:
            gr.Warning(f"Could not edit that message: {exc}")
            return _view(app, chat)
        return _saved_view(app, chat)

    def on_remove(chat: Chat | None) -> list[Any]:
        if chat is None:
            return [*_view(app, chat), gr.update()]
        try:
            user_text = app.chat.remove_last(chat)
        except WorkbenchError as exc:
            gr.Warning(str(exc))
            return [*_view(app, chat), gr.update()]
        return [*_saved_view(app, chat), user_text]

    w.buttons["prev"].click(on_swipe(-1), w.state, w.view, api_visibility="private")
    w.buttons["next"].click(on_swipe(1), w.state, w.view, api_visibility="private")
    w.chatbot.edit(on_edit, w.state, w.view, api_visibility="private")
    w.buttons["Remove last"].click(on_remove, w.state, [*w.view, w.text], api_name="chat_remove_last")


# --------------------------------------------------------------------------- past chats


def _wire_history(app: App, w: ChatWidgets) -> None:
    def on_new(*setup_values: Any) -> list[Any]:
        try:
            return _view(app, app.chat.new_chat(_setup(app, *setup_values)))
        except WorkbenchError as exc:
            raise _error(f"Could not start a chat: {exc}") from None

    def on_switch(chat: Chat | None, chat_id: str | None) -> list[Any]:
        if not chat_id or chat is None:
            return _view(app, chat)
        try:
            return _view(app, app.history.load(chat.character, chat_id))
        except WorkbenchError as exc:
            gr.Warning(f"Could not open that chat: {exc}")
            return _view(app, chat)

    def on_character(*setup_values: Any) -> list[Any]:
        return _open_latest(app, *setup_values)

    def on_delete(chat: Chat | None, *setup_values: Any) -> list[Any]:
        if chat is None or not chat.id:
            return on_new(*setup_values)
        try:
            app.history.delete(chat.character, chat.id)
        except WorkbenchError as exc:
            gr.Warning(str(exc))
        return _open_latest(app, chat.character, *setup_values[1:])

    def on_branch(chat: Chat | None) -> list[Any]:
        if chat is None or not chat.messages:
            gr.Warning("There is nothing to branch yet.")
            return _view(app, chat)
        try:
            return _view(app, app.history.branch(chat, len(chat.messages) - 1))
        except WorkbenchError as exc:
            gr.Warning(str(exc))
            return _view(app, chat)

    def on_rename(chat: Chat | None, title: str) -> list[Any]:
        if chat is None or not chat.id:
            gr.Warning("Send a message first: the chat is saved with its first reply.")
            return _view(app, chat)
        try:
            titled = app.history.set_title(chat.character, chat.id, title.strip())
            return _view(app, titled, stats=chat_view.status_text("", _take_notice(titled)))
        except WorkbenchError as exc:
            gr.Warning(str(exc))
            return _view(app, chat)

    w.buttons["New"].click(on_new, w.setup_inputs, w.view, api_visibility="private")
    w.chats.input(on_switch, [w.state, w.chats], w.view, api_visibility="private")
    w.character.input(on_character, w.setup_inputs, w.view, api_visibility="private")
    w.buttons["Delete"].click(on_delete, [w.state, *w.setup_inputs], w.view, api_visibility="private")
    w.buttons["Branch"].click(on_branch, w.state, w.view, api_visibility="private")
    w.buttons["Rename"].click(on_rename, [w.state, w.title], w.view, api_visibility="private")
    w.template.change(lambda t: _template_reason(app, t), w.template, w.template_reason, api_visibility="private")
    w.persona_pick.input(lambda name: _persona_fields(app, name), w.persona_pick, [w.user_name, w.persona],
                         api_visibility="private")


# --------------------------------------------------------------------------- helpers


def _error(message: str) -> gr.Error:
    """A toast for the user; print_exception=False keeps expected errors out of the server log."""
    return gr.Error(message, print_exception=False)


def _setup(app: App, character: str, mode: str, template: str, user_name: str, persona: str) -> ChatSetup:
    """The ChatSetup from the side panel, by the rules the API's chat completions use too
    (ChatService.setup): "auto" follows the loaded model, resolved now; an empty name or
    persona box means the saved default persona's (personas/You.yaml)."""
    return app.chat.setup(character, mode, template, user_name=user_name, persona_text=persona)


def _template_reason(app: App, template: str) -> str:
    try:
        choice = app.chat.choose_template(None if not template or template == AUTO else template)
    except WorkbenchError as exc:
        return f"**Template problem:** {exc}"
    return f"Template **{choice.name}**: {choice.reason}."


def _persona_fields(app: App, name: str | None) -> list[Any]:
    """Your name and persona text from a saved persona (personas/NAME.yaml)."""
    if not name:
        return [gr.update(), gr.update()]
    try:
        persona = app.personas.load(name)
    except WorkbenchError as exc:
        gr.Warning(f"Could not read the persona {name}: {exc}")
        return [gr.update(), gr.update()]
    return [persona.name, persona.description]


def _picture(app: App, character: str) -> str | None:
    try:
        path = app.characters.picture_path(character)
    except WorkbenchError:
        return None
    return str(path) if path is not None else None


def _view(app: App, chat: Chat | None, stats: str = "", chats: Any = None) -> list[Any]:
    """Values for ChatWidgets.view; `chats` None means "list this character's chats again"."""
    if chats is None:
        chats = _chat_list(app, chat)
    return [chat_view.to_messages(chat), chat, chat_view.swipe_label(chat), stats, chats]


def _saved_view(app: App, chat: Chat) -> list[Any]:
    """Save a chat that is already on disk (edits to a never-saved chat wait for its first reply)."""
    if chat.id:
        try:
            app.history.save(chat)
        except (WorkbenchError, OSError) as exc:
            gr.Warning(f"Could not save the chat: {exc}")
    return _view(app, chat, stats=chat_view.status_text("", _take_notice(chat)))


def _take_notice(chat: Chat | None) -> str:
    """What the last save had to do besides writing (a conflict copy, a chat written again after
    a delete elsewhere): toasted once and returned for the status line; "" after a plain save."""
    if chat is None or chat.notice is None:
        return ""
    notice, chat.notice = chat.notice, None
    if notice.kind == SAVED_AS_COPY:
        gr.Warning(notice.message, duration=None)  # stays until closed: the tab moved to another chat
    else:
        gr.Info(notice.message)
    return notice.message


def _chat_list(app: App, chat: Chat | None) -> Any:
    if chat is None:
        return gr.update(choices=[], value=None)
    choices = chat_view.chat_choices(app.history.list(chat.character))
    return gr.update(choices=choices, value=chat.id or None)


def _open_latest(app: App, character: str, mode: str = CHAT, template: str = AUTO, user_name: str = "You",
                 persona: str = "") -> list[Any]:
    """ChatWidgets.view for the character's latest saved chat (or a new one), with its avatar."""
    name = character or "Assistant"
    try:
        chat = app.history.latest(name) or app.chat.new_chat(_setup(app, name, mode, template, user_name, persona))
    except WorkbenchError as exc:
        gr.Warning(f"Could not open {name}: {exc}")
        chat = Chat(character=name)
    view = _view(app, chat)
    view[0] = gr.Chatbot(value=view[0], avatar_images=(None, _picture(app, name)))
    return view
