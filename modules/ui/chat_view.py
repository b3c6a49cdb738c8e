"""How a Chat looks in the Chat tab: gr.Chatbot messages, the swipe counter, the chat list.

Pure functions over the engine's types (no gradio import), so they are tested without a
browser. The Chatbot shows only user and assistant turns; `chat_index` maps a shown
position back to the chat's own list for the edit event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modules.chat.history import ChatSummary
from modules.chat.types import ASSISTANT, USER, Chat, Message
from modules.engine.generation import GenerationChunk
from modules.ui.common import speed_text

SHOWN_ROLES = (USER, ASSISTANT)


def _shown(chat: Chat | None) -> list[tuple[int, Message]]:
    if chat is None:
        return []
    return [(i, m) for i, m in enumerate(chat.messages) if m.role in SHOWN_ROLES]


ORIGINAL_MARK = "\n\n---\n"
"""Separates a message's shown text from the model's text when an extension rewrote it."""


def display_text(message: Message) -> str:
    """What the Chatbot shows: the text, or, when an extension (translate) rewrote it, the
    rewritten text with the model's own text quoted under it, so both are visible."""
    if message.visible is None or message.visible == message.content:
        return message.content
    quoted = "\n".join(f"> {line}" for line in message.content.splitlines() or [""])
    return f"{message.visible}{ORIGINAL_MARK}{quoted}"


def edited_text(value: Any) -> str:
    """The text a user typed into an edited message, without the quoted model text."""
    return message_text(value).split(ORIGINAL_MARK, 1)[0]


THINKING_TITLE = "Thinking"


def _bubbles(chat: Chat | None) -> list[tuple[int | None, dict[str, Any]]]:
    """(index in chat.messages, or None for a thinking block; the gr.Chatbot message) in order.

    A reply's thinking is its own collapsible block above the reply (Gradio's message
    `metadata` title), "pending" while the model is still thinking (no reply text yet)."""
    bubbles: list[tuple[int | None, dict[str, Any]]] = []
    for index, message in _shown(chat):
        if message.role == ASSISTANT and message.reasoning:
            status = "done" if message.content.strip() else "pending"
            bubbles.append((None, {"role": ASSISTANT, "content": message.reasoning,
                                   "metadata": {"title": THINKING_TITLE, "status": status}}))
        bubbles.append((index, {"role": message.role, "content": display_text(message)}))
    return bubbles


def to_messages(chat: Chat | None) -> list[dict[str, Any]]:
    """The chat as gr.Chatbot messages ({"role", "content"}, and "metadata" for thinking)."""
    return [bubble for _, bubble in _bubbles(chat)]


def chat_index(chat: Chat, shown_index: int) -> int:
    """The index in `chat.messages` of the message shown at `shown_index`.

    Raises IndexError when the Chatbot's position is not one of the shown messages (or is
    a thinking block, which is not edited).
    """
    bubbles = _bubbles(chat)
    if not 0 <= shown_index < len(bubbles) or bubbles[shown_index][0] is None:
        raise IndexError(shown_index)
    index = bubbles[shown_index][0]
    assert index is not None
    return index


def message_text(value: Any) -> str:
    """Plain text of a Chatbot message value: a string, or Gradio 6's list of parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return message_text(value.get("content", value.get("text", "")))
    if isinstance(value, Sequence):
        return "".join(str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in value)
    return "" if value is None else str(value)


def swipe_label(chat: Chat | None) -> str:
    """ "2/3" when the last reply has alternatives, else "" (nothing to switch between)."""
    if chat is None or not chat.messages:
        return ""
    last = chat.messages[-1]
    if last.role != ASSISTANT or len(last.swipes) < 2:
        return ""
    return f"{last.swipe_index + 1}/{len(last.swipes)}"


def swipe_target(chat: Chat | None, step: int) -> int | None:
    """The alternative one `step` away from the shown one, or None at either end."""
    if chat is None or not chat.messages or not chat.messages[-1].swipes:
        return None
    last = chat.messages[-1]
    target = last.swipe_index + step
    return target if 0 <= target < len(last.swipes) else None


def chat_choices(summaries: Sequence[ChatSummary]) -> list[tuple[str, str]]:
    """(label, id) pairs for the past-chats dropdown, newest first as the store lists them."""
    choices = []
    for summary in summaries:
        name = summary.title or summary.preview or "(empty chat)"
        if summary.error:
            name = f"unreadable: {summary.error[:60]}"
        when = summary.updated[:16].replace("T", " ")
        choices.append((f"{name} · {when} · {summary.id}", summary.id))
    return choices


def stats_text(chunk: GenerationChunk | None, seconds: float) -> str:
    """ "N tokens, R tokens/s" for the last reply, with why it ended once it has."""
    return "" if chunk is None else speed_text(chunk, seconds)


def status_text(stats: str, notice: str = "") -> str:
    """The status line under the chat: the reply's stats, then what saving had to do (e.g.
    "saved as a separate chat" when another tab had changed this one), if anything."""
    if not notice:
        return stats
    return f"{stats}\n\n⚠️ {notice}" if stats else f"⚠️ {notice}"
