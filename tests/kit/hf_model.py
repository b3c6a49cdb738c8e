"""A random ~0.36M-parameter Llama saved as a Hugging Face folder (fp32 safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.kit.gguf_export import LlamaShape, tensor_plan
from tests.kit.tokenizer import VocabInfo

# std 0.1 rather than HF's 0.02: with 0.02 the logits are so flat that greedy decoding
# collapses into one repeated token and a layout bug (e.g. an unpermuted q/k) could hide.
WEIGHT_STD = 0.1
# Norm weights are drawn around 1 instead of being exactly 1, so that a norm tensor mapped
# to the wrong place changes the output too.
NORM_STD = 0.1


def tiny_shape(vocab_size: int) -> LlamaShape:
    """Two layers, 4 query heads over 2 kv heads (GQA, so the k permutation differs from q)."""
    return LlamaShape(vocab_size=vocab_size, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128)


def random_llama_weights(shape: LlamaShape, seed: int) -> dict[str, np.ndarray]:
    """HF-named fp32 weights drawn from a numpy Generator, so they depend on `seed` alone.

    Each tensor has its own stream keyed by its position, so adding a tensor to the plan
    later does not reshuffle the others.
    """
    weights: dict[str, np.ndarray] = {}
    for index, (_, hf_name, np_shape) in enumerate(tensor_plan(shape)):
        rng = np.random.default_rng([seed, index])
        noise = rng.standard_normal(np_shape, dtype=np.float32)
        weights[hf_name] = 1.0 + NORM_STD * noise if len(np_shape) == 1 else WEIGHT_STD * noise
    return weights


def llama_config(shape: LlamaShape, vocab: VocabInfo) -> Any:
    """The transformers LlamaConfig matching `shape` (fp32, untied head, rope_theta as given)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.context, rope_theta=shape.rope_theta, rms_norm_eps=shape.rms_eps,
        tie_word_embeddings=False, initializer_range=WEIGHT_STD, hidden_act="silu",
        bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id, pad_token_id=vocab.eos_id,
        dtype="float32",
    )


def save_hf_model(folder: Path, shape: LlamaShape, vocab: VocabInfo, weights: dict[str, np.ndarray]) -> None:
    """config.json, generation_config.json and model.safetensors via save_pretrained.

    Going through LlamaForCausalLM (instead of writing safetensors by hand) checks that the
    weight names and shapes are exactly what transformers expects: load_state_dict is strict.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    config = llama_config(shape, vocab)
    model = LlamaForCausalLM(config)  # a tiny model: building it on CPU costs milliseconds
    model.load_state_dict({name: torch.from_numpy(array) for name, array in weights.items()}, strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=vocab.bos_id, eos_token_id=[vocab.eos_id, vocab.im_end_id], pad_token_id=vocab.eos_id,
    )
    model.save_pretrained(str(folder))
