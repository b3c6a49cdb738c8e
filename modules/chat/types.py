"""The chat engine's data: messages with swipes, chats, characters and personas.

Plain dataclasses shared by the prompt builder, the history store, the character store
and the two faces. Behaviour lives in the modules beside this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

USER, ASSISTANT, SYSTEM, TOOL = "user", "assistant", "system", "tool"
ROLES = (USER, ASSISTANT, SYSTEM, TOOL)


@dataclass
class Message:
    """One turn. An assistant turn may hold several alternative replies (swipes).

    `content` is always the selected swipe's text; `swipes` is empty for a turn that was
    never regenerated. `visible` is what the UI shows when an extension rewrote the text
    for display (e.g. a translation); None means the same as `content`.
    """

    role: str
    content: str
    swipes: list[str] = field(default_factory=list)
    swipe_index: int = 0
    visible: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form extras kept with the message (timestamps, model name, extension data)."""
    reasoning: str = ""
    """A reasoning model's thinking before `content` (kept apart from the reply; templates that
    show past thinking read it as `reasoning_content`)."""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """An assistant turn's function calls, OpenAI's shape: {"id", "type": "function",
    "function": {"name", "arguments"}} with arguments as JSON text."""
    tool_call_id: str = ""
    """A tool turn: the id of the call it answers."""
    name: str = ""
    """A tool turn: the function's name."""

    @property
    def shown(self) -> str:
        return self.content if self.visible is None else self.visible


@dataclass
class Chat:
    """A saved conversation with one character."""

    character: str
    """The character's name (its file stem in characters/)."""
    messages: list[Message] = field(default_factory=list)
    id: str = ""
    """The file stem under logs/chat/CHARACTER/; empty until first saved."""
    title: str = ""
    created: str = ""
    updated: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    revision: int = field(default=0, compare=False)
    """How many times the chat's file had been written when this copy was read or last saved.
    HistoryStore.save compares it with the file's own to notice that another tab saved in
    between; 0 for a chat never saved and for files from before revisions. Bookkeeping, not
    content: two chats with the same content are equal whatever their revisions."""
    notice: SaveNotice | None = field(default=None, compare=False, repr=False)
    """What the last save did besides an ordinary write (see SaveNotice), for the faces to show
    once; None after an ordinary save. Never written to the file."""


SAVED_AS_COPY = "saved_as_copy"
"""SaveNotice.kind: another tab or process had saved the chat since this copy was read, so
this copy was saved as a new chat (a conflict copy) instead of overwriting that save."""
RECREATED = "recreated"
"""SaveNotice.kind: the chat's file was gone (deleted or renamed elsewhere), so it was
written again under its id."""


@dataclass(frozen=True)
class SaveNotice:
    """What a save had to do so that nothing is lost, in words for the user.

    `kind` is SAVED_AS_COPY (the Chat object now *is* the copy: new id and title, so the
    next action continues there) or RECREATED; `original_id` the id the chat had before.
    """

    kind: str
    message: str
    original_id: str


@dataclass
class Character:
    """Who the model plays. ooba's YAML fields plus what a TavernAI card carries.

    `context` is the block placed at the top of the prompt (description, personality,
    scenario); `example_dialogue` uses `{{user}}` / `{{char}}` placeholders and
    `<START>` separators like TavernAI's `mes_example`.
    """

    name: str
    greeting: str = ""
    context: str = ""
    example_dialogue: str = ""
    picture: Path | None = None
    alternate_greetings: list[str] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)
    """The imported card's extra fields (creator, tags, system_prompt...), kept for export."""


@dataclass
class Persona:
    """Who the user is in the chat: a name and an optional description."""

    name: str = "You"
    description: str = ""
