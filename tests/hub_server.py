"""A local stand-in for the Hugging Face Hub, for the downloader tests (never the network).

It serves the endpoints huggingface_hub 2.4 calls, with the headers it reads:
  * GET /api/models/{repo}[/revision/{rev}]  -> {"id", "sha", "siblings"}
  * GET /api/models/{repo}/tree/{rev}        -> [{"type", "path", "size", "oid", "lfs"}]
  * GET/HEAD /{repo}/resolve/{rev}/{path}    -> the bytes, with Range (206), ETag,
    X-Repo-Commit, and X-Linked-Size / X-Linked-Etag for LFS files
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) as the Hub's do.
Switches for the tests: `cut_once[path] = n` sends n bytes of the next response and drops
the connection; `corrupt.add(path)` serves flipped bytes (the listing keeps the true hash).
`requests` logs (method, url path, Range header).

Run alone: python -m tests.hub_server MODELS_KIT_DIR  (serves the kit, prints the URL).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt")


@dataclass
class Repo:
    """Branches (name -> commit sha) and each commit's files (path -> bytes)."""

    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def add_commit(self, branch: str, files: dict[str, bytes]) -> str:
        sha = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
                           + branch.encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.branches[branch] = sha
        return sha

    def commit_for(self, rev: str) -> str | None:
        return self.branches.get(rev) or (rev if rev in self.commits else None)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()  # noqa: S324 - git's id


class HubServer:
    """A threaded HTTP server holding `repos`; use as a context manager, `url` is its endpoint."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.cut_once: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        return self.repos.setdefault(repo_id, Repo()).add_commit(branch, files)


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            return

        def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
            self._route(head=True)

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            self._route(head=False)

        def _route(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub._lock:
                hub.requests.append((self.command, path, self.headers.get("Range")))
            api = re.match(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?/?$", path)
            if api:
                return self._api(api.group(1), api.group(2), api.group(3))
            res = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if res:
                return self._resolve(res.group(1), res.group(2), res.group(3), head)
            return self._error(404, "RepoNotFound", "no such route")

        def _find(self, repo_id: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            sha = repo.commit_for(rev)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            return sha, repo.commits[sha]

        def _api(self, repo_id: str, kind: str | None, rev: str | None) -> None:
            found = self._find(repo_id, rev or "main")
            if found is None:
                return
            sha, files = found
            if kind == "tree":
                body: object = [_tree_entry(p, d) for p, d in sorted(files.items())]
            else:
                body = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "disabled": False,
                        "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "downloads": 0}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _resolve(self, repo_id: str, rev: str, file: str, head: bool) -> None:
            found = self._find(repo_id, rev)
            if found is None:
                return
            sha, files = found
            if file not in files:
                return self._error(404, "EntryNotFound", f"{file} does not exist")
            data = files[file]
            if file in hub.corrupt:
                data = bytes(b ^ 0x5A for b in data)
            start, end, status = _range_span(self.headers.get("Range"), len(data))
            body = data[start:end]
            self.send_response(status)
            lfs = file.endswith(LFS_SUFFIXES)
            etag = hashlib.sha256(files[file]).hexdigest() if lfs else git_blob_id(files[file])
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", sha)
            if lfs:
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            with hub._lock:
                cut = hub.cut_once.pop(file, None)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _tree_entry(path: str, data: bytes) -> dict[str, object]:
    entry: dict[str, object] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _range_span(header: str | None, size: int) -> tuple[int, int, int]:
    """(first byte, end, status) for a `bytes=N-[M]` Range header; the whole file (200) otherwise."""
    match = re.match(r"^bytes=(\d+)-(\d*)$", header or "")
    if not match or int(match.group(1)) >= size:
        return 0, size, 200
    end = min(size, int(match.group(2)) + 1) if match.group(2) else size
    return int(match.group(1)), end, 206


def kit_repo_files(kit_root: Path) -> dict[str, bytes]:
    """A GGUF + safetensors repo from a built test kit: several quants, a folder model, a pickle."""
    files = {p.name: p.read_bytes() for p in kit_root.glob("*.gguf")}
    hf = kit_root / "tiny-llama"
    files.update({p.name: p.read_bytes() for p in hf.iterdir() if p.is_file()})
    files["pytorch_model.bin"] = b"PK\x03\x04 not really a pickle"
    files["README.md"] = b"# tiny llama\n"
    return files


if __name__ == "__main__":
    import sys
    import time

    with HubServer() as server:
        server.add_repo("kit/tiny-llama", kit_repo_files(Path(sys.argv[1])))
        print(server.url, flush=True)
        while True:
            time.sleep(3600)
