"""The same weights give the same greedy tokens through llama.cpp and Transformers.

The kit writes one random Llama as an HF folder (fp32 safetensors) and as an f32 GGUF.
With f32 weights and an f32 KV cache (cache_type f32), the two backends' logits agree to
~1e-6, so 32 greedy steps from the same prompt ids must be identical; a q/k permutation,
RoPE or tokenizer mistake in either loader breaks this within a few tokens.
"""

from __future__ import annotations

import itertools
import threading

import pytest

from loaders.llama_cpp import LlamaCppLoader, LlamaCppOptions
from loaders.transformers import TransformersLoader, TransformersOptions
from modules.core.sampling import SamplingParams

pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")

PROMPTS = [
    "The lighthouse keeper",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Привет, как дела? 🙂",
]


@pytest.fixture(scope="module")
def both(tiny_kit):
    # f32 weights, f32 KV cache and no flash attention (its CPU kernel rounds Q to f16):
    # only then is llama.cpp's arithmetic close enough to Transformers fp32 to compare.
    cpp = LlamaCppLoader.load(tiny_kit.gguf_f32, LlamaCppOptions(ctx_size=256, threads=1, threads_batch=1,
                                                                   cache_type="f32", no_flash_attn=True))
    hf = TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions(dtype="float32", cpu=True))
    yield cpp, hf
    cpp.unload()
    hf.unload()


def greedy(model, ids, n=32):
    params = SamplingParams(temperature=0, max_new_tokens=n, ban_eos_token=True)
    return [step.token for step in itertools.islice(model.generate(ids, params, threading.Event()), n)]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_are_identical_across_loaders(both, prompt):
    cpp, hf = both
    ids = cpp.encode(prompt)
    assert ids == hf.encode(prompt)
    got_cpp, got_hf = greedy(cpp, ids), greedy(hf, ids)
    assert len(got_cpp) == 32
    assert got_cpp == got_hf
    assert len(set(got_cpp)) > 3  # a real sequence, not one collapsed token


def test_both_loaders_read_the_same_model_facts(both):
    cpp, hf = both
    assert cpp.info.vocab_size == hf.info.vocab_size
    assert cpp.info.bos_token_id == hf.info.bos_token_id
    assert set(hf.info.eos_token_ids) <= set(cpp.info.eos_token_ids)
    assert cpp.info.chat_template and cpp.info.chat_template == hf.info.chat_template


def test_both_loaders_report_the_same_raw_logprobs(both):
    cpp, hf = both
    ids = cpp.encode("The lighthouse keeper")
    params = SamplingParams(temperature=0, max_new_tokens=4, logprobs=5, ban_eos_token=True)
    seen = []
    for model in (cpp, hf):
        seen.append([(step.token, step.logprobs)
                     for step in itertools.islice(model.generate(ids, params, threading.Event()), 4)])
    for (tok_a, a), (tok_b, b) in zip(*seen, strict=True):
        assert tok_a == tok_b
        assert a.top[0][0] == tok_a  # greedy: the sampled token is the most likely one
        assert abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert all(x[1] >= y[1] for x, y in zip(a.top, a.top[1:], strict=False))
        assert all(lp <= 0 for _, lp in a.top)
