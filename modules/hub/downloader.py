"""Download models from the Hugging Face Hub (or a mirror) into the models folder.

Built on `huggingface_hub` (imported inside functions only, so the app starts fast): its
API client lists the repo, its `http_get` streams each file with retries and Range
resume, `HF_TOKEN` and `HF_ENDPOINT` are honoured. We add what it does not do in 2.4:
  * partial files persist as `NAME.partial` next to their destination, so a download
    killed half-way resumes from there on the next run (granularity: the client writes
    in 10 MB chunks, so the last unfinished chunk is fetched again);
  * every file is checked against the listing: size, then sha256 (LFS files) or the git
    blob sha1 (small files), and only then renamed into place; a mismatch deletes the
    partial file and raises ChecksumError;
  * every file name from the hub goes through `safe_join(..., subfolders=True)`.
Used by the Model tab's download panel and by download-model.py; downloads run on the
caller's thread (the panel uses a worker thread), never in the generation queue.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from modules.core.errors import (
    ChecksumError,
    DownloadCancelled,
    DownloadError,
    InvalidRequestError,
    NotFoundError,
    WorkbenchError,
)
from modules.core.paths import safe_join
from modules.hub import memory_fit
from modules.hub.files import DownloadPlan, GgufChoice, HubFile, classify, gguf_choices, plan_download
from modules.hub.links import HubLink, parse_link

DEFAULT_ENDPOINT = "https://huggingface.co"
HEADER_PREFIX_BYTES = 2 * 2**20  # enough for the architecture keys, which come before the tokenizer
ProgressCallback = Callable[[str, int, int], None]
"""progress(file_path, bytes_done_overall, bytes_total_overall)."""




@dataclass(frozen=True)
class GgufOption:
    """A GGUF choice with its memory estimate and whether it fits the budget."""

    choice: GgufChoice
    estimate: memory_fit.MemoryEstimate
    fits: bool


@dataclass(frozen=True)
class RepoListing:
    """A repo at one commit: its files, the GGUF options with estimates, and the recommendation."""

    link: HubLink
    commit: str
    files: tuple[HubFile, ...]
    options: tuple[GgufOption, ...] = ()
    recommended: str | None = None
    folder_estimate: memory_fit.MemoryEstimate | None = None
    n_ctx: int = 4096

    def plan(self, gguf: str | None = None, pattern: str | None = None, allow_pickles: bool = False) -> DownloadPlan:
        """`plan_download` for this repo; a link to one file (/blob/, /resolve/) selects that file."""
        if pattern is None and gguf is None and self.link.path:
            pattern = self.link.path if "." in self.link.path.rsplit("/", 1)[-1] else self.link.path + "/*"
        return plan_download(list(self.files), self.link.folder_name, gguf=gguf, pattern=pattern,
                             allow_pickles=allow_pickles)


def endpoint_url(endpoint: str | None = None) -> str:
    """The hub to talk to: `endpoint`, else HF_ENDPOINT, else huggingface.co (read at call time)."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def resolve(text: str, branch: str | None = None, endpoint: str | None = None) -> HubLink:
    """`parse_link` accepting the mirror's host as well."""
    host = urlsplit(endpoint_url(endpoint)).hostname or ""
    return parse_link(text, branch=branch, extra_hosts=(host, f"{host}:{urlsplit(endpoint_url(endpoint)).port}"))


def list_repo(text: str, branch: str | None = None, *, endpoint: str | None = None, token: str | None = None,
              n_ctx: int = 4096, cache_type: str = "f16", free: memory_fit.FreeMemory | None = None) -> RepoListing:
    """List a repo's files with kinds and sizes, estimate each GGUF quant, recommend one.

    `free` is the memory budget (default: free RAM + VRAM now). NotFoundError for a
    missing repo or branch, DownloadError when the hub cannot be reached.
    """
    link = resolve(text, branch, endpoint)
    api = _api(endpoint, token)
    with _hub_errors(link):
        info = api.model_info(link.repo_id, revision=link.revision)
        commit = info.sha or link.revision or "main"
        entries = list(api.list_repo_tree(link.repo_id, revision=commit, recursive=True))
    files = tuple(classify(e.path, int(e.size or 0), sha256=e.lfs.sha256 if getattr(e, "lfs", None) else None,
                           blob_id=getattr(e, "blob_id", None))
                  for e in entries if hasattr(e, "size"))
    listing = RepoListing(link=link, commit=commit, files=files, n_ctx=n_ctx)
    return _with_estimates(listing, endpoint, token, cache_type, free or memory_fit.free_memory())


def _with_estimates(listing: RepoListing, endpoint: str | None, token: str | None, cache_type: str,
                    free: memory_fit.FreeMemory) -> RepoListing:
    choices = gguf_choices(list(listing.files))
    options: list[GgufOption] = []
    if choices:
        header = memory_fit.parse_gguf_prefix(
            _fetch(listing, choices[0].files[0].path, endpoint, token, HEADER_PREFIX_BYTES))
        shape = memory_fit.shape_from_gguf(header)
        for choice in choices:
            est = memory_fit.estimate_gguf(choice.size, shape, listing.n_ctx, cache_type)
            options.append(GgufOption(choice=choice, estimate=est, fits=memory_fit.fits(est, free)))
    fitting = [o for o in options if o.fits]
    recommended = max(fitting, key=lambda o: o.choice.size) if fitting else (options[0] if options else None)
    folder_estimate = None
    config = next((f for f in listing.files if f.path == "config.json"), None)
    if config and any(f.kind == "safetensors" for f in listing.files):
        folder_estimate = _folder_estimate(listing, endpoint, token)
    return RepoListing(link=listing.link, commit=listing.commit, files=listing.files, options=tuple(options),
                       recommended=recommended.choice.name if recommended else None,
                       folder_estimate=folder_estimate, n_ctx=listing.n_ctx)


def _folder_estimate(listing: RepoListing, endpoint: str | None, token: str | None) -> memory_fit.MemoryEstimate | None:
    import json

    try:
        config = json.loads(_fetch(listing, "config.json", endpoint, token, 1 << 20))
    except ValueError:
        return None
    shape = memory_fit.shape_from_config(config)
    per = memory_fit.bytes_per_parameter(config)
    stored = sum(f.size for f in listing.files if f.kind == "safetensors")
    stored_per = memory_fit.DTYPE_BYTES.get(config.get("dtype") or config.get("torch_dtype") or "float32", per)
    weights = int(stored * per / stored_per) if not config.get("quantization_config") else stored
    kv = memory_fit.kv_cache_bytes(shape, listing.n_ctx, "f32" if per >= 4 else "f16")
    return memory_fit.MemoryEstimate(weights=weights, kv_cache=kv, overhead=memory_fit.TRANSFORMERS_BASE_BYTES,
                                     n_ctx=listing.n_ctx, layers=shape.layers, kv_known=shape.known)


def _fetch(listing: RepoListing, path: str, endpoint: str | None, token: str | None, limit: int) -> bytes:
    """The first `limit` bytes of a file (a Range request); b"" when the hub will not say."""
    from huggingface_hub.utils import build_hf_headers, get_session

    headers = build_hf_headers(token=token)
    headers["Range"] = f"bytes=0-{limit - 1}"
    try:
        response = get_session().get(file_url(listing.link.repo_id, listing.commit, path, endpoint), headers=headers,
                                     follow_redirects=True, timeout=30)
    except Exception:  # noqa: BLE001 - an estimate is optional; the listing must still show
        return b""
    return response.content[:limit] if response.status_code in (200, 206) else b""


def file_url(repo_id: str, revision: str, path: str, endpoint: str | None = None) -> str:
    """`{endpoint}/{repo}/resolve/{revision}/{path}`, quoted the way the hub expects."""
    return f"{endpoint_url(endpoint)}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


def destination(models_dir: Path, plan: DownloadPlan, file: HubFile) -> Path:
    """Where `file` goes: models/NAME.gguf for a lone GGUF, models/FOLDER/PATH otherwise; refuses escapes."""
    safe_join(models_dir, file.path, subfolders=True, what="file name from the hub")  # checks every part
    if plan.folder is None:
        return safe_join(models_dir, file.path.rsplit("/", 1)[-1], what="file name from the hub")
    folder = safe_join(models_dir, plan.folder, what="model folder")
    return safe_join(folder, file.path, subfolders=True, what="file name from the hub")


def download(listing: RepoListing, plan: DownloadPlan, models_dir: Path, *, endpoint: str | None = None,
             token: str | None = None, progress: ProgressCallback | None = None, tqdm_class: Any = None,
             cancel: threading.Event | None = None) -> list[Path]:
    """Fetch every file of `plan` into `models_dir`, verified; returns the final paths.

    Files already in place with the right size and hash are kept. Raises ChecksumError
    (the bad partial file is deleted), DownloadCancelled (partials kept), DownloadError,
    UnsafePathError; InvalidRequestError when the plan still waits for a pickle confirmation.
    """
    if plan.needs_confirm:
        raise InvalidRequestError("this repo only has pickled weights (they can run code when loaded): "
                                  "confirm to download " + ", ".join(plan.needs_confirm), "allow_pickles")
    targets = [(f, destination(models_dir, plan, f)) for f in plan.files]  # all names checked before a byte
    total, done = plan.size, 0
    out = []
    for file, target in targets:
        def relay(n: int, _file: HubFile = file, _base: int = done) -> None:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled("download stopped; run it again to resume")
            if progress:
                progress(_file.path, _base + n, total)
        fetch_file(listing, file, target, endpoint=endpoint, token=token, on_bytes=relay, tqdm_class=tqdm_class)
        done += file.size
        out.append(target)
    return out


def fetch_file(listing: RepoListing, file: HubFile, target: Path, *, endpoint: str | None = None,
               token: str | None = None, on_bytes: Callable[[int], None] | None = None,
               tqdm_class: Any = None) -> Path:
    """Download one file to `target` via `target.partial` (resumed if present), verify, rename."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    if target.is_file() and target.stat().st_size == file.size and _verified(file, target):
        if on_bytes:
            on_bytes(file.size)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    have = partial.stat().st_size if partial.is_file() else 0
    if have > file.size:
        partial.unlink()
        have = 0
    bar = _progress_class(tqdm_class, on_bytes, file.path)
    with _hub_errors(listing.link), partial.open("ab") as handle:
        http_get(file_url(listing.link.repo_id, listing.commit, file.path, endpoint), handle, resume_size=have,
                 headers=build_hf_headers(token=token), expected_size=file.size,
                 displayed_filename=file.path.rsplit("/", 1)[-1], tqdm_class=bar)
    problem = _check(file, partial)
    if problem:
        partial.unlink(missing_ok=True)
        raise ChecksumError(f"{file.path} failed its check ({problem}); the damaged download was deleted, "
                            "run the download again")
    os.replace(partial, target)
    return target


def _verified(file: HubFile, path: Path) -> bool:
    return _check(file, path) is None


def _check(file: HubFile, path: Path) -> str | None:
    """None when `path` matches the listing, else what differs (size, sha256 or git sha1)."""
    size = path.stat().st_size
    if size != file.size:
        return f"size {size} bytes, expected {file.size}"
    if file.sha256:
        got = _hash_file(hashlib.sha256(), path)
        return None if got == file.sha256 else f"sha256 {got[:12]}..., expected {file.sha256[:12]}..."
    if file.blob_id and len(file.blob_id) == 40:
        sha1 = hashlib.sha1(f"blob {size}\0".encode())  # noqa: S324 - git's blob id, not a security hash
        got = _hash_file(sha1, path)
        return None if got == file.blob_id else f"git blob {got[:12]}..., expected {file.blob_id[:12]}..."
    return None


def _hash_file(h: Any, path: Path) -> str:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _progress_class(base: Any, on_bytes: Callable[[int], None] | None, name: str) -> Any:
    """A tqdm class for http_get that also reports bytes to `on_bytes` (quiet when `base` is None)."""
    from tqdm.auto import tqdm

    parent = base or tqdm
    quiet = base is None

    class Relay(parent):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if quiet:
                kwargs["disable"] = True
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)
            self._seen = int(kwargs.get("initial") or 0)
            if on_bytes and self._seen:
                on_bytes(self._seen)

        def update(self, n: float | None = 1) -> bool | None:
            self._seen += int(n or 0)
            if on_bytes:
                on_bytes(self._seen)
            return super().update(n)

    return Relay


class _hub_errors:  # noqa: N801 - used as a context manager, reads like one
    """Turn huggingface_hub / network exceptions into our typed errors with a clear message."""

    def __init__(self, link: HubLink) -> None:
        self.link = link

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, WorkbenchError):
            return False
        from huggingface_hub import errors as hf

        repo = self.link.repo_id
        if isinstance(exc, hf.GatedRepoError):
            raise DownloadError(f"{repo} is gated: accept its licence on the Hub and set HF_TOKEN") from exc
        if isinstance(exc, hf.RevisionNotFoundError):
            raise NotFoundError(f"{repo} has no branch or revision {self.link.revision!r}", "branch") from exc
        if isinstance(exc, hf.RepositoryNotFoundError):
            raise NotFoundError(f"repository {repo} not found on {endpoint_url()} (private? set HF_TOKEN)",
                                "link") from exc
        if isinstance(exc, hf.EntryNotFoundError):
            raise NotFoundError(f"a file of {repo} is missing on the hub: {exc}", "file") from exc
        if isinstance(exc, OSError | ValueError) or type(exc).__module__.startswith(("httpx", "huggingface_hub")):
            raise DownloadError(f"could not download from {repo}: {type(exc).__name__}: {exc}") from exc
        return False


def _api(endpoint: str | None, token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint_url(endpoint), token=token)
