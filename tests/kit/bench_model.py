"""A random Llama of about half a billion parameters written straight to GGUF, for decode benchmarks.

Decode speed depends on the bytes read per token, i.e. on the parameter count and the
quant, not on what the weights mean; so random weights and the tiny kit's tokenizer are
enough. The vocabulary is small (about 2,300 tokens), so the body is made a little larger
to stay near 0.5B parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.kit.gguf_export import LlamaShape, quant_supported, write_llama_gguf
from tests.kit.tokenizer import train_tokenizer, vocab_info

BENCH_STD = 0.02  # HF's default init; the output only has to be finite, not varied


def bench_shape(vocab_size: int) -> LlamaShape:
    """20 layers of hidden 1536 / ffn 4096 with 12 heads over 4 kv heads: ~0.51B parameters."""
    return LlamaShape(vocab_size=vocab_size, hidden=1536, layers=20, heads=12, kv_heads=4, ffn=4096,
                      context=4096)


def bench_parameter_count(shape: LlamaShape) -> int:
    """Parameters in a model of `shape` (embedding and untied output head included)."""
    kv = shape.kv_heads * shape.head_dim
    h = shape.hidden
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * shape.ffn + 2 * h  # q, o; k, v; mlp; two norms
    return shape.layers * per_layer + 2 * shape.vocab_size * h + h


def build_bench_gguf(path: Path, quant: str = "q8_0", seed: int = 0) -> Path:
    """Write the benchmark model as `quant` ("q8_0", "q4_0", "f16", "f32"; "q4_k" if gguf can).

    Deterministic in `seed`. Q8_0 (~540 MB) takes about 16 s on 2 cores, mostly numpy's
    random numbers and the Python quantizer; an existing file is overwritten.
    """
    if not quant_supported(quant):
        raise NotImplementedError(f"gguf's Python quantizer cannot write {quant}; use q8_0, q4_0, f16 or f32")
    vocab = vocab_info(train_tokenizer())
    shape = bench_shape(len(vocab.tokens))

    def source(gguf_name: str, hf_name: str, np_shape: tuple[int, ...]) -> np.ndarray:
        if len(np_shape) == 1:
            return np.ones(np_shape, dtype=np.float32)
        # One stream per tensor name keeps the file identical whatever the write order.
        rng = np.random.default_rng([seed, *gguf_name.encode()])
        data = rng.standard_normal(np_shape, dtype=np.float32)
        data *= BENCH_STD
        return data

    return write_llama_gguf(Path(path), shape, vocab, quant, source, name=f"bench-llama-0.5b-{quant}")


def main() -> None:
    """`python -m tests.kit.bench_model OUT.gguf [q8_0|q4_0|f16|f32]`: write the benchmark model."""
    import sys

    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python -m tests.kit.bench_model OUT.gguf [q8_0|q4_0|f16|f32]")
    out = build_bench_gguf(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else "q8_0")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
