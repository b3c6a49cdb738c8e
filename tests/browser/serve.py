"""Start server.py for the browser tests with its user data in a temporary folder.

server.py keeps characters/, logs/chat/ and instruction-templates/ under the folder it
lives in; a test must not write chats into the developer's checkout, so this runs the
same `main()` with that root moved to WORKBENCH_TEST_ROOT. Two test-only knobs:
WORKBENCH_TEST_UI_DEFAULTS (JSON laid over the UI's sampler defaults, e.g. a fixed seed)
and WORKBENCH_TEST_TOKEN_DELAY (seconds slept per generated token, so that a tiny model
that writes thousands of tokens a second is still streaming when the test presses Stop).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _slow_down(delay: float) -> None:
    from loaders import get_loader, loader_names

    for name in loader_names():
        cls = get_loader(name)
        original = cls.generate

        def generate(self, *args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            for token in _original(self, *args, **kwargs):
                time.sleep(delay)
                yield token

        cls.generate = generate


def main() -> int:
    import server
    from modules.ui import common

    server.ROOT = Path(os.environ["WORKBENCH_TEST_ROOT"])
    common.UI_DEFAULTS.update(json.loads(os.environ.get("WORKBENCH_TEST_UI_DEFAULTS", "{}")))
    delay = float(os.environ.get("WORKBENCH_TEST_TOKEN_DELAY", "0"))
    if delay:
        _slow_down(delay)
    return server.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
