"""Names that must never be accepted as a user file name (shared by every name-taking test)."""

from __future__ import annotations

TRAVERSAL_PAYLOADS: list[str] = [
    "../x",
    "../../etc/passwd",
    "a/../../x",
    "..",
    ".",
    "/etc/passwd",
    "/absolute",
    "..\\x",
    "..\\..\\windows\\win.ini",
    "C:\\Windows\\system32",
    "C:evil",
    "%2e%2e%2fx",
    "%2e%2e/x",
    "..%2fx",
    "%2E%2E%5Cx",
    "a\x00b",
    "\x00",
    "name\n",
    "x" * 300,
    "",
    "   ",
    "CON",
    "nul.txt",
    "trailing.",
    "sub/dir",
    "\\\\server\\share",
]
