"""Two tabs (threads, processes) saving copies of one chat: nothing is ever silently lost.

Each saved file carries a revision; a save from a copy read at an older revision becomes a
conflict copy (a new chat) instead of overwriting the other save.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from modules.chat import chat_formats
from modules.chat.history import CONFLICT_SUFFIX, HistoryStore
from modules.chat.types import RECREATED, SAVED_AS_COPY, Chat, Message
from modules.core.errors import InvalidRequestError


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 22, 1, 15, 30, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float = 1) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "chat"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(root: Path, clock: Clock) -> HistoryStore:
    return HistoryStore(root, now=clock)


def saved_chat(store: HistoryStore, title: str = "Trip") -> Chat:
    return store.save(Chat("Alice", [Message("assistant", "Hello!"), Message("user", "first")], title=title))


def all_contents(root: Path) -> dict[str, list[str]]:
    """Every saved chat of Alice's: id -> message texts (read from the files, not the objects)."""
    store = HistoryStore(root)
    return {s.id: [m.content for m in store.load("Alice", s.id).messages] for s in store.list("Alice")}


def file_revision(root: Path, chat_id: str) -> object:
    return json.loads((root / "Alice" / f"{chat_id}.json").read_text(encoding="utf-8")).get("revision")


# --- one tab -------------------------------------------------------------------------------

def test_the_same_copy_saved_again_and_again_never_conflicts(store, root):
    chat = saved_chat(store)
    assert chat.revision == 1 and chat.notice is None
    for n in range(2, 7):
        chat.messages.append(Message("user", f"message {n}"))
        assert store.save(chat) is chat
        assert chat.revision == n and chat.notice is None
    assert list(all_contents(root)) == [chat.id]
    assert file_revision(root, chat.id) == 6
    assert store.load("Alice", chat.id).revision == 6


def test_a_copy_loaded_after_the_last_save_overwrites_normally(store):
    chat = saved_chat(store)
    again = store.load("Alice", chat.id)
    again.messages.append(Message("user", "second"))
    store.save(again)
    assert again.id == chat.id and again.revision == 2 and again.notice is None


# --- two tabs in turn ----------------------------------------------------------------------

def test_two_copies_saved_in_turn_keep_both_and_the_second_becomes_a_copy(store, root, clock):
    original = saved_chat(store)
    tab_a, tab_b = store.load("Alice", original.id), store.load("Alice", original.id)
    tab_a.messages.append(Message("user", "from tab A"))
    store.save(tab_a)
    clock.tick(5)
    tab_b.messages.append(Message("user", "from tab B"))
    assert store.save(tab_b) is tab_b

    assert tab_a.id == original.id and tab_a.notice is None
    assert tab_b.id == "20261122-011535" and tab_b.title == "Trip" + CONFLICT_SUFFIX
    assert tab_b.notice is not None and tab_b.notice.kind == SAVED_AS_COPY
    assert tab_b.notice.original_id == original.id and "another tab" in tab_b.notice.message
    assert tab_b.meta["branched_from"] == {"id": original.id, "index": 2, "conflict": True}
    assert all_contents(root) == {
        original.id: ["Hello!", "first", "from tab A"],
        tab_b.id: ["Hello!", "first", "from tab B"],
    }
    # Each tab goes on where its save landed, without further conflicts.
    tab_b.messages.append(Message("user", "B again"))
    tab_a.messages.append(Message("user", "A again"))
    store.save(tab_b)
    store.save(tab_a)
    assert tab_b.notice is None and tab_a.notice is None
    assert all_contents(root) == {
        original.id: ["Hello!", "first", "from tab A", "A again"],
        tab_b.id: ["Hello!", "first", "from tab B", "B again"],
    }


def test_an_untitled_chat_copy_is_titled_after_its_first_message(store):
    chat = saved_chat(store, title="")
    stale = store.load("Alice", chat.id)
    store.save(chat)
    store.save(stale)
    assert stale.title == "first" + CONFLICT_SUFFIX
    stale_again = store.load("Alice", stale.id)
    store.save(stale)
    store.save(stale_again)  # a copy of a copy does not grow the suffix twice
    assert stale_again.title == "first" + CONFLICT_SUFFIX


def test_a_title_set_in_another_tab_is_not_overwritten_either(store, root):
    chat = saved_chat(store)
    store.set_title("Alice", chat.id, "Renamed elsewhere")
    chat.messages.append(Message("user", "mine"))
    store.save(chat)
    assert chat.notice is not None and chat.notice.kind == SAVED_AS_COPY
    assert store.load("Alice", chat.notice.original_id).title == "Renamed elsewhere"
    assert all_contents(root)[chat.id][-1] == "mine"


# --- two tabs at once ----------------------------------------------------------------------

def test_many_threads_saving_copies_of_one_chat_lose_nothing(store, root):
    original = saved_chat(store)
    threads_n, saves_n = 6, 40
    copies = [store.load("Alice", original.id) for _ in range(threads_n)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def tab(n: int) -> None:
        try:
            start.wait()
            for i in range(saves_n):
                copies[n].messages.append(Message("user", f"tab {n} message {i}"))
                store.save(copies[n])
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    workers = [threading.Thread(target=tab, args=(n,)) for n in range(threads_n)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []

    on_disk = all_contents(root)
    assert set(on_disk) == {copy.id for copy in copies}  # one file per tab, no strays
    assert sum(copy.id == original.id for copy in copies) == 1  # the first writer kept the chat
    for n, copy in enumerate(copies):
        assert on_disk[copy.id] == ["Hello!", "first", *(f"tab {n} message {i}" for i in range(saves_n))]
        assert store.load("Alice", copy.id) == copy
    assert not [p for p in (root / "Alice").iterdir() if p.name.endswith(".tmp")]


def test_threads_reopening_the_shared_chat_before_each_message_lose_nothing(store, root):
    """Tabs that reload the chat before each message keep colliding on the same file."""
    original = saved_chat(store)
    threads_n, saves_n = 4, 30
    landed: dict[str, str] = {}  # message -> the chat id its save landed in
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def tab(n: int) -> None:
        try:
            start.wait()
            for i in range(saves_n):
                chat = store.load("Alice", original.id)
                text = f"tab {n} message {i}"
                chat.messages.append(Message("user", text))
                store.save(chat)
                landed[text] = chat.id
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    workers = [threading.Thread(target=tab, args=(n,)) for n in range(threads_n)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == [] and len(landed) == threads_n * saves_n
    on_disk = all_contents(root)
    for text, chat_id in landed.items():
        assert text in on_disk[chat_id]
    in_original = [t for t, chat_id in landed.items() if chat_id == original.id]
    assert sorted(on_disk[original.id][2:]) == sorted(in_original)  # nothing it held was overwritten
    assert set(on_disk) == set(landed.values())


def test_a_save_by_another_process_during_the_write_is_caught_before_the_rename(root, clock, monkeypatch):
    """Two stores on one folder are two processes: no shared lock, only the re-check on disk."""
    ours, theirs = HistoryStore(root, now=clock), HistoryStore(root, now=clock)
    original = saved_chat(ours)
    mine, other = ours.load("Alice", original.id), theirs.load("Alice", original.id)
    mine.messages.append(Message("user", "mine"))
    other.messages.append(Message("user", "theirs"))
    real_fsync, fired = os.fsync, []

    def fsync_then_other_process_saves(fd: int) -> None:
        real_fsync(fd)
        if not fired:  # our temp file is written: the other process saves right now
            fired.append(True)
            theirs.save(other)

    monkeypatch.setattr(os, "fsync", fsync_then_other_process_saves)
    ours.save(mine)
    monkeypatch.undo()
    assert fired and other.id == original.id and other.notice is None
    assert mine.id != original.id and mine.notice is not None and mine.notice.kind == SAVED_AS_COPY
    assert all_contents(root) == {original.id: ["Hello!", "first", "theirs"], mine.id: ["Hello!", "first", "mine"]}
    assert not [p for p in (root / "Alice").iterdir() if p.name.endswith(".tmp")]


# --- delete, rename, unreadable files -------------------------------------------------------

def test_a_save_after_a_delete_elsewhere_writes_the_chat_again(store, root):
    chat = saved_chat(store)
    stale = store.load("Alice", chat.id)
    store.delete("Alice", chat.id)
    chat.messages.append(Message("user", "still talking"))
    store.save(chat)
    assert chat.notice is not None and chat.notice.kind == RECREATED and chat.id in chat.notice.message
    assert all_contents(root) == {chat.id: ["Hello!", "first", "still talking"]}
    assert chat.revision == 2
    stale.messages.append(Message("user", "older copy"))
    store.save(stale)  # a copy older than the recreated file does not overwrite it
    assert stale.notice is not None and stale.notice.kind == SAVED_AS_COPY
    assert all_contents(root)[chat.id] == ["Hello!", "first", "still talking"]


def test_a_save_after_the_file_was_renamed_keeps_both(store, root):
    chat = saved_chat(store)
    store.rename("Alice", chat.id, "Renamed")
    chat.messages.append(Message("user", "after the rename"))
    store.save(chat)
    assert chat.notice is not None and chat.notice.kind == RECREATED
    assert all_contents(root) == {"Renamed": ["Hello!", "first"], chat.id: ["Hello!", "first", "after the rename"]}


def test_a_file_that_became_unreadable_is_left_alone_and_the_copy_saved_beside_it(store, root):
    chat = saved_chat(store)
    path = root / "Alice" / f"{chat.id}.json"
    path.write_text("{ broken", encoding="utf-8")
    chat.messages.append(Message("user", "mine"))
    store.save(chat)
    assert chat.notice is not None and chat.notice.kind == SAVED_AS_COPY
    assert path.read_text(encoding="utf-8") == "{ broken"
    assert store.load("Alice", chat.id).messages[-1].content == "mine"


def test_a_failed_conflict_copy_leaves_the_chat_object_and_folder_as_they_were(store, root, monkeypatch):
    import modules.chat.history as history

    chat = saved_chat(store)
    store.save(store.load("Alice", chat.id))  # another tab saved: our copy is stale
    before = (chat.id, chat.title, chat.created, chat.updated, dict(chat.meta), chat.revision)
    files = sorted(p.name for p in (root / "Alice").iterdir())

    def broken(path: Path, text: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(history, "atomic_write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        store.save(chat)
    assert (chat.id, chat.title, chat.created, chat.updated, chat.meta, chat.revision) == before
    assert chat.notice is None
    assert sorted(p.name for p in (root / "Alice").iterdir()) == files  # the copy's id was released


# --- files from before revisions -----------------------------------------------------------

def test_an_old_file_without_a_revision_loads_and_saves(store, root):
    old = Chat("Alice", [Message("user", "from an older version")], id="old-chat", title="Old",
               created="2025-01-01T10:00:00+00:00", updated="2025-01-01T10:00:00+00:00")
    (root / "Alice").mkdir(parents=True)
    (root / "Alice" / "old-chat.json").write_text(chat_formats.dump_native(old), encoding="utf-8")
    assert file_revision(root, "old-chat") is None

    tab_a, tab_b = store.load("Alice", "old-chat"), store.load("Alice", "old-chat")
    assert tab_a == old and tab_a.revision == 0
    tab_a.messages.append(Message("user", "new"))
    store.save(tab_a)
    assert tab_a.id == "old-chat" and tab_a.notice is None and file_revision(root, "old-chat") == 1
    tab_b.messages.append(Message("user", "other tab"))
    store.save(tab_b)  # both tabs opened the old file: the second save is still caught
    assert tab_b.id != "old-chat" and tab_b.notice is not None
    assert all_contents(root)["old-chat"] == ["from an older version", "new"]


def test_ooba_files_get_a_revision_when_saved_back(store, root):
    (root / "Alice").mkdir(parents=True)
    ooba = {"internal": [["Yo", "Hey"]], "visible": [["Yo", "Hey"]]}
    (root / "Alice" / "ooba.json").write_text(json.dumps(ooba), encoding="utf-8")
    chat = store.load("Alice", "ooba")
    assert chat.revision == 0
    store.save(chat)
    assert chat.id == "ooba" and chat.notice is None and file_revision(root, "ooba") == 1


def test_a_bad_revision_in_a_file_is_refused_by_name(store, root):
    chat = saved_chat(store)
    path = root / "Alice" / f"{chat.id}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for bad in ("3", -1, True, 1.5):
        data["revision"] = bad
        path.write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(InvalidRequestError, match=f"{chat.id}.json: revision"):
            store.load("Alice", chat.id)


def test_exports_do_not_carry_the_revision(store):
    chat = saved_chat(store)
    store.save(chat)
    exported = chat_formats.export_native(chat)
    assert "revision" not in json.loads(exported)
    imported = chat_formats.import_native(exported)
    assert imported.revision == 0 and imported.id == ""
