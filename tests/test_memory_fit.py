"""Memory estimates: the formulas, and the calibration against real loads of the kit's models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modules.hub import memory_fit
from modules.hub.memory_fit import FreeMemory, MemoryEstimate, ModelShape
from tests.kit import TinyKit

MIB = 2**20
ROOT = Path(__file__).resolve().parents[1]

# Import the backend first, then measure RSS around the load alone (what the app sees when
# a user presses Load with the backend already imported by an earlier load or the UI).
_MEASURE = """
import gc, json, sys, psutil
kind, path = sys.argv[1], sys.argv[2]
proc = psutil.Process()
if kind == "gguf":
    import llama_cpp
    gc.collect(); before = proc.memory_info().rss
    model = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=1, verbose=False)
else:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gc.collect(); before = proc.memory_info().rss
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
gc.collect()
print(json.dumps(proc.memory_info().rss - before))
"""


def _measured_rss_increase(kind: str, path: Path) -> int:
    out = subprocess.run([sys.executable, "-c", _MEASURE, kind, str(path)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def test_gguf_estimate_within_15_percent_of_measured_rss(tiny_kit: TinyKit) -> None:
    pytest.importorskip("llama_cpp")
    estimate = memory_fit.estimate_gguf_file(tiny_kit.gguf_f32, n_ctx=2048)
    measured = _measured_rss_increase("gguf", tiny_kit.gguf_f32)
    assert abs(estimate.total - measured) <= 0.15 * measured, (estimate.describe(), measured / MIB)


def test_hf_estimate_within_15_percent_of_measured_rss(tiny_kit: TinyKit) -> None:
    pytest.importorskip("transformers")
    estimate = memory_fit.estimate_hf_folder(tiny_kit.hf_dir, n_ctx=2048, dtype="float32")
    measured = _measured_rss_increase("hf", tiny_kit.hf_dir)
    assert abs(estimate.total - measured) <= 0.15 * measured, (estimate.describe(), measured / MIB)


def test_gguf_shape_and_kv_cache_from_the_kit_header(tiny_kit: TinyKit) -> None:
    est = memory_fit.estimate_gguf_file(tiny_kit.gguf_q8_0, n_ctx=4096, cache_type="q8_0")
    assert est.weights == tiny_kit.gguf_q8_0.stat().st_size and est.layers == 2
    assert est.kv_cache == int(2 * 2 * 4096 * 2 * 16 * 34 / 32)
    assert memory_fit.estimate_model(tiny_kit.gguf_f32).n_ctx == 2048  # 0: the trained context


def test_hf_config_shape_and_parameter_count(tiny_kit: TinyKit) -> None:
    config = json.loads((tiny_kit.hf_dir / "config.json").read_text())
    shape = memory_fit.shape_from_config(config)
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.vocab) == (2, 2, 16, config["vocab_size"])
    params = memory_fit.config_parameter_count(config)
    assert params * 4 == pytest.approx((tiny_kit.hf_dir / "model.safetensors").stat().st_size, rel=0.01)
    half = memory_fit.estimate_hf_folder(tiny_kit.hf_dir, dtype="bfloat16")
    assert half.weights == pytest.approx(params * 2, rel=0.01)
    assert memory_fit.bytes_per_parameter({"quantization_config": {"bits": 4}}) == pytest.approx(0.53)


def test_kv_cache_formula_for_a_llama_3_8b_shape() -> None:
    shape = ModelShape(layers=32, kv_heads=8, head_dim=128, vocab=128256)
    assert memory_fit.kv_cache_bytes(shape, 8192, "f16") == 1024 * MIB  # the well-known 1 GiB at 8k
    assert memory_fit.kv_cache_bytes(ModelShape(), 8192) == 0
    with pytest.raises(ValueError, match="cache_type"):
        memory_fit.kv_cache_bytes(shape, 8192, "q5_9")


def test_each_parallel_slot_has_its_own_kv_cache(tiny_kit: TinyKit) -> None:
    shape = ModelShape(layers=32, kv_heads=8, head_dim=128, vocab=128256)
    one = memory_fit.estimate_gguf(4 * 2**30, shape, 8192, "f16")
    four = memory_fit.estimate_gguf(4 * 2**30, shape, 8192, "f16", slots=4)
    assert four.kv_cache == 4 * one.kv_cache == 4096 * MIB and four.weights == one.weights
    assert "for 4 slots" in four.describe() and "slots" not in one.describe()
    kit = memory_fit.estimate_model(tiny_kit.gguf_f32, n_ctx=512, slots=3)
    assert kit is not None and kit.kv_cache == 3 * memory_fit.estimate_model(tiny_kit.gguf_f32, n_ctx=512).kv_cache


def test_gpu_layers_and_swap_warning() -> None:
    est = MemoryEstimate(weights=8 * 2**30, kv_cache=2**30, overhead=2**28, n_ctx=8192, layers=32)
    assert memory_fit.suggest_gpu_layers(est, 0) == 0
    assert memory_fit.suggest_gpu_layers(est, 24 * 2**30) == -1
    partial = memory_fit.suggest_gpu_layers(est, 6 * 2**30)
    assert 10 < partial < 32
    assert memory_fit.swap_warning(est, FreeMemory(ram=64 * 2**30)) is None
    warning = memory_fit.swap_warning(est, FreeMemory(ram=4 * 2**30, vram=2 * 2**30))
    assert warning and "swap" in warning and "RAM + VRAM" in warning


def test_truncated_gguf_prefix_keeps_what_was_read(tiny_kit: TinyKit) -> None:
    data = tiny_kit.gguf_f32.read_bytes()
    full = memory_fit.parse_gguf_prefix(data[: 2 * MIB])
    assert full["llama.block_count"] == 2 and full["_vocab_count"] > 0
    cut = memory_fit.parse_gguf_prefix(data[:300])
    assert set(cut) < set(full) and memory_fit.parse_gguf_prefix(b"not a gguf") == {}
