"""Saved chats: one JSON file per chat at logs/chat/CHARACTER/CHAT_ID.json.

The file name is the chat's id and the folder name its character; the copies of both
inside the file are informative only, so renaming a chat is a file rename and a folder
copied from elsewhere still loads. Every write goes through a temp file (".NAME.json.XXXX.tmp")
that is fsynced and renamed over the old file, so a crash leaves the old chat or the new
one, never half of one; those temp files are ignored when listing and swept when stale.
ooba history files dropped into a character's folder load too (converted on read, saved
back in our layout).

Several browser tabs (or processes) may hold copies of one chat. Each file carries a
revision, counted up on every write; a save whose copy was read at an older revision than
the file's does not overwrite it but becomes a new chat, a conflict copy (see save()).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from modules.chat import chat_formats
from modules.chat.types import RECREATED, SAVED_AS_COPY, USER, Chat, SaveNotice
from modules.core.errors import ChatNotFoundError, InvalidRequestError, UnsafePathError
from modules.core.paths import atomic_write_bytes, atomic_write_text, check_name, fsync_dir, safe_join

log = logging.getLogger(__name__)

CHATS_DIR = Path("logs") / "chat"
"""Where the store's root lives under the app root."""
STALE_TEMP_AGE_S = 3600.0
"""A temp file this old belongs to a writer that died (a save takes milliseconds)."""
_MAX_NAME_BYTES = 200
"""UTF-8 bytes in a chat id or character name: file systems stop at 255, the temp-file
prefix and suffix need the rest."""
_MAX_ID_TRIES = 1000
CONFLICT_SUFFIX = " (conflict copy)"
"""Added to the title of a chat saved as a copy because another tab had saved the original."""
_UNMATCHABLE = -1
"""The revision of a file that cannot be read as a chat: no copy has it, so nothing overwrites it."""


@dataclass(frozen=True)
class ChatSummary:
    """One line of a character's chat list.

    `title` is the stored title (free text, may be empty); `preview` the start of the
    first user message, for chats without a title. An unreadable file is listed with
    `error` set (and zero messages) so the UI can show it and offer to delete it.
    """

    id: str
    title: str
    updated: str
    messages: int
    preview: str = ""
    error: str | None = None


def _now_local() -> datetime:
    return datetime.now().astimezone()


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _check_bytes(name: str, what: str) -> None:
    if len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES:
        raise UnsafePathError(f"the {what} is too long for a file name ({_MAX_NAME_BYTES} bytes at most)", what)


def check_chat_id(chat_id: object) -> str:
    """`chat_id` if it can name a chat file, else UnsafePathError.

    The rules of modules.core.paths.check_name, plus: no leading dot (such files are hidden
    and would collide with our temp files) and at most 200 UTF-8 bytes.
    """
    check_name(chat_id, "chat id")
    assert isinstance(chat_id, str)
    if chat_id.startswith("."):
        raise UnsafePathError(f"{chat_id!r} is not a valid chat id: it starts with a dot", "chat id")
    _check_bytes(chat_id, "chat id")
    return chat_id


class HistoryStore:
    """The saved chats under `root` (the app's logs/chat folder), one folder per character.

    Names (character, chat id) are checked with modules.core.paths (UnsafePathError); bad
    files raise InvalidRequestError naming the file; a missing chat ChatNotFoundError.
    Safe to share between threads: writes, renames and deletes are serialised by one lock,
    so a save's check of the file's revision and its write are one step for this process.
    """

    def __init__(self, root: Path, *, now: Callable[[], datetime] | None = None) -> None:
        self.root = Path(root)
        self._now = now or _now_local
        self._lock = threading.RLock()  # re-entrant: set_title holds it across its load and write
        self.remove_stale_temp_files()

    # --- paths -------------------------------------------------------------------------

    def character_dir(self, character: str) -> Path:
        """The character's chat folder (may not exist yet); refuses names that escape root."""
        folder = safe_join(self.root, character, what="character")
        _check_bytes(character, "character")
        return folder

    def chat_path(self, character: str, chat_id: str) -> Path:
        """The file of one chat; refuses names (or symlinks) that lead out of the folder."""
        folder = self.character_dir(character)
        check_chat_id(chat_id)
        return safe_join(folder, f"{chat_id}.json", what="chat id")

    @staticmethod
    def _where(character: str, chat_id: str) -> str:
        return f"{CHATS_DIR.as_posix()}/{character}/{chat_id}.json"

    # --- reading -----------------------------------------------------------------------

    def load(self, character: str, chat_id: str) -> Chat:
        """The saved chat; ChatNotFoundError if absent, InvalidRequestError if the file is bad."""
        path = self.chat_path(character, chat_id)
        chat = self._read(path, character, self._where(character, chat_id))
        chat.character, chat.id = character, chat_id
        return chat

    def _read(self, path: Path, character: str, where: str) -> Chat:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ChatNotFoundError(f"there is no saved chat {where}", "chat_id") from None
        except OSError as exc:
            raise InvalidRequestError(f"{where} cannot be read: {exc.strerror or exc}", "chat_id") from None
        if not raw.strip():
            raise InvalidRequestError(f"{where} is empty (a save was interrupted?)", "chat_id")
        try:
            obj = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRequestError(f"{where} is not valid JSON: {exc}", "chat_id") from None
        except RecursionError:
            raise InvalidRequestError(f"{where} is nested too deeply to read", "chat_id") from None
        if chat_formats.looks_like_ooba(obj):
            chat = chat_formats.ooba_to_chat(obj, character, where)
        else:
            chat = chat_formats.chat_from_native(obj, where)
        revision = _revision_of(obj)
        if revision is None:
            raise InvalidRequestError(f"{where}: revision must be a whole number (0 or more)", "chat_id")
        chat.revision = revision
        return chat

    def list(self, character: str) -> list[ChatSummary]:
        """The character's chats, newest `updated` first (file time when a chat has none).

        Temp files, hidden files and names that are not valid chat ids are skipped; a
        corrupt file is listed with `error` set and logged, never breaks the list.
        """
        folder = self.character_dir(character)
        if not folder.is_dir():
            return []
        entries: list[tuple[tuple[float, str], ChatSummary]] = []
        for path in folder.iterdir():
            name = path.name
            if name.startswith(".") or not name.endswith(".json"):
                continue
            entry = self._summarize(folder, character, name[: -len(".json")])
            if entry is not None:
                entries.append(entry)
        entries.sort(key=lambda entry: entry[0], reverse=True)
        return [summary for _, summary in entries]

    def _summarize(self, folder: Path, character: str, chat_id: str) -> tuple[tuple[float, str], ChatSummary] | None:
        try:
            check_chat_id(chat_id)
            path = safe_join(folder, f"{chat_id}.json", what="chat id")
            stat = path.stat()
        except (UnsafePathError, OSError) as exc:
            log.warning("skipping %s in %s: %s", chat_id, folder, exc)
            return None
        if stat.st_size == 0:  # an id being claimed by a save right now, or a crashed claim
            return None
        mtime_iso = _iso(datetime.fromtimestamp(stat.st_mtime).astimezone())
        try:
            chat = self._read(path, character, self._where(character, chat_id))
        except InvalidRequestError as exc:
            log.warning("unreadable saved chat: %s", exc)
            return (stat.st_mtime, chat_id), ChatSummary(chat_id, "", mtime_iso, 0, error=str(exc))
        updated = chat.updated or mtime_iso
        summary = ChatSummary(chat_id, chat.title, updated, len(chat.messages), preview=_preview(chat))
        return (_timestamp(updated, stat.st_mtime), chat_id), summary

    def latest(self, character: str) -> Chat | None:
        """The most recently updated readable chat, or None when the character has none."""
        for summary in self.list(character):
            if summary.error is None:
                try:
                    return self.load(character, summary.id)
                except InvalidRequestError:  # changed or deleted since it was listed
                    continue
        return None

    # --- writing -----------------------------------------------------------------------

    def save(self, chat: Chat) -> Chat:
        """Write `chat` atomically; returns the same object with id, created, updated and revision set.

        A chat without an id gets a new one from the clock ("20261122-011530", then
        "-2", "-3"... when taken), never overwriting another chat. `created` is set on the
        first save, `updated` on every save. Unsafe names and malformed chats are refused
        before anything touches the disk; on failure the chat object is left as it was.

        Nothing another tab saved is ever overwritten. The file's revision must still be
        `chat.revision` (the one this copy was read or last saved at), checked under the
        store's lock and read again just before the atomic rename (another process may
        write too). If it moved on, or the file can no longer be read as a chat, this copy
        is saved as a new chat titled "TITLE (conflict copy)" (meta["branched_from"] names
        the original, with "conflict": true) and the object becomes that chat, so the
        tab's next save continues there; if the file is gone (deleted or
        renamed elsewhere) it is written again under its id. Either way `chat.notice`
        (a SaveNotice) says what happened; it is None after an ordinary save.
        """
        return self._write(chat, touch=True)

    def _write(self, chat: Chat, *, touch: bool) -> Chat:
        folder = self.character_dir(chat.character)
        if chat.id:
            self.chat_path(chat.character, chat.id)
        chat_formats.dump_native(chat)  # refuse bad data before claiming an id
        before = (chat.id, chat.title, chat.created, chat.updated, chat.meta, chat.revision, chat.notice)
        claimed: list[Path] = []
        with self._lock:
            try:
                chat.notice = None
                if not self._write_in_place(chat, folder, touch, claimed):
                    self._write_conflict_copy(chat, folder, claimed)
            except BaseException:
                chat.id, chat.title, chat.created, chat.updated, chat.meta, chat.revision, chat.notice = before
                for path in claimed:
                    path.unlink(missing_ok=True)
                raise
        return chat

    def _write_in_place(self, chat: Chat, folder: Path, touch: bool, claimed: list[Path]) -> bool:
        """Write `chat` under its own id (a new one if it has none); False, with nothing
        written, when another writer saved that file since this copy was read."""
        stamp = self._now()
        if not chat.id:
            chat.id = self._claim_id(folder, stamp)
            claimed.append(folder / f"{chat.id}.json")
            _stamp(chat, stamp, touch, revision=1)
            atomic_write_text(claimed[-1], _file_text(chat))
            return True
        path = self.chat_path(chat.character, chat.id)
        on_disk = _disk_revision(path)
        if on_disk is None:  # deleted or renamed elsewhere, or the first save under a chosen id
            if not _create_exclusive(path):  # another process created it this very moment
                return False
            claimed.append(path)
            if chat.revision:
                chat.notice = SaveNotice(RECREATED, f"This chat had been deleted or renamed elsewhere (another tab?), "
                                                    f"so it was saved again as {chat.id}.", chat.id)
            _stamp(chat, stamp, touch, revision=chat.revision + 1)  # counting on: stale copies stay stale
            atomic_write_text(path, _file_text(chat))
            return True
        if on_disk != chat.revision:
            return False
        _stamp(chat, stamp, touch, revision=on_disk + 1)
        return _replace_unless_changed(path, _file_text(chat), on_disk)

    def _write_conflict_copy(self, chat: Chat, folder: Path, claimed: list[Path]) -> None:
        """Turn `chat` into a new chat holding this copy's messages and write it."""
        original, original_title = chat.id, chat.title or _preview(chat) or chat.id
        stamp = self._now()
        chat.id = self._claim_id(folder, stamp)
        claimed.append(folder / f"{chat.id}.json")
        index = len(chat.messages) - 1 if chat.messages else None
        chat.meta = {**chat.meta, "branched_from": {"id": original, "index": index, "conflict": True}}
        chat.title = original_title if original_title.endswith(CONFLICT_SUFFIX) else original_title + CONFLICT_SUFFIX
        chat.created = ""
        _stamp(chat, stamp, True, revision=1)
        atomic_write_text(claimed[-1], _file_text(chat))
        log.warning("chat %s/%s was saved elsewhere since this copy was read; saved this copy as %s",
                    chat.character, original, chat.id)
        chat.notice = SaveNotice(SAVED_AS_COPY, (
            f'This chat was changed in another tab since this one opened it, so your version was saved as '
            f'a separate chat, "{chat.title}", instead of overwriting that change. This tab now continues in '
            f'the copy; the other version is still under Past chats.'), original)

    def _claim_id(self, folder: Path, stamp: datetime) -> str:
        """Reserve a new id by creating its file exclusively (safe across processes too).

        The empty placeholder is replaced by the real file a moment later; list() skips
        empty files and the stale sweep removes one a crash left behind.
        """
        folder.mkdir(parents=True, exist_ok=True)
        base = stamp.strftime("%Y%m%d-%H%M%S")
        for n in range(1, _MAX_ID_TRIES + 1):
            candidate = base if n == 1 else f"{base}-{n}"
            try:
                fd = os.open(folder / f"{candidate}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            os.close(fd)
            return candidate
        raise InvalidRequestError(f"could not find a free chat id near {base}", "chat_id")

    def set_title(self, character: str, chat_id: str, title: str) -> Chat:
        """Give a chat a display title (free text, not a file name); `updated` is kept."""
        if not isinstance(title, str):
            raise InvalidRequestError("the title must be text", "title")
        with self._lock:  # no save of this process slips in between the load and the write
            chat = self.load(character, chat_id)
            chat.title = title
            return self._write(chat, touch=False)

    def rename(self, character: str, chat_id: str, new_id: str) -> str:
        """Rename a chat's file (its id), never overwriting another chat; returns the new id.

        InvalidRequestError if `new_id` is taken, ChatNotFoundError if the chat is absent.
        """
        source = self.chat_path(character, chat_id)
        target = self.chat_path(character, new_id)
        if not source.is_file():
            raise ChatNotFoundError(f"there is no saved chat {self._where(character, chat_id)}", "chat_id")
        if source == target:
            return new_id
        with self._lock:
            _rename_without_replacing(source, target)
        fsync_dir(source.parent)
        return new_id

    def delete(self, character: str, chat_id: str) -> None:
        """Delete one saved chat; ChatNotFoundError if it is not there.

        A tab that still has the chat open writes it again on its next save (see save()).
        """
        path = self.chat_path(character, chat_id)
        try:
            with self._lock:
                path.unlink()
        except FileNotFoundError:
            raise ChatNotFoundError(f"there is no saved chat {self._where(character, chat_id)}", "chat_id") from None

    def branch(self, chat: Chat, at_index: int) -> Chat:
        """Save a new chat holding `chat.messages[:at_index + 1]` (swipes kept) and return it.

        Its meta["branched_from"] records {"id": source id (None if never saved), "index"}.
        """
        count = len(chat.messages)
        if isinstance(at_index, bool) or not isinstance(at_index, int) or not 0 <= at_index < count:
            limit = f"between 0 and {count - 1}" if count else "impossible: the chat is empty"
            raise InvalidRequestError(f"a branch point must be a message number ({limit}), not {at_index!r}", "at_index")
        meta = copy.deepcopy(chat.meta)
        meta["branched_from"] = {"id": chat.id or None, "index": at_index}
        title = f"{chat.title} (branch)" if chat.title else ""
        branch = Chat(chat.character, copy.deepcopy(chat.messages[: at_index + 1]), title=title, meta=meta)
        return self.save(branch)

    # --- housekeeping ------------------------------------------------------------------

    def remove_stale_temp_files(self, max_age_s: float = STALE_TEMP_AGE_S) -> int:
        """Delete temp files (and empty id placeholders) older than `max_age_s`; returns how many.

        Runs when the store opens. Only real folders directly under root are visited, so
        a symlinked character folder never leads the sweep outside.
        """
        if not self.root.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - max_age_s
        for path in _character_files(self.root):
            name = path.name
            try:
                stat = path.lstat()
                is_temp = name.startswith(".") and name.endswith(".tmp")
                is_placeholder = name.endswith(".json") and stat.st_size == 0
                if (is_temp or is_placeholder) and path.is_file() and not path.is_symlink() and stat.st_mtime <= cutoff:
                    path.unlink()
                    removed += 1
            except OSError as exc:
                log.warning("could not remove stale %s: %s", path, exc)
        if removed:
            log.info("removed %d stale temp file(s) under %s", removed, self.root)
        return removed


def _character_files(root: Path) -> Iterator[Path]:
    """Files in the real (not symlinked) folders directly under `root`; unreadable ones skipped."""
    try:
        folders = [f for f in root.iterdir() if f.is_dir() and not f.is_symlink()]
    except OSError:
        return
    for folder in folders:
        try:
            yield from list(folder.iterdir())
        except OSError as exc:
            log.warning("could not look into %s: %s", folder, exc)


def _stamp(chat: Chat, stamp: datetime, touch: bool, *, revision: int) -> None:
    chat.created = chat.created or _iso(stamp)
    if touch or not chat.updated:
        chat.updated = _iso(stamp)
    chat.revision = revision


def _file_text(chat: Chat) -> str:
    """Our JSON layout with the revision as its first key. chat_formats leaves the revision
    out: it belongs to the file, so exported chats never carry it into another store."""
    text = chat_formats.dump_native(chat)  # an object, "{\n  ...}"
    return f'{{\n  "revision": {chat.revision},' + text[1:]


def _revision_of(obj: object) -> int | None:
    """The revision a parsed chat file records (0 when it has none: older files, ooba's);
    None when the value is not a whole number >= 0."""
    value = obj.get("revision", 0) if isinstance(obj, dict) else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _disk_revision(path: Path) -> int | None:
    """The revision of the file at `path` now: None when there is none, _UNMATCHABLE when it
    cannot be read as a chat (an empty id placeholder, bad JSON), so no copy overwrites it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return _UNMATCHABLE
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _UNMATCHABLE
    revision = _revision_of(obj) if isinstance(obj, dict) else None
    return _UNMATCHABLE if revision is None else revision


def _create_exclusive(path: Path) -> bool:
    """Create `path` empty unless it exists (an id placeholder, as _claim_id makes); False if it does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _replace_unless_changed(path: Path, text: str, revision: int) -> bool:
    """Replace `path` by `text` atomically if the file's revision is still `revision`;
    False, with nothing written, if another writer changed it.

    atomic_write_bytes with one more step: after the temp file is written and fsynced, just
    before the rename, the file's revision is read again, so a save by another process during
    our write is noticed. What remains is the instant between that read and the rename; within
    one process the store's lock closes it.
    """
    return atomic_write_bytes(path, text.encode("utf-8"), lambda: _disk_revision(path) == revision)


def _preview(chat: Chat, limit: int = 60) -> str:
    first = next((m.content for m in chat.messages if m.role == USER and m.content.strip()), "")
    line = " ".join(first.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _timestamp(iso: str, fallback: float) -> float:
    """Seconds since the epoch for sorting; a time without an offset is local time."""
    try:
        return datetime.fromisoformat(iso).timestamp()
    except (ValueError, OverflowError, OSError):
        return fallback


def _rename_without_replacing(source: Path, target: Path) -> None:
    """Move `source` to `target`, failing if `target` exists (os.rename would replace it on POSIX).

    A hard link is created first, which fails atomically when the name is taken; then the
    old name is removed. A crash in between leaves two names for one chat, never a loss.
    """
    try:
        os.link(source, target)
    except FileExistsError:
        if os.path.samefile(source, target):  # only the case differs, on a case-insensitive disk
            os.rename(source, target)
            return
        raise InvalidRequestError(f"a chat named {target.stem!r} already exists", "new_id") from None
    except OSError:  # no hard links on this file system (FAT, some shares): check, then move
        if target.exists():
            raise InvalidRequestError(f"a chat named {target.stem!r} already exists", "new_id") from None
        os.rename(source, target)
        return
    source.unlink()
