"""Turn what users paste (a repo id or any Hugging Face link) into repo, branch and file.

Accepted: `org/repo`, `https://huggingface.co/org/repo`, `.../tree/BRANCH[/folder]`,
`.../blob/BRANCH/file.gguf`, `.../resolve/BRANCH/file.gguf` (also `hf.co`, no scheme, a
`?download=true` query, and the host of `HF_ENDPOINT` for mirrors). Pure: no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from modules.core.errors import InvalidRequestError

HUB_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
# The Hub's own rule for names: letters, digits, - _ . ; no leading/trailing - or ., no "--" or "..".
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_KINDS = ("tree", "blob", "resolve")


@dataclass(frozen=True)
class HubLink:
    """A parsed link: the repo, the branch (None: the default) and a file or folder inside it."""

    repo_id: str
    revision: str | None = None
    path: str | None = None

    @property
    def folder_name(self) -> str:
        """`ORG_REPO[_BRANCH]`, the models/ folder a multi-file model goes to."""
        name = self.repo_id.replace("/", "_")
        if self.revision and self.revision != "main":
            name += "_" + re.sub(r"[^A-Za-z0-9._-]", "_", self.revision)
        return name


def parse_link(text: str, branch: str | None = None, extra_hosts: tuple[str, ...] = ()) -> HubLink:
    """The HubLink for `text`; InvalidRequestError(param="link") saying what is wrong otherwise.

    `branch`, when given, wins over a branch in the link. `extra_hosts` are further
    accepted hosts (the mirror in HF_ENDPOINT).
    """
    raw = (text or "").strip()
    if not raw:
        raise InvalidRequestError("Paste a model link or a repo id such as TheBloke/Llama-2-7B-GGUF.", "link")
    parts = _path_parts(raw, extra_hosts)
    if parts and parts[0] in ("datasets", "spaces"):
        raise InvalidRequestError(f"{raw!r} is a {parts[0][:-1]}, not a model repository.", "link")
    if len(parts) < 2:
        raise InvalidRequestError(f"{raw!r} is not a model link: expected org/repo or https://huggingface.co/org/repo.",
                                  "link")
    org, name, rest = parts[0], parts[1], parts[2:]
    for piece in (org, name):
        if not _NAME.match(piece) or ".." in piece or "--" in piece:
            raise InvalidRequestError(f"{piece!r} in {raw!r} is not a valid Hugging Face name.", "link")
    revision, path = _revision_and_path(raw, rest)
    if branch and branch.strip():
        revision = branch.strip()
    if revision is not None and (not revision or ".." in revision or revision.startswith("/")):
        raise InvalidRequestError(f"{revision!r} is not a valid branch name.", "branch")
    return HubLink(repo_id=f"{org}/{name}", revision=revision, path=path)


def _path_parts(raw: str, extra_hosts: tuple[str, ...]) -> list[str]:
    """The path segments of a URL on an accepted host, or of a bare `org/repo[/...]`."""
    candidate = raw if "://" in raw else None
    if candidate is None and raw.split("/", 1)[0].lower() in HUB_HOSTS | {h.lower() for h in extra_hosts}:
        candidate = "https://" + raw
    if candidate is None:
        return [p for p in raw.split("/") if p]
    url = urlsplit(candidate)
    host = (url.hostname or "").lower()
    allowed = HUB_HOSTS | {h.lower() for h in extra_hosts}
    if url.scheme not in ("http", "https") or host not in allowed:
        raise InvalidRequestError(f"{raw!r} is not a Hugging Face link (host {host or 'missing'}).", "link")
    return [unquote(p) for p in url.path.split("/") if p]


def _revision_and_path(raw: str, rest: list[str]) -> tuple[str | None, str | None]:
    if not rest:
        return None, None
    kind = rest[0]
    if kind not in _KINDS:
        raise InvalidRequestError(f"{raw!r}: expected /tree/, /blob/ or /resolve/ after the repo name.", "link")
    if len(rest) < 2:
        raise InvalidRequestError(f"{raw!r}: the branch is missing after /{kind}/.", "link")
    # Pull-request refs hold slashes ("refs/pr/3"); other branch names are one segment here.
    take = 3 if rest[1] == "refs" and len(rest) >= 4 else 1
    revision = "/".join(rest[1 : 1 + take])
    path = "/".join(rest[1 + take :]) or None
    if kind in ("blob", "resolve") and not path:
        raise InvalidRequestError(f"{raw!r}: a /{kind}/ link must name a file.", "link")
    return revision, path
