"""A random Llama at a GPU-sized shape (~0.1B parameters), for the `gpu` tests of the GPU loaders.

The tiny kit's shape (hidden 64) is below what GPU quantisers and kernels accept: EXL2 and
GPTQ quantise in groups of 32-128 input columns and exllamav2's attention wants a head size
of 64-256. This shape keeps every input width a multiple of 128 (hidden 1024, ffn 2816,
head size 128) and pads the vocabulary to a multiple of 128, the way real models pad theirs.

Weights are drawn with std gain/sqrt(fan_in) instead of the tiny kit's flat 0.1: at hidden
1024 a std of 0.1 makes each matmul grow activations ~3x, which overflows float16, while
HF's 0.02 makes greedy decoding repeat one token. With a gain of 1 per layer and a head of
std 4/sqrt(hidden) the logits have a spread of a few units, so greedy text varies with the
context and an fp16 model stays finite. The weights are saved as float16: that is the model
both Transformers (fp16) and the quantisers start from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.kit.gguf_export import LlamaShape, tensor_plan
from tests.kit.hf_model import NORM_STD, llama_config
from tests.kit.tokenizer import save_hf_tokenizer, train_tokenizer, vocab_info

LAYER_GAIN = 1.0
HEAD_GAIN = 4.0
EMBED_STD = 1.0
VOCAB_MULTIPLE = 128


def gpu_shape(vocab_size: int) -> LlamaShape:
    """8 layers, hidden 1024, 8 heads of 128 over 4 kv heads (GQA), ffn 2816, 2048 context."""
    padded = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return LlamaShape(vocab_size=padded, hidden=1024, layers=8, heads=8, kv_heads=4, ffn=2816, context=2048)


def gpu_llama_weights(shape: LlamaShape, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights, one numpy stream per tensor (deterministic in `seed`)."""
    weights: dict[str, np.ndarray] = {}
    for index, (_, hf_name, np_shape) in enumerate(tensor_plan(shape)):
        rng = np.random.default_rng([seed, index])
        noise = rng.standard_normal(np_shape, dtype=np.float32)
        if len(np_shape) == 1:
            weights[hf_name] = 1.0 + NORM_STD * noise
        elif hf_name == "model.embed_tokens.weight":
            weights[hf_name] = EMBED_STD * noise
        else:
            gain = HEAD_GAIN if hf_name == "lm_head.weight" else LAYER_GAIN
            weights[hf_name] = noise * np.float32(gain / np.sqrt(np_shape[1]))
    return weights


def build_gpu_model(folder: Path, seed: int = 0) -> Path:
    """Write the tokenizer and the float16 model to `folder` (about 210 MB, ~10 s on a CPU)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    vocab = vocab_info(tokenizer)
    shape = gpu_shape(len(vocab.tokens))
    save_hf_tokenizer(tokenizer, folder)
    config = llama_config(shape, vocab)
    config.dtype = "float16"
    model = LlamaForCausalLM(config)
    weights = gpu_llama_weights(shape, seed)
    model.load_state_dict({name: torch.from_numpy(array) for name, array in weights.items()}, strict=True)
    model = model.to(torch.float16)
    model.generation_config = GenerationConfig(
        bos_token_id=vocab.bos_id, eos_token_id=[vocab.eos_id, vocab.im_end_id], pad_token_id=vocab.eos_id,
    )
    model.save_pretrained(str(folder))
    return folder


def calibration_rows(rows: int, min_chars: int) -> list[str]:
    """Calibration text made locally: the kit's corpus cut into `rows` rows of `min_chars`+
    characters (repeated as needed), for quantisers that need calibration data."""
    from tests.kit.tokenizer import CORPUS_PATH

    text = " ".join(CORPUS_PATH.read_text(encoding="utf-8").split())
    while len(text) < rows * min_chars:
        text = f"{text} {text}"
    return [text[i * min_chars : (i + 1) * min_chars] for i in range(rows)]
