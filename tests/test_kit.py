"""The tiny-model kit: its HF folder and its GGUF files must be the same model.

The llama.cpp checks are what make the kit trustworthy for cross-loader tests: with the
f32 GGUF and an f32 KV cache, llama.cpp must reproduce Transformers' logits and greedy
tokens exactly; a wrong q/k permutation or a misplaced tensor shows up here first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.kit import TinyKit, build_tiny_kit
from tests.kit.bench_model import bench_parameter_count, bench_shape
from tests.kit.decode import hf_greedy, llama_cpp_greedy, open_hf, open_llama_cpp
from tests.kit.gguf_export import permute_qk, quant_supported
from tests.kit.tokenizer import CHAT_TEMPLATE

PROMPT = "The old lighthouse keeper climbed the stairs one last time and"
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Привет! What is 2+2? 🙂"}]
N_TOKENS = 32
# ASCII, whitespace runs, contractions, digits, Cyrillic, CJK, emoji, unseen accents and
# special tokens written in the text (parsed as specials on both sides).
TOKENIZE_CASES = [
    "Hello world",
    "  two  spaces\n\n\tand a tab",
    "don't I'll we've they'RE",
    "3.14159 and 12345 and $9.99",
    "Привет, мир! Как дела?",
    "你好，世界。今天天气很好",
    "emoji 🙂🚀❤️ mix 👍🏽",
    "Unseen wörds ÆØÅ 日本語 ﬁ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "</s> and <s> inside text",
]


@pytest.fixture(scope="module")
def hf(tiny_kit: TinyKit) -> tuple[object, object]:
    return open_hf(tiny_kit.hf_dir)


@pytest.fixture(scope="module")
def llm_f32(tiny_kit: TinyKit) -> object:
    pytest.importorskip("llama_cpp")
    return open_llama_cpp(tiny_kit.gguf_f32, logits_all=True)


def test_hf_folder_files_and_config(tiny_kit: TinyKit) -> None:
    names = {p.name for p in tiny_kit.hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"} <= names
    config = json.loads((tiny_kit.hf_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is False
    generation = json.loads((tiny_kit.hf_dir / "generation_config.json").read_text())
    tokenizer_config = json.loads((tiny_kit.hf_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert (tiny_kit.hf_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tokens = json.loads((tiny_kit.hf_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in tokens}
    assert generation["eos_token_id"] == [ids["</s>"], ids["<|im_end|>"]]
    assert generation["bos_token_id"] == ids["<s>"]


def test_hf_tokenizer_adds_bos_and_renders_chatml(hf: tuple[object, object]) -> None:
    tokenizer, _ = hf
    assert 2000 <= len(tokenizer) <= 4000
    ids = tokenizer("Hello world").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == ("<s><|im_start|>system\nYou are terse.<|im_end|>\n"
                    "<|im_start|>user\nПривет! What is 2+2? 🙂<|im_end|>\n<|im_start|>assistant\n")
    chat_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert chat_ids.count(tokenizer.bos_token_id) == 1
    assert chat_ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2
    for case in TOKENIZE_CASES[:8]:
        assert tokenizer.decode(tokenizer(case).input_ids, skip_special_tokens=True) == case


def test_hf_greedy_output_is_varied(hf: tuple[object, object]) -> None:
    """std 0.1 weights: greedy output must not collapse into one repeated token."""
    tokenizer, model = hf
    generated = hf_greedy(model, tokenizer(PROMPT).input_ids, N_TOKENS)
    assert len(set(generated)) >= 4


def test_build_is_deterministic(tiny_kit: TinyKit, tmp_path: Path) -> None:
    again = build_tiny_kit(tmp_path / "again")
    for a, b in [(tiny_kit.gguf_f32, again.gguf_f32), (tiny_kit.gguf_q8_0, again.gguf_q8_0),
                 (tiny_kit.hf_dir / "model.safetensors", again.hf_dir / "model.safetensors"),
                 (tiny_kit.hf_dir / "tokenizer.json", again.hf_dir / "tokenizer.json")]:
        assert a.read_bytes() == b.read_bytes(), a.name


def test_gguf_metadata_and_tensor_types(tiny_kit: TinyKit) -> None:
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(str(tiny_kit.gguf_q8_0))
    fields = reader.fields

    def scalar(key: str) -> object:
        return fields[key].contents()

    assert scalar("general.architecture") == "llama"
    assert scalar("llama.attention.head_count") == 4 and scalar("llama.attention.head_count_kv") == 2
    assert scalar("llama.rope.dimension_count") == 16 and scalar("llama.context_length") == 2048
    assert (scalar("tokenizer.ggml.model"), scalar("tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    assert scalar("tokenizer.chat_template") == CHAT_TEMPLATE
    tokens = scalar("tokenizer.ggml.tokens")
    assert tokens[scalar("tokenizer.ggml.eot_token_id")] == "<|im_end|>"
    assert tokens[scalar("tokenizer.ggml.bos_token_id")] == "<s>"
    control = [i for i, kind in enumerate(scalar("tokenizer.ggml.token_type")) if kind == 3]  # 3 = CONTROL
    assert [tokens[i] for i in control] == ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert len(types) == 3 + 2 * 9
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert types["blk.1.attn_k.weight"] == GGMLQuantizationType.Q8_0
    assert types["output.weight"] == GGMLQuantizationType.Q8_0


def test_permute_qk_interleaves_rotary_halves() -> None:
    """Per head, HF rows [x0 x1 | y0 y1] (rotated as halves) become GGML's [x0 y0 x1 y1]."""
    rows = np.arange(8, dtype=np.float32).reshape(8, 1)  # 2 heads of head_dim 4
    assert permute_qk(rows, 2, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    # For GQA keys the reshape is by kv heads: 4 query heads over 1 kv head of dim 8.
    keys = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert permute_qk(keys, 4, 1).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_bench_model_is_half_a_billion_parameters() -> None:
    assert 0.45e9 < bench_parameter_count(bench_shape(2263)) < 0.55e9
    assert quant_supported("q8_0") and quant_supported("f16")


def test_llama_cpp_logits_equal_transformers(hf: tuple[object, object], llm_f32: object) -> None:
    import torch

    tokenizer, model = hf
    ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm_f32.reset()
    llm_f32.eval(ids)
    got = np.asarray(llm_f32.scores[: len(ids)])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["prose", "chat"])
def test_llama_cpp_greedy_equals_transformers(hf: tuple[object, object], llm_f32: object, kind: str) -> None:
    tokenizer, model = hf
    if kind == "prose":
        ids = tokenizer(PROMPT).input_ids
    else:
        ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert llama_cpp_greedy(llm_f32, ids, N_TOKENS) == hf_greedy(model, ids, N_TOKENS)


@pytest.mark.parametrize("text", TOKENIZE_CASES)
def test_llama_cpp_tokenizes_like_transformers(hf: tuple[object, object], llm_f32: object, text: str) -> None:
    tokenizer, _ = hf
    ids = tokenizer(text).input_ids
    assert llm_f32.tokenize(text.encode(), add_bos=True, special=True) == ids
    assert llm_f32.detokenize(ids[1:], special=True).decode() == tokenizer.decode(ids[1:])


def test_llama_cpp_reads_tokenizer_metadata(hf: tuple[object, object], llm_f32: object) -> None:
    tokenizer, _ = hf
    assert llm_f32.token_bos() == tokenizer.bos_token_id
    assert llm_f32.token_eos() == tokenizer.eos_token_id
    assert llm_f32.n_vocab() == len(tokenizer) and llm_f32.metadata["llama.context_length"] == "2048"
    assert llm_f32.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_q8_0_loads_and_stays_close_to_f32(tiny_kit: TinyKit, hf: tuple[object, object],
                                           llm_f32: object) -> None:
    """Q8_0 rounding flips near-ties, so compare logits loosely and tokens by agreement only."""
    tokenizer, _ = hf
    ids = tokenizer(PROMPT).input_ids
    q8 = open_llama_cpp(tiny_kit.gguf_q8_0, logits_all=True)
    q8.eval(ids)
    llm_f32.reset()
    llm_f32.eval(ids)
    q8_logits, f32_logits = np.asarray(q8.scores[: len(ids)]), np.asarray(llm_f32.scores[: len(ids)])
    assert np.corrcoef(q8_logits.ravel(), f32_logits.ravel())[0, 1] > 0.99
    generated = llama_cpp_greedy(q8, ids, N_TOKENS)
    assert len(generated) == N_TOKENS and all(0 <= t < len(tokenizer) for t in generated)
    assert len(set(generated)) >= 4
