"""Saved chats: round-trips, ids, listing, rename/delete/branch, crash safety, unsafe names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from modules.chat.history import ChatNotFoundError, HistoryStore
from modules.chat.types import Chat, Message
from modules.core.errors import InvalidRequestError, UnsafePathError
from tests.traversal_payloads import TRAVERSAL_PAYLOADS

REPO = Path(__file__).resolve().parents[1]


class Clock:
    """A settable clock so ids and `updated` are predictable."""

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


def sample_chat(character: str = "Élodie") -> Chat:
    return Chat(
        character,
        [
            Message("assistant", "Bonjour ! 🌸", meta={"greeting": True}),
            Message("user", "日本語で話せますか？\nUne deuxième ligne."),
            Message("assistant", "B", swipes=["A", "B", "C"], swipe_index=1, visible="B (shown)", meta={"model": "m"}),
            Message("system", "Il pleut."),
        ],
        title="Première conversation",
        meta={"note": "ünïcödé"},
    )


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# --- round trips --------------------------------------------------------------------------

def test_save_assigns_a_timestamp_id_and_loads_back_identical(store, root):
    chat = sample_chat()
    saved = store.save(chat)
    assert saved is chat
    assert chat.id == "20261122-011530"
    assert chat.created == chat.updated == "2026-11-22T01:15:30+00:00"
    text = (root / "Élodie" / "20261122-011530.json").read_text(encoding="utf-8")
    assert "Élodie" in text and "日本語" in text and "🌸" in text  # not \\u-escaped
    data = json.loads(text)
    assert data["version"] == 1 and data["messages"][2]["swipes"] == ["A", "B", "C"]
    assert store.load("Élodie", chat.id) == chat


def test_resaving_keeps_id_and_created_and_moves_updated(store, clock):
    chat = store.save(sample_chat())
    clock.tick(90)
    chat.messages.append(Message("user", "encore"))
    store.save(chat)
    loaded = store.load("Élodie", chat.id)
    assert loaded.id == "20261122-011530"
    assert loaded.created == "2026-11-22T01:15:30+00:00"
    assert loaded.updated == "2026-11-22T01:17:00+00:00"
    assert loaded.messages[-1].content == "encore"


def test_ids_never_collide_in_the_same_second(store, root):
    ids = [store.save(Chat("Alice", [Message("user", str(n))])).id for n in range(4)]
    assert ids == ["20261122-011530", "20261122-011530-2", "20261122-011530-3", "20261122-011530-4"]
    assert [store.load("Alice", i).messages[0].content for i in ids] == ["0", "1", "2", "3"]


def test_ids_never_collide_across_threads(store, root):
    results: list[str] = []

    def save(n: int) -> None:
        results.append(store.save(Chat("Alice", [Message("user", str(n))])).id)

    threads = [threading.Thread(target=save, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 8
    assert len(list((root / "Alice").glob("*.json"))) == 8


def test_list_is_newest_first_with_counts_titles_and_previews(store, clock):
    first = store.save(Chat("Alice", [Message("user", "first   chat\nhello")], title="One"))
    clock.tick(10)
    second = store.save(Chat("Alice", [Message("assistant", "hi"), Message("user", "second")]))
    assert [s.id for s in store.list("Alice")] == [second.id, first.id]
    clock.tick(10)
    store.save(first)  # touching a chat moves it to the top
    summaries = store.list("Alice")
    assert [s.id for s in summaries] == [first.id, second.id]
    top = summaries[0]
    assert (top.title, top.messages, top.preview, top.error) == ("One", 1, "first chat hello", None)
    assert summaries[1].title == "" and summaries[1].preview == "second"
    assert store.latest("Alice") == store.load("Alice", first.id)


def test_unknown_character_has_no_chats(store):
    assert store.list("Nobody") == []
    assert store.latest("Nobody") is None


def test_a_corrupt_file_does_not_break_the_list(store, root):
    good = store.save(Chat("Alice", [Message("user", "fine")]))
    folder = root / "Alice"
    (folder / "garbage.json").write_text("{not json", encoding="utf-8")
    bad_role = {"version": 1, "messages": [{"role": "bot", "content": "x"}]}
    (folder / "badrole.json").write_text(json.dumps(bad_role), encoding="utf-8")
    (folder / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (folder / "claimed.json").write_bytes(b"")  # an id being claimed right now
    (folder / ".hidden.json").write_text("{}", encoding="utf-8")
    (folder / ".x.json.abc123.tmp").write_text("{", encoding="utf-8")
    (folder / "notes.txt").write_text("not a chat", encoding="utf-8")
    summaries = {s.id: s for s in store.list("Alice")}
    assert set(summaries) == {good.id, "garbage", "badrole", "binary"}
    assert summaries[good.id].error is None
    assert "badrole.json" in summaries["badrole"].error and "role" in summaries["badrole"].error
    assert summaries["garbage"].messages == 0 and "JSON" in summaries["garbage"].error
    assert store.latest("Alice").id == good.id


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"version": 1, "messages": [{"role": "bot", "content": "x"}]}, "role"),
        ({"version": 1, "messages": [{"role": "user", "content": 5}]}, "content"),
        ({"version": 1, "messages": [{"role": "user", "content": "x", "swipes": "ab"}]}, "swipes"),
        ({"version": 1, "messages": [{"role": "user", "content": "x", "swipes": ["a", 1]}]}, "swipes"),
        ({"version": 1, "messages": [{"role": "assistant", "content": "a", "swipes": ["a"], "swipe_index": 1}]}, "out of range"),
        ({"version": 1, "messages": [{"role": "assistant", "content": "a", "swipe_index": 2}]}, "out of range"),
        ({"version": 1, "messages": [{"role": "assistant", "content": "a", "swipe_index": True}]}, "swipe_index"),
        ({"version": 1, "messages": [{"role": "user", "content": "x", "visible": 3}]}, "visible"),
        ({"version": 1, "messages": [{"role": "user", "content": "x", "meta": []}]}, "meta"),
        ({"version": 1, "messages": ["hello"]}, "object"),
        ({"version": 1, "messages": {}}, "messages"),
        ({"version": 1, "messages": [], "title": 7}, "title"),
        ({"version": 2, "messages": []}, "newer"),
        ({"messages": []}, "version"),
        ([1, 2, 3], "object"),
    ],
)
def test_loading_validates_the_structure_and_names_the_file(store, root, payload, problem):
    (root / "Alice").mkdir(parents=True)
    (root / "Alice" / "bad.json").write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(InvalidRequestError, match=problem) as caught:
        store.load("Alice", "bad")
    assert "Alice/bad.json" in str(caught.value)


def test_loading_a_missing_chat_says_so(store):
    with pytest.raises(ChatNotFoundError, match="nope"):
        store.load("Alice", "nope")


def test_saving_refuses_malformed_chats_before_writing(store, root):
    with pytest.raises(InvalidRequestError, match="role"):
        store.save(Chat("Alice", [Message("bot", "x")]))
    with pytest.raises(InvalidRequestError, match="out of range"):
        store.save(Chat("Alice", [Message("assistant", "x", swipes=["x"], swipe_index=3)]))
    with pytest.raises(InvalidRequestError, match="JSON cannot store"):
        store.save(Chat("Alice", [Message("user", "x", meta={"when": datetime.now()})]))
    assert files_under(root) <= {"Alice"}


def test_a_failed_write_leaves_the_chat_object_and_folder_as_they_were(store, root, monkeypatch):
    import modules.chat.history as history

    def broken(path: Path, text: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(history, "atomic_write_text", broken)
    chat = Chat("Alice", [Message("user", "x")])
    with pytest.raises(OSError, match="disk full"):
        store.save(chat)
    assert (chat.id, chat.created, chat.updated) == ("", "", "")
    assert list((root / "Alice").iterdir()) == []  # the claimed id was released


def test_lone_surrogates_from_an_upload_do_not_break_saving(store):
    chat = store.save(Chat("Alice", [Message("user", "bad \ud800 text")]))
    assert store.load("Alice", chat.id).messages[0].content == "bad \ud800 text"


# --- rename, titles, delete, branch ------------------------------------------------------

def test_rename_moves_the_file_and_never_overwrites(store, root):
    a = store.save(Chat("Alice", [Message("user", "a")]))
    b = store.save(Chat("Alice", [Message("user", "b")]))
    assert store.rename("Alice", a.id, "Trip to Zürich") == "Trip to Zürich"
    assert not (root / "Alice" / f"{a.id}.json").exists()
    moved = store.load("Alice", "Trip to Zürich")
    assert moved.id == "Trip to Zürich" and moved.messages[0].content == "a"
    with pytest.raises(InvalidRequestError, match="already exists"):
        store.rename("Alice", "Trip to Zürich", b.id)
    assert store.load("Alice", b.id).messages[0].content == "b"
    assert store.load("Alice", "Trip to Zürich").messages[0].content == "a"
    with pytest.raises(ChatNotFoundError):
        store.rename("Alice", "missing", "other")
    assert store.rename("Alice", b.id, b.id) == b.id


def test_titles_are_free_text_and_keep_the_file_and_updated(store, clock, root):
    chat = store.save(Chat("Alice", [Message("user", "a")]))
    clock.tick(60)
    titled = store.set_title("Alice", chat.id, "../../etc/passwd: a title, not a path ✓")
    assert titled.title == "../../etc/passwd: a title, not a path ✓"
    assert titled.updated == chat.updated
    assert files_under(root) == {"Alice", f"Alice/{chat.id}.json"}
    assert store.list("Alice")[0].title == titled.title


def test_delete_removes_one_chat(store):
    a = store.save(Chat("Alice", [Message("user", "a")]))
    b = store.save(Chat("Alice", [Message("user", "b")]))
    store.delete("Alice", a.id)
    assert [s.id for s in store.list("Alice")] == [b.id]
    with pytest.raises(ChatNotFoundError):
        store.delete("Alice", a.id)


def test_branch_saves_a_new_chat_up_to_the_index_with_swipes(store, clock, root):
    source = store.save(sample_chat())
    clock.tick(5)
    branch = store.branch(source, 2)
    assert branch.id != source.id and branch.id == "20261122-011535"
    assert branch.messages == source.messages[:3]
    assert branch.messages[2].swipes == ["A", "B", "C"] and branch.messages[2].swipe_index == 1
    assert branch.meta["branched_from"] == {"id": source.id, "index": 2}
    assert branch.title == "Première conversation (branch)"
    assert store.load("Élodie", branch.id) == branch
    branch.messages[2].swipes.append("D")  # a deep copy: the source is untouched
    assert store.load("Élodie", source.id) == source and len(source.messages) == 4
    for bad in (4, -1, True, "1"):
        with pytest.raises(InvalidRequestError, match="branch point"):
            store.branch(source, bad)


def test_ooba_files_dropped_in_the_folder_load(store, root):
    (root / "Alice").mkdir(parents=True)
    ooba = {"internal": [["<|BEGIN-VISIBLE-CHAT|>", "Hi!"], ["Yo", "Hey"]], "visible": [["", "Hi!"], ["Yo", "Hey"]]}
    (root / "Alice" / "20240101-10-00-00.json").write_text(json.dumps(ooba), encoding="utf-8")
    chat = store.load("Alice", "20240101-10-00-00")
    assert [(m.role, m.content) for m in chat.messages] == [("assistant", "Hi!"), ("user", "Yo"), ("assistant", "Hey")]
    assert store.list("Alice")[0].messages == 3


# --- crash safety ------------------------------------------------------------------------

def test_a_writer_killed_before_the_rename_leaves_the_previous_chat_intact(tmp_path):
    root = tmp_path / "logs" / "chat"
    chat = HistoryStore(root).save(Chat("Alice", [Message("user", "first version ✓")]))
    path = root / "Alice" / f"{chat.id}.json"
    before = path.read_bytes()
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.history_writer_child", str(root), "Alice", chat.id, "second version"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.startswith("READY"), child.stderr.read()
        child.kill()  # SIGKILL: no cleanup handler runs
    finally:
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
    if os.name == "posix":
        assert child.returncode == -signal.SIGKILL
    temps = [p for p in path.parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert len(temps) == 1 and "second version" in temps[0].read_text(encoding="utf-8")
    assert path.read_bytes() == before
    reopened = HistoryStore(root)  # a fresh temp file is not stale yet: kept on open
    assert reopened.load("Alice", chat.id).messages == [Message("user", "first version ✓")]
    assert [s.id for s in reopened.list("Alice")] == [chat.id]
    assert reopened.remove_stale_temp_files(max_age_s=0) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_stale_temp_files_and_placeholders_are_swept_when_the_store_opens(tmp_path):
    root = tmp_path / "chats"
    folder = root / "Alice"
    folder.mkdir(parents=True)
    old, fresh, placeholder = folder / ".a.json.x1.tmp", folder / ".b.json.x2.tmp", folder / "20200101-000000.json"
    for path in (old, fresh, placeholder):
        path.write_bytes(b"")
    long_ago = time.time() - 7200
    os.utime(old, (long_ago, long_ago))
    os.utime(placeholder, (long_ago, long_ago))
    HistoryStore(root)
    assert sorted(p.name for p in folder.iterdir()) == [fresh.name]


def test_the_sweep_never_follows_a_symlinked_character_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / ".precious.tmp"
    victim.write_text("keep me", encoding="utf-8")
    os.utime(victim, (0, 0))
    root = tmp_path / "chats"
    root.mkdir()
    (root / "Evil").symlink_to(outside, target_is_directory=True)
    assert HistoryStore(root).remove_stale_temp_files(max_age_s=0) == 0
    assert victim.exists()


# --- unsafe names --------------------------------------------------------------------------

def _one(text: str = "x") -> list[Message]:
    return [Message("user", text)]


NAME_TAKERS: dict[str, Callable[[HistoryStore, str], object]] = {
    "save character": lambda s, p: s.save(Chat(p, _one())),
    "save id": lambda s, p: s.save(Chat("Alice", _one(), id=p)),
    "load character": lambda s, p: s.load(p, "c1"),
    "load id": lambda s, p: s.load("Alice", p),
    "list": lambda s, p: s.list(p),
    "latest": lambda s, p: s.latest(p),
    "rename character": lambda s, p: s.rename(p, "c1", "c2"),
    "rename id": lambda s, p: s.rename("Alice", p, "c2"),
    "rename new id": lambda s, p: s.rename("Alice", "c1", p),
    "set_title character": lambda s, p: s.set_title(p, "c1", "t"),
    "set_title id": lambda s, p: s.set_title("Alice", p, "t"),
    "delete character": lambda s, p: s.delete(p, "c1"),
    "delete id": lambda s, p: s.delete("Alice", p),
    "branch": lambda s, p: s.branch(Chat(p, _one(), id="c1"), 0),
}
# An empty id is how a new chat asks for one, so it is not a payload for "save id".
CASES = [(op, p) for op in NAME_TAKERS for p in TRAVERSAL_PAYLOADS if not (op == "save id" and p == "")]


@pytest.mark.parametrize(("operation", "payload"), CASES)
def test_every_name_is_checked_and_nothing_is_written_outside(tmp_path, operation, payload):
    root = tmp_path / "logs" / "chat"
    store = HistoryStore(root)
    store.save(Chat("Alice", _one("keep"), id="c1"))
    before = files_under(tmp_path)
    with pytest.raises(UnsafePathError):
        NAME_TAKERS[operation](store, payload)
    assert files_under(tmp_path) == before
    assert store.load("Alice", "c1").messages == _one("keep")


def test_chat_ids_may_not_start_with_a_dot_or_be_too_long_in_bytes(store):
    with pytest.raises(UnsafePathError, match="dot"):
        store.save(Chat("Alice", _one(), id=".hidden"))
    with pytest.raises(UnsafePathError, match="too long"):
        store.save(Chat("Alice", _one(), id="日" * 100))  # 100 characters, 300 bytes


def test_a_symlinked_character_folder_pointing_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "c1.json").write_text(json.dumps({"version": 1, "messages": []}), encoding="utf-8")
    root = tmp_path / "logs" / "chat"
    root.mkdir(parents=True)
    (root / "Evil").symlink_to(outside, target_is_directory=True)
    store = HistoryStore(root)
    for attempt in (
        lambda: store.save(Chat("Evil", _one())),
        lambda: store.load("Evil", "c1"),
        lambda: store.list("Evil"),
        lambda: store.latest("Evil"),
        lambda: store.delete("Evil", "c1"),
        lambda: store.rename("Evil", "c1", "c2"),
    ):
        with pytest.raises(UnsafePathError):
            attempt()
    assert sorted(p.name for p in outside.iterdir()) == ["c1.json"]


def test_a_symlinked_chat_file_pointing_outside_is_refused_and_skipped(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"version": 1, "messages": [{"role": "user", "content": "secret"}]}), encoding="utf-8")
    root = tmp_path / "logs" / "chat"
    store = HistoryStore(root)
    store.save(Chat("Alice", _one(), id="c1"))
    (root / "Alice" / "leak.json").symlink_to(secret)
    with pytest.raises(UnsafePathError):
        store.load("Alice", "leak")
    assert [s.id for s in store.list("Alice")] == ["c1"]
    with pytest.raises(UnsafePathError):
        store.save(Chat("Alice", _one("overwrite"), id="leak"))
    assert "secret" in secret.read_text(encoding="utf-8")
