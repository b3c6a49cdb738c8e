"""POST /v1/embeddings: the OpenAI response shape over the engine's embedder (modules/engine/embeddings.py)."""

from __future__ import annotations

import base64
import struct
from typing import Any

from modules.api.schemas import MAX_EMBEDDING_INPUTS, EmbeddingsRequest
from modules.core.errors import InvalidRequestError
from modules.engine.embeddings import MODEL_NAME, Embedder


def embed(embedder: Embedder, req: EmbeddingsRequest) -> dict[str, Any]:
    """The OpenAI embeddings response for `req`."""
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if not texts or len(texts) > MAX_EMBEDDING_INPUTS:  # the schema checks too; callers may build one
        raise InvalidRequestError(f"input must hold 1 to {MAX_EMBEDDING_INPUTS} strings", "input")
    vectors, tokens = embedder.vectors(texts)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": MODEL_NAME,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the openai SDK asks for by default: little-endian float32
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector
