"""The Chat tab and the Character sub-tab through gradio_client, over the scripted fake loader.

The whole UI is launched in-process on a free port (no browser); gradio_client keeps one
session per Client, so its gr.State is that client's own chat, as a browser tab's is.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from modules.chat.history import ChatSummary
from modules.chat.types import Chat, Message
from modules.core.settings import Settings
from modules.engine.app import App
from modules.engine.generation import GenerationChunk
from modules.ui import chat_view
from tests.fakes import script_text

SETUP = ("Assistant", "chat", "auto", "You", "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[App, str]]:
    from modules.ui.blocks import create_ui

    root = tmp_path_factory.mktemp("ui")
    (root / "models").mkdir()
    (root / "models" / "fake.gguf").write_bytes(b"GGUF")
    app = App.create(Settings(models_dir=str(root / "models"), settings=str(root / "settings.yaml")), root)
    app.models.load("fake.gguf", loader="fake", overrides={"ctx_size": 4096})
    app.models.current.script = script_text("Hi there!")  # type: ignore[union-attr]
    demo = create_ui(app)
    port = _free_port()
    demo.queue().launch(prevent_thread_lock=True, server_port=port, server_name="127.0.0.1")
    yield app, f"http://127.0.0.1:{port}/"
    demo.close()
    app.close()


def client(url: str):  # noqa: ANN201 - gradio_client.Client, imported lazily
    from gradio_client import Client

    return Client(url, verbose=False)


def texts(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], chat_view.message_text(m["content"])) for m in messages]


# ---------------------------------------------------------------- chat_view (pure)


def test_view_shows_user_and_assistant_turns_and_maps_edits_back() -> None:
    chat = Chat("Assistant", [Message("system", "be nice"), Message("user", "hi"),
                              Message("assistant", "hello", visible="HELLO")])
    assert chat_view.to_messages(chat) == [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "HELLO\n\n---\n> hello"}]
    assert chat_view.chat_index(chat, 1) == 2
    with pytest.raises(IndexError):
        chat_view.chat_index(chat, 2)
    assert chat_view.to_messages(None) == []


def test_message_text_reads_gradio_6_parts() -> None:
    assert chat_view.message_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    assert chat_view.message_text("plain") == "plain"
    assert chat_view.message_text({"content": [{"type": "text", "text": "x"}]}) == "x"
    assert chat_view.message_text(None) == ""


def test_swipe_label_and_target() -> None:
    reply = Message("assistant", "b", swipes=["a", "b", "c"], swipe_index=1)
    chat = Chat("Assistant", [Message("user", "q"), reply])
    assert chat_view.swipe_label(chat) == "2/3"
    assert chat_view.swipe_target(chat, -1) == 0 and chat_view.swipe_target(chat, 1) == 2
    reply.swipe_index = 2
    assert chat_view.swipe_target(chat, 1) is None
    assert chat_view.swipe_label(Chat("Assistant", [Message("assistant", "only")])) == ""


def test_chat_choices_and_stats() -> None:
    rows = [ChatSummary("20261122-010101", "", "2026-11-22T01:01:01+00:00", 3, preview="Hello"),
            ChatSummary("b", "Trip", "2026-11-21T09:00:00+00:00", 2),
            ChatSummary("c", "", "2026-11-20T09:00:00+00:00", 0, error="broken JSON")]
    labels = chat_view.chat_choices(rows)
    assert labels[0] == ("Hello · 2026-11-22 01:01 · 20261122-010101", "20261122-010101")
    assert labels[1][0].startswith("Trip") and labels[2][0].startswith("unreadable: broken JSON")
    chunk = GenerationChunk("", "abc", 5, 10, finish_reason="stop")
    assert chat_view.stats_text(chunk, 2.0) == "10 tokens, 5.0 tokens/s · stop"
    assert chat_view.stats_text(None, 1.0) == ""


# ---------------------------------------------------------------- Chat tab over HTTP


def test_send_regenerate_swipe_remove_and_save(served: tuple[App, str]) -> None:
    app, url = served
    c = client(url)
    messages, swipe, stats, chats, box = c.predict("Hello", "", *SETUP, api_name="/chat_send")
    assert texts(messages)[-2:] == [("user", "Hello"), ("assistant", "Hi there!")]
    assert box == "" and "tokens/s" in stats and swipe == ""
    chat_id = chats["value"]
    saved = json.loads((app.root / "logs" / "chat" / "Assistant" / f"{chat_id}.json").read_text())
    assert "Hi there!" in json.dumps(saved)
    messages, swipe, *_ = c.predict("", "", *SETUP, api_name="/chat_regenerate")
    assert swipe == "2/2"
    messages, swipe, *_ = c.predict("", "", *SETUP, api_name="/chat_continue")
    assert texts(messages)[-1][1].startswith("Hi there!Hi there!")
    messages, swipe, stats, chats, box = c.predict(api_name="/chat_remove_last")
    assert box == "Hello" and ("user", "Hello") not in texts(messages)


def test_start_reply_with_and_impersonate(served: tuple[App, str]) -> None:
    _, url = served
    c = client(url)
    messages, *_ = c.predict("Hi", "Well,", *SETUP, api_name="/chat_send")
    assert texts(messages)[-1][1].startswith("Well,")
    messages, _, _, _, box = c.predict("I", "", *SETUP, api_name="/chat_impersonate")
    assert box.startswith("I ") and texts(messages)[-1][0] == "assistant"  # not added to the chat


def test_two_sessions_never_share_a_chat(served: tuple[App, str]) -> None:
    _, url = served
    first, second = client(url), client(url)
    first.predict("Only in the first", "", *SETUP, api_name="/chat_send")
    messages, *_ = second.predict("Only in the second", "", *SETUP, api_name="/chat_send")
    shown = [text for _, text in texts(messages)]
    assert "Only in the second" in shown and "Only in the first" not in shown


def test_without_a_model_send_says_to_load_one_and_the_tab_keeps_working(served: tuple[App, str]) -> None:
    from gradio_client.exceptions import AppError

    app, url = served
    c = client(url)
    app.models.unload()
    try:
        with pytest.raises(AppError, match="Load a model first"):
            c.predict("Hello", "", *SETUP, api_name="/chat_send")
    finally:
        app.models.load("fake.gguf", loader="fake", overrides={"ctx_size": 4096})
        app.models.current.script = script_text("Hi there!")  # type: ignore[union-attr]
    messages, *_ = c.predict("Hello again", "", *SETUP, api_name="/chat_send")
    assert texts(messages)[-1] == ("assistant", "Hi there!")


# ---------------------------------------------------------------- Character sub-tab


def test_character_import_export_and_delete(served: tuple[App, str], tmp_path: Path) -> None:
    from gradio_client import handle_file

    app, url = served
    c = client(url)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"spec": "chara_card_v2", "spec_version": "2.0",
                                "data": {"name": "Mira", "first_mes": "Hey {{user}}!", "description": "A pilot."}}))
    picker, status = c.predict(handle_file(str(card)), api_name="/character_import")
    assert picker["value"] == "Mira" and "Imported" in status
    assert app.characters.load("Mira").greeting == "Hey {{user}}!"
    exported, status = c.predict("Mira", api_name="/character_export")
    assert Path(exported).read_bytes().startswith(b"\x89PNG")
    picker, status = c.predict("Mira", api_name="/character_delete")
    assert "Deleted" in status and "Mira" not in app.characters.list() and picker["value"] != "Mira"


def test_a_generation_failure_is_a_readable_message(served: tuple[App, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from gradio_client.exceptions import AppError

    app, url = served
    model = app.models.current

    def broken(*args: object, **kwargs: object) -> Iterator[int]:
        yield from script_text("Hal")
        raise RuntimeError("the backend fell over")

    monkeypatch.setattr(model, "generate", broken)
    c = client(url)
    with pytest.raises(AppError, match="Generation failed") as failure:
        c.predict("Hello", "", *SETUP, api_name="/chat_send")
    assert "Traceback" not in str(failure.value)
    monkeypatch.undo()
    messages, *_ = c.predict("Still there?", "", *SETUP, api_name="/chat_send")
    assert texts(messages)[-1] == ("assistant", "Hi there!")


def test_character_save_with_a_picture_and_refuse_an_empty_name(served: tuple[App, str], tmp_path: Path) -> None:
    from gradio_client import handle_file
    from PIL import Image

    app, url = served
    c = client(url)
    picture = tmp_path / "face.jpg"
    Image.new("RGB", (32, 32), (10, 120, 200)).save(picture)
    picker, status = c.predict(None, "Odo", "Hi.", "A guard.", "", handle_file(str(picture)),
                               api_name="/character_save")
    assert picker["value"] == "Odo" and "Saved" in status
    stored = app.characters.load("Odo")
    assert stored.context == "A guard." and stored.picture is not None and stored.picture.suffix == ".png"
    picker, status = c.predict(None, "", "", "", "", None, api_name="/character_save")
    assert "Could not save" in status  # no name: a message, not a crash


def test_persona_fields_come_from_the_persona_store(served: tuple[App, str]) -> None:
    from modules.chat.types import Persona
    from modules.ui.chat_tab import _persona_fields

    app, _ = served
    app.personas.save(Persona(name="Sam", description="A sailor."))
    assert _persona_fields(app, "Sam") == ["Sam", "A sailor."]


def test_a_rewritten_message_shows_both_texts_and_edits_keep_only_the_typed_one():
    from modules.chat.types import ASSISTANT, Message
    from modules.ui import chat_view

    translated = Message(ASSISTANT, "Hello Bob.\nHow are you?", visible="Bonjour Bob.\nComment vas-tu ?")
    shown = chat_view.display_text(translated)
    assert shown == "Bonjour Bob.\nComment vas-tu ?\n\n---\n> Hello Bob.\n> How are you?"
    assert chat_view.display_text(Message(ASSISTANT, "plain")) == "plain"
    assert chat_view.edited_text([{"type": "text", "text": "Salut Bob." + shown[len(translated.visible):]}]) == "Salut Bob."


def test_a_save_after_another_tab_saved_becomes_a_copy_and_the_tab_continues_there(served: tuple[App, str]) -> None:
    app, url = served
    c = client(url)
    *_, chats, _ = c.predict("Hello", "", *SETUP, api_name="/chat_send")
    original = chats["value"]
    other_tab = app.history.load("Assistant", original)  # another tab has the same chat open and sends
    other_tab.messages.append(Message("user", "from the other tab"))
    app.history.save(other_tab)

    messages, _, stats, chats, _ = c.predict("Mine", "", *SETUP, api_name="/chat_send")
    copy_id = chats["value"]
    assert copy_id != original and "saved as a separate chat" in stats and "tokens/s" in stats
    assert texts(messages)[-2:] == [("user", "Mine"), ("assistant", "Hi there!")]
    assert app.history.load("Assistant", original).messages[-1].content == "from the other tab"
    copy = app.history.load("Assistant", copy_id)
    assert copy.title.endswith("(conflict copy)") and [m.content for m in copy.messages][-2:] == ["Mine", "Hi there!"]

    _, _, stats, chats, _ = c.predict("Next", "", *SETUP, api_name="/chat_send")
    assert chats["value"] == copy_id and "separate chat" not in stats  # the tab moved to the copy
    other_tab = app.history.load("Assistant", copy_id)
    other_tab.title = "changed elsewhere"
    app.history.save(other_tab)
    _, _, stats, chats, box = c.predict(api_name="/chat_remove_last")  # an edit's save is caught too
    assert box == "Next" and chats["value"] not in (original, copy_id) and "separate chat" in stats
    assert app.history.load("Assistant", copy_id).title == "changed elsewhere"


def test_status_text_puts_a_save_notice_under_the_stats() -> None:
    assert chat_view.status_text("10 tokens", "") == "10 tokens"
    assert chat_view.status_text("10 tokens", "Saved as a copy.") == "10 tokens\n\n⚠️ Saved as a copy."
    assert chat_view.status_text("", "Saved as a copy.") == "⚠️ Saved as a copy."


def test_thinking_shows_as_a_collapsible_block_above_its_reply() -> None:
    chat = Chat("Assistant", [Message("user", "hi"), Message("assistant", "hello", reasoning="They greet me.")])
    shown = chat_view.to_messages(chat)
    assert shown[1] == {"role": "assistant", "content": "They greet me.",
                        "metadata": {"title": chat_view.THINKING_TITLE, "status": "done"}}
    assert shown[2] == {"role": "assistant", "content": "hello"}
    assert chat_view.chat_index(chat, 2) == 1  # edits of the reply map past the block
    with pytest.raises(IndexError):
        chat_view.chat_index(chat, 1)  # the thinking block itself is not edited
    chat.messages[1].content = ""
    assert chat_view.to_messages(chat)[1]["metadata"]["status"] == "pending"  # still thinking
