"""Greedy decoding on both backends, for tests that compare them token for token.

Both loops are written out by hand (no `generate()` stopping rules, no samplers beyond
argmax) so a mismatch can only come from the models themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Settings under which llama.cpp on the f32 GGUF reproduces Transformers fp32 exactly:
# one thread (two spin-wait on each other when the other core is busy) and an f32 KV
# cache (type 0 = GGML_TYPE_F32; the default f16 cache flips near-ties now and then).
LLAMA_CPP_EXACT: dict[str, Any] = {
    "n_ctx": 256, "n_threads": 1, "n_threads_batch": 1, "type_k": 0, "type_v": 0, "verbose": False,
}


def open_llama_cpp(path: Path, **overrides: Any) -> Any:
    """A llama_cpp.Llama on `path` with LLAMA_CPP_EXACT settings, `overrides` laid over them."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), **{**LLAMA_CPP_EXACT, **overrides})


def open_hf(folder: Path) -> tuple[Any, Any]:
    """(tokenizer, model) from an HF folder, fp32 and in eval mode, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    return tokenizer, model.eval()


def hf_greedy(model: Any, prompt_ids: list[int], n_tokens: int) -> list[int]:
    """`n_tokens` argmax tokens after `prompt_ids` with Transformers, ignoring EOS."""
    import torch

    generated: list[int] = []
    past = None
    step_input = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n_tokens):
            out = model(step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            step_input = torch.tensor([[token]])
    return generated


def llama_cpp_greedy(llm: Any, prompt_ids: list[int], n_tokens: int) -> list[int]:
    """`n_tokens` tokens from llama.cpp's greedy sampler (temp 0 = argmax), ignoring EOS."""
    generated: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                              reset=True):
        generated.append(int(token))
        if len(generated) == n_tokens:
            break
    return generated
