"""A writer the crash test kills between writing the temp file and renaming it.

Run as `python -m tests.history_writer_child ROOT CHARACTER CHAT_ID TEXT`: loads the chat,
appends a message, and saves it through HistoryStore with os.replace patched so that,
once the new file is fully written and fsynced, it prints READY and waits to be killed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from modules.chat.history import HistoryStore
from modules.chat.types import Message

READY = "READY"


def _wait_to_be_killed(src: object, dst: object) -> None:
    print(READY, src, flush=True)
    time.sleep(60)  # the parent kills us long before; exiting is a test failure
    sys.exit(3)


def main(argv: list[str]) -> int:
    root, character, chat_id, text = argv
    store = HistoryStore(Path(root))
    chat = store.load(character, chat_id)
    chat.messages.append(Message("user", text))
    os.replace = _wait_to_be_killed  # type: ignore[assignment]  # only in this child process
    store.save(chat)
    return 4  # the rename must never have happened


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
