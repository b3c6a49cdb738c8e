"""Tiny models built locally for tests and benchmarks (never downloaded).

`build_tiny_kit` trains a byte-level BPE on tests/kit/corpus.txt and makes one random
Llama (~0.36M parameters) in three forms that must agree with each other: a Hugging Face
folder, an f32 GGUF with the same weights, and a Q8_0 GGUF. `build_bench_gguf` writes a
~0.5B random Llama straight to GGUF for decode-speed benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.kit.bench_model import build_bench_gguf
from tests.kit.gguf_export import hf_to_gguf_tensor, write_llama_gguf
from tests.kit.hf_model import random_llama_weights, save_hf_model, tiny_shape
from tests.kit.tokenizer import save_hf_tokenizer, train_tokenizer, vocab_info

__all__ = ["TinyKit", "build_bench_gguf", "build_tiny_kit"]

HF_DIR_NAME = "tiny-llama"
GGUF_F32_NAME = "tiny-llama-f32.gguf"
GGUF_Q8_0_NAME = "tiny-llama-Q8_0.gguf"


@dataclass(frozen=True)
class TinyKit:
    """Where one built kit lives. All three models hold the same weights and tokenizer.

    The GGUF files and the HF folder sit side by side in `root`, so `root` works as a
    models folder listing all three.
    """

    root: Path
    hf_dir: Path  # config.json, model.safetensors, generation_config.json, tokenizer files
    gguf_f32: Path  # the same weights as f32 GGUF, with tokenizer and chat template metadata
    gguf_q8_0: Path  # the same weights as Q8_0 (norm weights f32)


def build_tiny_kit(root: Path, seed: int = 0) -> TinyKit:
    """Build the kit under `root` (created if missing); deterministic in `seed`, ~2 s after imports."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    kit = TinyKit(root=root, hf_dir=root / HF_DIR_NAME, gguf_f32=root / GGUF_F32_NAME,
                  gguf_q8_0=root / GGUF_Q8_0_NAME)
    tokenizer = train_tokenizer()
    vocab = vocab_info(tokenizer)
    shape = tiny_shape(len(vocab.tokens))
    weights = random_llama_weights(shape, seed)

    kit.hf_dir.mkdir(exist_ok=True)
    save_hf_tokenizer(tokenizer, kit.hf_dir)
    save_hf_model(kit.hf_dir, shape, vocab, weights)

    def source(gguf_name: str, hf_name: str, np_shape: tuple[int, ...]) -> np.ndarray:
        return hf_to_gguf_tensor(gguf_name, weights[hf_name], shape)

    write_llama_gguf(kit.gguf_f32, shape, vocab, "f32", source, name="tiny-llama")
    write_llama_gguf(kit.gguf_q8_0, shape, vocab, "q8_0", source, name="tiny-llama")
    return kit
