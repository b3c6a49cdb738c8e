"""The Chat tab in a real browser: no model, then the GGUF and the Transformers folder.

One server and one page for the module (tests run in file order and share the page):
Send with no model says to load one; then, per loader, load from the Model tab, send,
watch the reply stream, Stop it, regenerate, swipe back and forth, and reopen the saved
chat from the past-chats list.
"""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from tests.browser.conftest import REPO, Server, screenshot, wait_until

pytestmark = pytest.mark.timeout(240)

BOT = "#chat-log [data-testid='bot']"
USER = "#chat-log [data-testid='user']"


def open_tab(page, name: str) -> None:  # noqa: ANN001 - Playwright's Page
    page.get_by_role("tab", name=name, exact=True).click()


def load_model(page, name: str) -> None:  # noqa: ANN001
    """Pick `name` in the Model tab and press Load; waits for the status line."""
    open_tab(page, "Model")
    picker = page.get_by_label("Model", exact=True)
    picker.click()
    page.get_by_role("option", name=name, exact=True).click()
    page.get_by_role("button", name="Load", exact=True).click()
    page.get_by_text(re.compile(f"Loaded {re.escape(name)}")).wait_for(timeout=90_000)
    open_tab(page, "Chat")


def bot_text(page, index: int = -1) -> str:  # noqa: ANN001
    """The text of a bot bubble now, or "" while the chat is being redrawn (bubbles can vanish
    between counting them and reading one: callers poll through wait_until)."""
    bubbles = page.locator(BOT)
    count = bubbles.count()
    if not count:
        return ""
    try:
        return bubbles.nth(index % count).inner_text(timeout=1_000)
    except PlaywrightTimeoutError:
        return ""


def test_send_without_a_model_says_to_load_one(page, server: Server) -> None:
    page.fill("#chat-input textarea", "Hello?")
    page.click("#chat-send")
    page.get_by_text(re.compile("Load a model first")).first.wait_for(timeout=15_000)
    screenshot(page, "chat-no-model")
    assert page.locator(USER).count() == 0  # the refused message is not added to the chat
    assert page.input_value("#chat-input textarea") == "Hello?"  # and stays in the box to send later
    # Dismiss the toast so later tests see a clean page.
    for close in page.locator(".toast-close").all():
        close.click()


def chat_round(page, server: Server, model: str, tag: str) -> None:  # noqa: ANN001
    """The whole flow on the loaded model; leaves the page on the Chat tab."""
    load_model(page, model)
    page.click("#chat-new")
    wait_until(lambda: page.locator(USER).count() == 0, what="a new chat")
    page.fill("#chat-input textarea", f"Hello from {tag}")
    page.click("#chat-send")
    page.locator(USER).filter(has_text=f"Hello from {tag}").wait_for()
    # Streaming: the reply grows while we watch, then Stop ends it early.
    wait_until(lambda: len(bot_text(page)) > 5, what="the reply to start streaming")
    first = bot_text(page)
    wait_until(lambda: len(bot_text(page)) > len(first), what="the reply to grow")
    screenshot(page, f"chat-{tag}-streaming")
    page.click("#chat-stop")
    wait_until(lambda: "cancelled" in page.locator("#chat-stats").inner_text(), what="Stop to end the reply")
    stopped = bot_text(page)
    assert "tokens/s" in page.locator("#chat-stats").inner_text()
    time.sleep(0.5)
    assert bot_text(page) == stopped  # nothing arrives after Stop
    # Regenerate: a second alternative, shown as 2/2; stop it too to keep the test short.
    page.click("#chat-regenerate")
    wait_until(lambda: "2/2" in page.locator("#swipe-label").inner_text(), what="the 2/2 swipe counter")
    time.sleep(1.0)
    page.click("#chat-stop")
    wait_until(lambda: "cancelled" in page.locator("#chat-stats").inner_text() and
               bot_text(page) != stopped, what="the second alternative")
    second = bot_text(page)
    page.click("#swipe-prev")
    wait_until(lambda: "1/2" in page.locator("#swipe-label").inner_text(), what="swipe back to 1/2")
    assert bot_text(page) == stopped
    page.click("#swipe-next")
    wait_until(lambda: "2/2" in page.locator("#swipe-label").inner_text(), what="swipe forward to 2/2")
    assert bot_text(page) == second
    # Saved: it is in the past-chats list; a new chat, then reopening it, brings it back.
    saved = list((server.root / "logs" / "chat" / "Assistant").glob("*.json"))
    assert saved, "the chat was not saved"
    page.click("#chat-new")
    wait_until(lambda: page.locator(USER).count() == 0, what="a new chat")
    page.locator("#past-chats input").click()
    page.get_by_role("option", name=re.compile(f"Hello from {tag}")).first.click()
    page.locator(USER).filter(has_text=f"Hello from {tag}").wait_for()
    wait_until(lambda: bot_text(page) == second, what="the reopened chat's shown alternative")
    assert "2/2" in page.locator("#swipe-label").inner_text()


def test_chat_with_the_gguf(page, server: Server) -> None:
    pytest.importorskip("llama_cpp")
    chat_round(page, server, "tiny-f32.gguf", "gguf")
    # The conversation mid-way is the README's picture of the Chat tab.
    page.fill("#chat-input textarea", "Tell me a story")
    page.click("#chat-send")
    wait_until(lambda: len(bot_text(page)) > 40, what="a reply for the screenshot")
    # Stop first: a screenshot can take seconds on a loaded machine, time enough for the
    # 200-token reply to end by itself and the Stop to find nothing to cancel.
    page.click("#chat-stop")
    wait_until(lambda: "cancelled" in page.locator("#chat-stats").inner_text(), what="Stop")
    shot = page.screenshot(path=str(REPO / "test-artifacts" / "chat-tab.png"))
    assert shot


def test_chat_with_the_transformers_folder(page, server: Server) -> None:
    pytest.importorskip("transformers")
    chat_round(page, server, "tiny-hf", "hf")


def test_edit_continue_impersonate_branch_and_rename(page, server: Server) -> None:
    # Runs on whichever model the tests above left loaded (the Transformers folder, when installed).
    folder = server.root / "logs" / "chat" / "Assistant"
    page.locator("#chat-log button[aria-label='Edit']").last.click()
    page.fill("#chat-log textarea.edit-textarea", "Edited reply.")
    page.locator("#chat-log button[aria-label='Submit']").click()
    wait_until(lambda: bot_text(page) == "Edited reply.", what="the edited reply")
    wait_until(lambda: any("Edited reply." in p.read_text() for p in folder.glob("*.json")), what="the edit saved")
    page.click("#chat-continue")
    wait_until(lambda: len(bot_text(page)) > len("Edited reply. "), what="Continue to extend the reply")
    page.click("#chat-stop")
    wait_until(lambda: "cancelled" in page.locator("#chat-stats").inner_text() or
               "length" in page.locator("#chat-stats").inner_text(), what="Continue to end")
    assert bot_text(page).startswith("Edited reply.")
    page.fill("#chat-input textarea", "")
    page.click("#chat-impersonate")
    wait_until(lambda: len(page.input_value("#chat-input textarea")) > 3, what="an impersonated message")
    page.click("#chat-stop")
    before = len(list(folder.glob("*.json")))
    page.click("#chat-branch")
    wait_until(lambda: len(list(folder.glob("*.json"))) == before + 1, what="the branch saved as a new chat")
    page.locator("label:has-text('Title') textarea, label:has-text('Title') input").first.fill("My branch")
    page.click("#chat-rename")
    wait_until(lambda: "My branch" in page.input_value("#past-chats input"), what="the renamed chat in the list")
    screenshot(page, "chat-branch-renamed")


def test_character_picture_is_the_bot_avatar(page, server: Server) -> None:
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 80, 40)).save(server.root / "characters" / "Wren.png")
    picker = page.get_by_label("Character", exact=True).first
    picker.click()
    page.get_by_role("option", name="Wren", exact=True).click()
    page.locator("#chat-log img.avatar-image, #chat-log .avatar-container img").first.wait_for(timeout=15_000)
    screenshot(page, "chat-avatar")
    page.get_by_label("Character", exact=True).first.click()
    page.get_by_role("option", name="Assistant", exact=True).click()


def test_import_a_card_in_the_character_tab_and_chat_with_it(page, server: Server, tmp_path) -> None:  # noqa: ANN001
    card = tmp_path / "mira.json"
    card.write_text('{"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Mira", '
                    '"first_mes": "Welcome aboard, {{user}}.", "description": "A pilot."}}')
    open_tab(page, "Parameters")
    page.get_by_role("tab", name="Character", exact=True).click()
    page.locator("#character-import input[type=file]").set_input_files(str(card))
    page.get_by_text("Imported Mira").wait_for()
    screenshot(page, "character-tab")
    assert (server.root / "characters" / "Mira.yaml").is_file()
    open_tab(page, "Chat")
    page.get_by_label("Character", exact=True).first.click()
    page.get_by_role("option", name="Mira", exact=True).click()
    wait_until(lambda: bot_text(page) == "Welcome aboard, You.", what="Mira's greeting")
