"""What the files of a Hub repo are, and which of them to download. Pure: no network.

`classify` names each file's kind (a GGUF quant and its bits, a safetensors shard, a
tokenizer or config file, a pickle...); `gguf_choices` groups split GGUF shards into one
choice per quant; `plan_download` picks the files for the user's choice and says where
they go and what was skipped and why.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from modules.core.errors import InvalidRequestError, UnsafePathError
from modules.core.paths import safe_join

#: Nominal bits per weight of llama.cpp quant types (for the table; the file size is what counts).
QUANT_BITS = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54,
    "Q5_1": 6.0, "Q5_0": 5.5, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_1": 5.0, "Q4_0": 4.5, "IQ4_NL": 4.5,
    "IQ4_XS": 4.25, "MXFP4": 4.25, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "IQ3_M": 3.66,
    "IQ3_S": 3.44, "IQ3_XS": 3.3, "IQ3_XXS": 3.06, "Q2_K_S": 2.97, "Q2_K": 3.0, "IQ2_M": 2.7,
    "IQ2_S": 2.5, "IQ2_XS": 2.31, "IQ2_XXS": 2.06, "IQ1_M": 1.75, "IQ1_S": 1.56, "TQ2_0": 2.06, "TQ1_0": 1.69,
}
_QUANT_RE = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(sorted(QUANT_BITS, key=len, reverse=True)) + r")(?![A-Za-z0-9])",
                       re.IGNORECASE)
_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
TOKENIZER_FILES = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "vocab.txt", "spiece.model"}
CONFIG_FILES = {"config.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
                "preprocessor_config.json", "processor_config.json", "quantize_config.json", "params.json"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
OTHER_WEIGHTS = {".msgpack", ".h5", ".onnx", ".ot", ".tflite", ".mlmodel", ".npz"}

# Kinds a folder model needs, in the order they are fetched: weights first and config.json
# last, so the folder only looks like a model in the Model tab once its weights are in.
FOLDER_KINDS = ("safetensors", "tokenizer", "config")


@dataclass(frozen=True)
class HubFile:
    """One file in a repo listing: where it is, how big, its checksums and what it is."""

    path: str
    size: int
    sha256: str | None = None  # LFS files: the sha256 the Hub stores
    blob_id: str | None = None  # git blob sha1 (checks small, non-LFS files)
    kind: str = "other"
    quant: str | None = None
    bits: float | None = None
    unsafe: str | None = None  # why the name is refused (escapes the destination)

    @property
    def label(self) -> str:
        if self.unsafe:
            return f"refused: {self.unsafe}"
        if self.kind == "gguf" and self.quant:
            return f"GGUF {self.quant} (~{self.bits:g} bits/weight)" if self.bits else f"GGUF {self.quant}"
        return {"safetensors": "safetensors weights", "tokenizer": "tokenizer", "config": "config",
                "pickle": "pickled weights (can run code when loaded)", "gguf": "GGUF",
                "gguf-mmproj": "GGUF vision projector", "other-weights": "weights in another format"
                }.get(self.kind, "other")


@dataclass(frozen=True)
class GgufChoice:
    """One GGUF quant the user can pick: a single file or all shards of a split one."""

    name: str  # the first file's path in the repo
    quant: str | None
    bits: float | None
    files: tuple[HubFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class DownloadPlan:
    """Files to fetch, where they go (`folder` None: straight into models/), and what is left out."""

    files: tuple[HubFile, ...]
    folder: str | None
    skipped: tuple[tuple[str, str], ...] = ()
    needs_confirm: tuple[str, ...] = field(default=())

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def classify(path: str, size: int, sha256: str | None = None, blob_id: str | None = None) -> HubFile:
    """The HubFile for a listed path; names that would escape a folder are marked `unsafe`."""
    unsafe = None
    try:
        safe_join(Path("/nonexistent-hub-check"), path, subfolders=True, what="file name from the hub")
    except UnsafePathError as exc:
        unsafe = str(exc)
    name = PurePosixPath(path).name
    lower = name.lower()
    suffix = PurePosixPath(lower).suffix
    kind, quant, bits = "other", None, None
    if suffix == ".gguf":
        kind = "gguf-mmproj" if "mmproj" in lower else "gguf"
        match = _QUANT_RE.search(name)
        if match:
            quant = match.group(1).upper()
            bits = QUANT_BITS[quant]
    elif suffix == ".safetensors":
        kind = "safetensors"
    elif lower in TOKENIZER_FILES or lower.endswith(".tiktoken"):
        kind = "tokenizer"
    elif lower in CONFIG_FILES or lower.endswith(".index.json"):
        kind = "config"
    elif suffix in PICKLE_SUFFIXES:
        kind = "pickle"
    elif suffix in OTHER_WEIGHTS:
        kind = "other-weights"
    return HubFile(path=path, size=size, sha256=sha256, blob_id=blob_id, kind=kind, quant=quant, bits=bits,
                   unsafe=unsafe)


def gguf_choices(files: list[HubFile]) -> list[GgufChoice]:
    """One choice per GGUF model file (split shards grouped under their first), smallest first."""
    groups: dict[str, list[HubFile]] = {}
    for f in files:
        if f.kind != "gguf" or f.unsafe:
            continue
        match = _SHARD_RE.search(f.path)
        key = f.path[: match.start()] if match else f.path
        groups.setdefault(key, []).append(f)
    choices = []
    for members in groups.values():
        members.sort(key=lambda f: f.path)
        first = members[0]
        choices.append(GgufChoice(name=first.path, quant=first.quant, bits=first.bits, files=tuple(members)))
    return sorted(choices, key=lambda c: (c.size, c.name))


def plan_download(files: list[HubFile], folder: str, *, gguf: str | None = None, pattern: str | None = None,
                  allow_pickles: bool = False) -> DownloadPlan:
    """Which files to fetch for the user's choice; InvalidRequestError when nothing fits.

    `gguf`: the chosen GgufChoice name; `pattern`: a file name or glob the user typed (a
    single GGUF file goes to models/, anything else to models/`folder`/). Without either,
    a repo with GGUF files and no safetensors needs a choice; a folder model takes its
    safetensors shards, tokenizer and config files. Pickles are skipped when safetensors
    exist and otherwise wait for `allow_pickles`. Unsafe names are always refused.
    """
    refused = [f for f in files if f.unsafe]
    if pattern:
        hit = [f for f in files if fnmatch.fnmatch(f.path, pattern) or fnmatch.fnmatch(PurePosixPath(f.path).name,
                                                                                        pattern)]
        for f in hit:
            if f.unsafe:
                raise UnsafePathError(f.unsafe, "file")
        if not hit:
            raise InvalidRequestError(f"no file in the repo matches {pattern!r}", "file")
        if all(f.kind == "gguf" for f in hit) and len(gguf_choices(hit)) == 1:
            return DownloadPlan(files=tuple(hit), folder=None, skipped=_skipped(files, hit, refused))
        return _folder_plan(hit, files, folder, refused, allow_pickles)
    choices = gguf_choices(files)
    if gguf is not None:
        chosen = next((c for c in choices if c.name == gguf), None)
        if chosen is None:
            raise InvalidRequestError(f"{gguf!r} is not one of the GGUF files in this repo", "file")
        return DownloadPlan(files=chosen.files, folder=None, skipped=_skipped(files, chosen.files, refused))
    if choices and not any(f.kind == "safetensors" for f in files):
        if len(choices) == 1:
            return DownloadPlan(files=choices[0].files, folder=None, skipped=_skipped(files, choices[0].files, refused))
        names = ", ".join(c.quant or c.name for c in choices)
        raise InvalidRequestError(f"this repo has {len(choices)} GGUF files ({names}): pick one", "file")
    return _folder_plan(files, files, folder, refused, allow_pickles)


def _folder_plan(candidates: list[HubFile], files: list[HubFile], folder: str, refused: list[HubFile],
                 allow_pickles: bool) -> DownloadPlan:
    has_safetensors = any(f.kind == "safetensors" and not f.unsafe for f in files)
    take = [f for f in candidates if not f.unsafe and f.kind in FOLDER_KINDS]
    pickles = [f for f in candidates if not f.unsafe and f.kind == "pickle"]
    confirm: tuple[str, ...] = ()
    if pickles and not has_safetensors:
        if allow_pickles:
            take.extend(pickles)
        else:
            confirm = tuple(f.path for f in pickles)
    if not any(f.kind in ("safetensors", "pickle", "gguf") for f in take) and not confirm:
        if not any(f.kind in ("tokenizer", "config") for f in take):
            raise InvalidRequestError("nothing to download: no model weights in the selection", "file")
    order = {kind: i for i, kind in enumerate(("safetensors", "pickle", "gguf", "tokenizer", "config"))}
    take.sort(key=lambda f: (order.get(f.kind, 9), f.path == "config.json", f.path))
    return DownloadPlan(files=tuple(take), folder=folder, skipped=_skipped(files, take, refused),
                        needs_confirm=confirm)


def _skipped(files: list[HubFile], taken: list[HubFile] | tuple[HubFile, ...],
             refused: list[HubFile]) -> tuple[tuple[str, str], ...]:
    chosen = {f.path for f in taken}
    has_safetensors = any(f.kind == "safetensors" for f in files)
    out = []
    for f in files:
        if f.path in chosen:
            continue
        if f in refused:
            reason = f"refused: {f.unsafe}"
        elif f.kind == "pickle":
            reason = ("pickled weights skipped: safetensors are available" if has_safetensors
                      else "pickled weights: download only after you confirm")
        elif f.kind == "gguf":
            reason = "another GGUF quant"
        else:
            reason = "not needed to run the model"
        out.append((f.path, reason))
    return tuple(out)
