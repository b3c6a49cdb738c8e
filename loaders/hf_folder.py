"""Hugging Face model folders: what the Transformers, GPTQ and ExLlamaV2 loaders read from them.

One home for the folder logic the three loaders share: config.json (read, or refused with
the reason), code a folder would need to run, the tokenizer (loaded offline, and shared by
concurrent requests under one lock in `HfTokenizer`), the ids that end a turn, the chat
template, the text of each token and DRY's breakers worked out from them.

Everything here is a pure function of the folder's files and plain values, except
`load_tokenizer` (which imports transformers, inside the function) and `HfTokenizer`.
No loader imports another loader's private names: what they share lives here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from modules.core.errors import BackendMissingError, ModelLoadError, ModelNotLoadedError

T = TypeVar("T")

#: Breaker tokenizations cached per loaded model; cleared past this many distinct lists.
BREAKER_CACHE_SIZE = 64
#: What installs transformers (the Hugging Face tokenizer every loader here needs).
TRANSFORMERS_HINT = "pip install -r requirements.txt"


# --- files ---------------------------------------------------------------------------------
def read_config(path: Path, what: str) -> dict[str, Any]:
    """config.json of the model folder at `path`, as a dict.

    Raises ModelLoadError when `path` is not a folder, has no config.json (saying it is then
    not `what`, e.g. "a GPTQ model folder"), or its config.json is not a readable JSON object.
    """
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a model folder")
    file = path / "config.json"
    if not file.is_file():
        raise ModelLoadError(f"{path.name} has no config.json: not {what}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path.name}/config.json cannot be read: {exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path.name}/config.json does not hold a JSON object")
    return config


def read_optional_json(file: Path) -> dict[str, Any]:
    """The JSON object in `file`; {} when it is missing, unreadable or not an object (for the
    optional files: generation_config.json, tokenizer_config.json)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """Refuse early, and say why, when the folder's architecture exists only as the Python
    code it ships (config.json names an `auto_map` and a model_type Transformers lacks).

    Imports transformers (the caller has already made sure it is there).
    """
    if trust_remote_code:
        return
    config = read_config(path, "a Transformers model folder")
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type and model_type not in CONFIG_MAPPING and "auto_map" in config:
        raise ModelLoadError(
            f"{path.name} is a '{model_type}' model, which Transformers {transformers.__version__} only runs "
            "with the Python code shipped in the folder: enable trust_remote_code if you trust its source"
        )


# --- tokens that end a turn, the chat template ----------------------------------------------
def merge_token_ids(*values: Any) -> tuple[int, ...]:
    """Every token id in `values` (each an id, a list of ids or None), in order, without
    duplicates; whatever is not a non-negative int (None, a bool, a string) is skipped."""
    ids: list[int] = []
    for value in values:
        for tid in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0 and tid not in ids:
                ids.append(tid)
    return tuple(ids)


def eos_token_ids(path: Path, *more: Any) -> tuple[int, ...]:
    """Every id that ends a turn: generation_config.json's (often a list), config.json's,
    then `more` (the loaded config's, the tokenizer's), in that order without duplicates.
    Backends keep only one of them; a chat model often has two."""
    return merge_token_ids(
        read_optional_json(path / "generation_config.json").get("eos_token_id"),
        read_optional_json(path / "config.json").get("eos_token_id"),
        *more,
    )


def chat_template(path: Path, tokenizer_template: Any = None) -> str | None:
    """The model's chat template: the tokenizer's (the default one of several), else the
    folder's chat_template.jinja, else tokenizer_config.json's `chat_template`."""
    candidates: list[Any] = [tokenizer_template]
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        candidates.append(jinja.read_text(encoding="utf-8"))
    candidates.append(read_optional_json(path / "tokenizer_config.json").get("chat_template"))
    for template in candidates:
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()), None)
        if isinstance(template, str) and template.strip():
            return template
    return None


def tokenizer_info(path: Path, tokenizer: Any, *eos_ids: Any) -> dict[str, Any]:
    """ModelInfo's token fields (keyword arguments) for a model folder and its Hugging Face
    tokenizer; `eos_ids` are the loaded config's end ids, merged after the folder's."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_ids": eos_token_ids(path, *eos_ids, tokenizer.eos_token_id),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "chat_template": chat_template(path, getattr(tokenizer, "chat_template", None)),
        "special_tokens": dict(tokenizer.special_tokens_map),
    }


# --- the tokenizer --------------------------------------------------------------------------
def load_tokenizer(path: Path, *, trust_remote_code: bool = False, loader: str = "transformers") -> Any:
    """The folder's Hugging Face tokenizer, offline (`local_files_only`). BackendMissingError
    naming the install command when transformers is missing (`loader` says who needs it);
    whatever transformers raises for a bad folder is the caller's to report."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise BackendMissingError(f"the {loader} loader needs transformers: {TRANSFORMERS_HINT}") from exc
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)


def vocab_texts(tokenizer: Any, size: int) -> list[str]:
    """The text of each token id below `size`, so that tokens merely containing a DRY breaker
    (newline pairs, ".\\n") break repeats too. The Rust tokenizer decodes 128k tokens in
    ~0.1 s where the Python batch_decode loop takes ~1 s."""
    singles = [[tid] for tid in range(size)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return list(backend.decode_batch(singles, skip_special_tokens=False))
    return list(tokenizer.batch_decode(singles, clean_up_tokenization_spaces=False))


class HfTokenizer:
    """A loaded model's Hugging Face tokenizer, safe to share between threads.

    Fast tokenizers are not thread-safe ("Already borrowed": transformers reconfigures
    truncation on the shared Rust object per call), and the engine encodes and decodes from
    several threads at once (parallel requests, the API's token counts while a reply
    streams): every call takes one lock. `vocab_size` is how many ids are real tokens (their
    texts are worked out once, for DRY). After `close()` every call raises
    ModelNotLoadedError naming the model.
    """

    def __init__(self, tokenizer: Any, *, name: str, bos_token_id: int | None, vocab_size: int) -> None:
        self._tokenizer: Any = tokenizer
        self._name = name
        self._bos = bos_token_id
        self._vocab_size = vocab_size
        self._lock = threading.Lock()
        self._vocab_texts: list[str] | None = None
        self._breakers: dict[tuple[str, ...], Any] = {}

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special-token text maps to the special token. BOS is
        prepended when `add_bos`, the model has one and the ids do not start with it."""
        tokenizer = self._require()
        with self._lock:
            ids = list(tokenizer.encode(text, add_special_tokens=False))
        if add_bos and self._bos is not None and ids[:1] != [self._bos]:
            ids.insert(0, self._bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence comes back as U+FFFD."""
        tokenizer = self._require()
        # No clean-up of spaces: it rewrites " ." into "." once the dot arrives, so the text
        # of a prefix would change as tokens stream in.
        with self._lock:
            return tokenizer.decode(
                [int(i) for i in ids], skip_special_tokens=skip_special, clean_up_tokenization_spaces=False
            )

    def dry_breakers(
        self, breakers: Sequence[str], build: Callable[[Callable[[str], list[int]], list[str]], T]
    ) -> T:
        """DRY's `breakers` in the backend's form, worked out once per distinct list:
        `build(encode, vocab_texts)` runs under the lock (the tokenizer and the cache are
        shared by parallel requests) with an `encode` that adds no special tokens and the
        text of every token id."""
        key = tuple(breakers)
        tokenizer = self._require()
        with self._lock:
            if key not in self._breakers:
                if len(self._breakers) >= BREAKER_CACHE_SIZE:
                    self._breakers.clear()
                if self._vocab_texts is None:
                    self._vocab_texts = vocab_texts(tokenizer, self._vocab_size)
                encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
                self._breakers[key] = build(encode, self._vocab_texts)
            return self._breakers[key]

    def close(self) -> None:
        """Drop the tokenizer (and the texts worked out from it)."""
        with self._lock:
            self._tokenizer = None
            self._vocab_texts = None
            self._breakers.clear()

    def _require(self) -> Any:
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise ModelNotLoadedError(f"{self._name} has been unloaded")
        return tokenizer


class HfTokens:
    """LoadedModel's `encode` and `decode` for a loader whose tokens come from a Hugging
    Face tokenizer: a mixin over its `_tokens` (an HfTokenizer, set in its __init__)."""

    _tokens: HfTokenizer

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special-token text maps to the special token. BOS is
        prepended when `add_bos`, the model has one and the ids do not start with it."""
        return self._tokens.encode(text, add_bos)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence comes back as U+FFFD."""
        return self._tokens.decode(ids, skip_special)
