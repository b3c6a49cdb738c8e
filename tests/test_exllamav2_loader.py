"""The ExLlamaV2 loader.

Everywhere: loader inference for EXL2 and GPTQ folders, the options mapped onto
ExLlamaV2Config and checked against each other, gpu_split parsing, the samplers mapped
onto ExLlamaV2Sampler.Settings, the "needs CUDA" refusal (unavailable_reason, the Model tab,
ModelManager.load), and our token loop (prefix reuse, cancellation, context end, bias,
logprobs) over a scripted stand-in for exllamav2's model and sampler.

Where CUDA and exllamav2 are present (`-m gpu`): a ~0.1B random Llama (tests/kit/gpu_model.py)
converted to EXL2 with exllamav2's own converter, loaded with our loader and compared with
Transformers fp16 on the same weights; tokens/s and VRAM are printed for docs/GPU.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from loaders import exllamav2 as exl_module
from loaders import get_loader, infer_loader
from loaders.base import ModelInfo, Step, within_vocabulary
from loaders.exllamav2 import (
    CACHE_CLASSES,
    NEEDS_CUDA,
    ExLlamaV2Loader,
    ExLlamaV2Options,
    FolderFacts,
    attention_backend,
    cuda_compiler_reason,
    cuda_device_present,
    parse_gpu_split,
    plan_load,
    read_folder_facts,
)
from loaders.exllamav2_sampler import breaker_token_ids, sampler_settings, token_bias
from modules.core.errors import (
    BackendMissingError,
    ContextLengthExceededError,
    InvalidRequestError,
    ModelLoadError,
    UnsupportedOptionError,
)
from modules.core.sampling import SAMPLER_NAMES, SamplingParams
from modules.core.settings import Settings, build_parser
from modules.engine.model_manager import ModelManager

#: Attributes of ExLlamaV2Config in exllamav2 0.3.2 (config.py) that plan_load may set.
EXL2_CONFIG_FIELDS = frozenset({
    "max_seq_len", "max_batch_size", "max_input_len", "max_attention_size", "max_output_len",
    "scale_pos_emb", "scale_alpha_value", "no_flash_attn", "no_xformers", "no_sdpa", "load_in_q4",
    "no_graphs", "max_dq_size", "num_experts_per_token",
})
#: Fields of ExLlamaV2Sampler.Settings in exllamav2 0.3.2 (generator/sampler.py).
EXL2_SAMPLER_FIELDS = frozenset({
    "token_repetition_penalty", "token_repetition_range", "token_repetition_decay", "token_frequency_penalty",
    "token_presence_penalty", "temperature", "smoothing_factor", "min_temp", "max_temp", "temp_exponent",
    "top_k", "top_p", "top_a", "min_p", "tfs", "typical", "skew", "temperature_last", "mirostat",
    "mirostat_tau", "mirostat_eta", "mirostat_mu", "token_bias", "cfg_scale", "post_sampling_hooks",
    "dry_allowed_length", "dry_base", "dry_multiplier", "dry_sequence_breakers", "dry_range", "dry_max_ngram",
    "ngram_trie", "ngram_index", "ngram_history", "xtc_probability", "xtc_threshold", "xtc_ignore_tokens",
})
EXL2_QUANT = {"quant_method": "exl2", "version": "0.3.2", "bits": 4.0, "head_bits": 6,
              "calibration": {"rows": 100, "length": 2048, "dataset": "(default)"}}
GPTQ_QUANT = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}


def model_folder(root: Path, name: str = "model", quant: dict[str, Any] | None = None,
                 **config: Any) -> Path:
    """A folder with the files exllamav2 looks for (the weights are placeholders)."""
    path = root / name
    path.mkdir(parents=True)
    body = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 4096,
            "eos_token_id": 2, **config}
    if quant is not None:
        body["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(body))
    (path / "output.safetensors").write_bytes(b"x")
    (path / "tokenizer.json").write_text("{}")
    return path


def facts(context: int = 4096, experts: int | None = None) -> FolderFacts:
    return FolderFacts("LlamaForCausalLM", "exl2", "EXL2 4.0 bpw", context, experts)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine, whatever it has: no NVIDIA GPU visible."""
    monkeypatch.setattr(exl_module, "cuda_device_present", lambda root=Path("/"): False)


# --- registration, settings -------------------------------------------------------------------
def test_registered_with_options_and_capabilities() -> None:
    assert get_loader("exllamav2") is ExLlamaV2Loader
    assert ExLlamaV2Loader.options_class is ExLlamaV2Options
    caps = ExLlamaV2Loader.capabilities
    assert caps.samplers == frozenset(SAMPLER_NAMES) and caps.logprobs and caps.grammar
    assert caps.devices == ("cuda",)


def test_every_option_is_a_settings_flag_in_the_exllamav2_group_with_the_same_default() -> None:
    """The Model tab builds one input per option from the Settings field of that name, and
    ModelManager fills options from Settings by name: a shared name must mean the same."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    defaults = Settings()
    for option in dataclasses.fields(ExLlamaV2Options):
        assert option.name in fields, option.name
        assert fields[option.name].metadata["group"] == "ExLlamaV2", option.name
        assert getattr(defaults, option.name) == option.default, option.name
    assert "cache_type" not in {f.name for f in dataclasses.fields(ExLlamaV2Options)}  # llama.cpp's, other values
    assert set(fields["exl2_cache"].metadata["choices"]) == set(CACHE_CLASSES)


def test_flags_parse(tmp_path: Path) -> None:
    args = vars(build_parser().parse_args(
        ["--gpu-split", "20,7.5", "--exl2-cache", "q4", "--alpha-value", "2.5", "--max-seq-len", "16384",
         "--no-flash-attn", "--autosplit"]))
    settings = Settings(**args)
    assert (settings.gpu_split, settings.exl2_cache, settings.alpha_value) == ("20,7.5", "q4", 2.5)
    assert settings.max_seq_len == 16384 and settings.no_flash_attn and settings.autosplit
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--exl2-cache", "q8_0"])


# --- inference -------------------------------------------------------------------------------
def test_exl2_folder_goes_to_exllamav2(tmp_path: Path) -> None:
    choice = infer_loader(model_folder(tmp_path, quant=EXL2_QUANT))
    assert choice.loader == "exllamav2" and "exl2" in choice.reason


def test_gptq_folder_goes_to_gptq_without_cuda_and_to_exllamav2_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    model_folder(models, "m-GPTQ", quant=GPTQ_QUANT)
    manager = ModelManager(Settings(models_dir=str(models)), models)
    monkeypatch.setattr(exl_module, "cuda_device_present", lambda root=Path("/"): False)
    assert manager.infer("m-GPTQ").loader == "gptq"
    # A GPU machine with exllamav2 and a prebuilt (or buildable) extension.
    monkeypatch.setattr(exl_module, "cuda_device_present", lambda root=Path("/"): True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(exl_module.importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("torch", "exllamav2", "exllamav2_ext")
                        else real_find_spec(name, *a))
    assert ExLlamaV2Loader.unavailable_reason() is None
    choice = manager.infer("m-GPTQ")
    assert choice.loader == "exllamav2" and "gptq" in choice.reason


# --- unavailable without CUDA ----------------------------------------------------------------
def test_cuda_presence_is_read_from_device_files(tmp_path: Path) -> None:
    assert not cuda_device_present(tmp_path)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidiactl").write_text("")  # the control node alone is not a GPU
    assert not cuda_device_present(tmp_path)
    (tmp_path / "dev" / "nvidia0").write_text("")
    assert cuda_device_present(tmp_path)
    other = tmp_path / "other"
    (other / "proc" / "driver" / "nvidia" / "gpus" / "0000:01:00.0").mkdir(parents=True)
    assert cuda_device_present(other)


def test_unavailable_without_cuda_says_it_needs_an_nvidia_gpu(no_cuda: None) -> None:
    reason = ExLlamaV2Loader.unavailable_reason()
    assert reason == NEEDS_CUDA and "NVIDIA GPU with CUDA" in reason and "llama.cpp" in reason


def test_with_cuda_but_no_exllamav2_it_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exl_module, "cuda_device_present", lambda root=Path("/"): True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(exl_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "exllamav2" else real_find_spec(name, *a))
    reason = ExLlamaV2Loader.unavailable_reason()
    assert reason is not None and "'exllamav2'" not in reason and "exllamav2" in reason
    assert "pip install -r requirements-cuda.txt" in reason


def test_without_nvcc_or_a_prebuilt_extension_it_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exl_module.shutil, "which", lambda name: None)
    assert "CUDA toolkit" in (cuda_compiler_reason(homes=[str(tmp_path)]) or "")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    assert cuda_compiler_reason(homes=[str(tmp_path)]) is None


def test_app_start_never_imports_torch_or_exllamav2_to_decide() -> None:
    code = ("import sys\nfrom loaders.exllamav2 import ExLlamaV2Loader\nExLlamaV2Loader.unavailable_reason()\n"
            "print([m for m in ('torch', 'exllamav2', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"


def test_model_manager_lists_it_unavailable_and_refuses_to_load(tmp_path: Path, no_cuda: None) -> None:
    models = tmp_path / "models"
    model_folder(models, "m-exl2", quant=EXL2_QUANT)
    model_folder(models, "m-GPTQ", quant=GPTQ_QUANT)
    manager = ModelManager(Settings(models_dir=str(models)), models)
    status = {s.name: s for s in manager.loader_statuses()}["exllamav2"]
    assert not status.available and status.reason == NEEDS_CUDA
    assert set(status.option_names) == {f.name for f in dataclasses.fields(ExLlamaV2Options)}
    with pytest.raises(BackendMissingError, match="NVIDIA GPU with CUDA"):
        manager.load("m-exl2")
    with pytest.raises(BackendMissingError, match="NVIDIA GPU with CUDA"):
        manager.load("m-GPTQ", loader="exllamav2")
    assert manager.current is None
    with pytest.raises(BackendMissingError, match="NVIDIA GPU with CUDA"):
        ExLlamaV2Loader.load(models / "m-exl2", ExLlamaV2Options())


def test_model_tab_shows_the_reason(app: Any, no_cuda: None) -> None:
    import gradio as gr

    from modules.ui import model_tab

    with gr.Blocks() as demo:
        model_tab.create_ui(app)
    texts = [str(getattr(b, "value", "")) for b in demo.blocks.values()]
    assert any(t == f"**Unavailable:** {NEEDS_CUDA}" for t in texts)


# --- the folder -------------------------------------------------------------------------------
def test_folder_facts_describe_exl2_and_gptq(tmp_path: Path) -> None:
    exl2 = read_folder_facts(model_folder(tmp_path, "a", quant=EXL2_QUANT))
    assert (exl2.quant_method, exl2.quantization, exl2.context_length) == ("exl2", "EXL2 4.0 bpw (head 6 bits)", 4096)
    gptq = read_folder_facts(model_folder(tmp_path, "b", quant=GPTQ_QUANT, max_position_embeddings=None,
                                          text_config={"max_position_embeddings": 32768}, num_local_experts=8))
    assert gptq.quantization == "GPTQ 4-bit, group 128, act-order" and gptq.context_length == 32768
    assert gptq.num_experts == 8
    plain = read_folder_facts(model_folder(tmp_path, "c", max_position_embeddings=None))
    assert plain.quant_method is None and plain.context_length == 2048  # exllamav2's own fallback


@pytest.mark.parametrize(("quant", "match"), [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "8-bit GPTQ.*gptq loader"),
    ({"quant_method": "awq", "bits": 4}, "awq quant"),
])
def test_quants_it_cannot_run_are_refused_with_the_way_out(tmp_path: Path, quant: dict, match: str) -> None:
    with pytest.raises(UnsupportedOptionError, match=match):
        read_folder_facts(model_folder(tmp_path, quant=quant))


def test_folders_missing_what_exllamav2_needs(tmp_path: Path) -> None:
    path = model_folder(tmp_path, "a", quant=EXL2_QUANT)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        read_folder_facts(path)
    path = model_folder(tmp_path, "b", quant=EXL2_QUANT)
    (path / "output.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        read_folder_facts(path)
    with pytest.raises(ModelLoadError, match="architecture"):
        read_folder_facts(model_folder(tmp_path, "c", architectures=["A", "B"]))
    (tmp_path / "d").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        read_folder_facts(tmp_path / "d")


# --- options -> ExLlamaV2Config and the load mode ---------------------------------------------
def test_defaults_load_on_the_first_gpu_with_an_fp16_cache_and_the_models_context() -> None:
    plan = plan_load(ExLlamaV2Options(), facts(context=4096))
    assert (plan.mode, plan.gpu_split, plan.cache_class) == ("single", None, "ExLlamaV2Cache")
    assert plan.config == {"max_seq_len": 4096, "max_input_len": 2048, "max_attention_size": 2048 ** 2,
                           "scale_alpha_value": 1.0, "no_flash_attn": False, "no_xformers": False,
                           "no_sdpa": False}
    assert set(plan.config) <= EXL2_CONFIG_FIELDS
    assert plan_load(ExLlamaV2Options(), facts(context=131072)).config["max_seq_len"] == 8192  # capped


def test_every_option_reaches_its_config_field() -> None:
    options = ExLlamaV2Options(gpu_split="20, 7.5", max_seq_len=1024, exl2_cache="q6", alpha_value=2.5,
                               compress_pos_emb=2.0, no_flash_attn=True, no_xformers=True, no_sdpa=True,
                               num_experts_per_token=3)
    plan = plan_load(options, facts(experts=8))
    assert (plan.mode, plan.gpu_split, plan.cache_class) == ("split", [20.0, 7.5], "ExLlamaV2Cache_Q6")
    assert plan.config == {"max_seq_len": 1024, "max_input_len": 1024, "max_attention_size": 1024 ** 2,
                           "scale_alpha_value": 2.5, "scale_pos_emb": 2.0, "no_flash_attn": True,
                           "no_xformers": True, "no_sdpa": True, "num_experts_per_token": 3}
    assert set(plan.config) <= EXL2_CONFIG_FIELDS
    assert plan_load(ExLlamaV2Options(autosplit=True), facts()).mode == "autosplit"
    assert plan_load(ExLlamaV2Options(enable_tp=True, gpu_split="40,40"), facts()).mode == "tp"


@pytest.mark.parametrize(("name", "cls"), [("fp16", "ExLlamaV2Cache"), ("fp8", "ExLlamaV2Cache_8bit"),
                                           ("q8", "ExLlamaV2Cache_Q8"), ("q6", "ExLlamaV2Cache_Q6"),
                                           ("q4", "ExLlamaV2Cache_Q4")])
def test_cache_types(name: str, cls: str) -> None:
    assert plan_load(ExLlamaV2Options(exl2_cache=name), facts()).cache_class == cls


@pytest.mark.parametrize(("options", "error", "match"), [
    (ExLlamaV2Options(autosplit=True, gpu_split="20"), UnsupportedOptionError, "autosplit and gpu_split"),
    (ExLlamaV2Options(autosplit=True, enable_tp=True), UnsupportedOptionError, "enable_tp and autosplit"),
    (ExLlamaV2Options(exl2_cache="q8_0"), ModelLoadError, "exl2_cache must be one of fp16, fp8, q8, q6, q4"),
    (ExLlamaV2Options(max_seq_len=-1), ModelLoadError, "max_seq_len"),
    (ExLlamaV2Options(alpha_value=0.0), ModelLoadError, "alpha_value must be a positive"),
    (ExLlamaV2Options(compress_pos_emb=math.nan), ModelLoadError, "compress_pos_emb"),
    (ExLlamaV2Options(num_experts_per_token=2), UnsupportedOptionError, "mixture-of-experts"),
])
def test_options_that_cannot_work_are_refused(options: ExLlamaV2Options, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        plan_load(options, facts())


def test_more_experts_than_the_model_has() -> None:
    with pytest.raises(UnsupportedOptionError, match="has 8 experts"):
        plan_load(ExLlamaV2Options(num_experts_per_token=9), facts(experts=8))


@pytest.mark.parametrize(("text", "expected"), [("", None), ("  ", None), ("24", [24.0]),
                                                ("20,7.5", [20.0, 7.5]), (" 10 , 10 ,5 ", [10.0, 10.0, 5.0])])
def test_gpu_split_parses(text: str, expected: list[float] | None) -> None:
    assert parse_gpu_split(text) == expected


@pytest.mark.parametrize(("text", "match"), [("20,,7", "'' is not a number"), ("20GB", "'20GB' is not a number"),
                                             ("a,b", "'a' is not a number"), ("0", "positive"),
                                             ("8,-1", "positive"), ("inf", "positive"), ("nan", "positive")])
def test_gpu_split_errors_name_the_bad_part(text: str, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        parse_gpu_split(text)


def test_attention_backend_follows_exllamav2s_preference() -> None:
    every = {"flash-attn": True, "xformers": True, "sdpa": True}
    assert attention_backend(every, {}) == "flash-attn"
    assert attention_backend(every, {"flash-attn": True}) == "xformers"
    assert attention_backend({"sdpa": True}, {}) == "sdpa"
    assert attention_backend({"sdpa": True}, {"sdpa": True}) == "matmul"


# --- samplers -> ExLlamaV2Sampler.Settings ------------------------------------------------------
def plan_of(**changes: Any) -> dict[str, Any]:
    plan = sampler_settings(SamplingParams(**changes), eos_token_ids=(2,), vocab_size=100)
    assert set(plan.settings) <= EXL2_SAMPLER_FIELDS
    return plan.settings


def test_neutral_params_turn_every_exllamav2_sampler_off() -> None:
    s = plan_of()
    assert s["temperature"] == 1.0 and s["top_k"] == 0 and s["top_p"] == 1.0 and s["min_p"] == 0.0
    assert s["typical"] == 0.0 and s["tfs"] == 0.0 and s["top_a"] == 0.0  # exllamav2's "off" values
    assert s["token_repetition_penalty"] == 1.0 and s["token_frequency_penalty"] == 0.0
    assert s["token_presence_penalty"] == 0.0 and not s["mirostat"]
    assert s["xtc_probability"] == 0.0 and s["dry_multiplier"] == 0.0
    assert s["smoothing_factor"] == 0.0 and s["skew"] == 0.0 and s["max_temp"] == 0.0


def test_truncation_penalties_and_temperature_map_field_by_field() -> None:
    s = plan_of(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, typical_p=0.95, repetition_penalty=1.15,
                repetition_penalty_range=256, presence_penalty=0.3, frequency_penalty=0.2, temperature_last=True,
                xtc_probability=0.5, xtc_threshold=0.2)
    assert (s["temperature"], s["top_k"], s["top_p"], s["min_p"], s["typical"]) == (0.7, 40, 0.9, 0.05, 0.95)
    assert (s["token_repetition_penalty"], s["token_repetition_range"]) == (1.15, 256)
    assert (s["token_presence_penalty"], s["token_frequency_penalty"]) == (0.3, 0.2)
    assert s["temperature_last"] and (s["xtc_probability"], s["xtc_threshold"]) == (0.5, 0.2)
    assert plan_of(repetition_penalty=1.1, repetition_penalty_range=0)["token_repetition_range"] == -1


def test_greedy_keeps_the_penalties_and_drops_the_rest() -> None:
    s = plan_of(temperature=0, top_k=40, top_p=0.5, xtc_probability=1.0, mirostat_mode=2, repetition_penalty=1.3,
                dry_multiplier=0.8)
    assert (s["top_k"], s["temperature"], s["top_p"], s["xtc_probability"]) == (1, 1.0, 1.0, 0.0)
    assert not s["mirostat"] and s["token_repetition_penalty"] == 1.3 and s["dry_multiplier"] == 0.8


def test_mirostat_2_replaces_truncation_and_mirostat_1_is_refused() -> None:
    s = plan_of(mirostat_mode=2, mirostat_tau=4.0, mirostat_eta=0.2, top_k=40, min_p=0.1, xtc_probability=0.5,
                temperature=0.8)
    assert s["mirostat"] and (s["mirostat_tau"], s["mirostat_eta"]) == (4.0, 0.2)
    assert (s["top_k"], s["min_p"], s["xtc_probability"], s["temperature"]) == (0, 0.0, 0.0, 0.8)
    with pytest.raises(InvalidRequestError, match="Mirostat 2.0 only") as info:
        plan_of(mirostat_mode=1)
    assert info.value.param == "mirostat_mode"


def test_dry_maps_and_keeps_exllamav2s_range_assert_true() -> None:
    s = plan_of(dry_multiplier=0.8, dry_base=1.5, dry_allowed_length=3)
    assert (s["dry_multiplier"], s["dry_base"], s["dry_allowed_length"], s["dry_range"], s["dry_max_ngram"]) == \
        (0.8, 1.5, 3, 0, 20)
    for last_n in (1, 2, 10, 21, 500):
        s = plan_of(dry_multiplier=0.8, dry_penalty_last_n=last_n)
        assert s["dry_range"] > s["dry_max_ngram"] >= 1  # sampler.py asserts dry_range > dry_max_ngram
    assert plan_of(dry_multiplier=0.8, dry_penalty_last_n=500)["dry_max_ngram"] == 20
    plan = sampler_settings(SamplingParams(dry_multiplier=0.8, dry_sequence_breakers=[]), (2,), 100)
    assert plan.dry_breakers == ()  # empty stays empty (None would mean exllamav2's defaults)


def test_top_n_sigma_is_ours_and_only_when_sampling() -> None:
    assert sampler_settings(SamplingParams(top_n_sigma=1.5), (2,), 100).top_n_sigma == 1.5
    assert sampler_settings(SamplingParams(top_n_sigma=1.5, temperature=0), (2,), 100).top_n_sigma == 0
    assert sampler_settings(SamplingParams(top_n_sigma=1.5, mirostat_mode=2), (2,), 100).top_n_sigma == 0


def test_token_bias_bans_and_ban_eos() -> None:
    bias = token_bias(SamplingParams(logit_bias={"5": 2.0, "7": 1.0}, custom_token_bans=[7, 9], ban_eos_token=True),
                      eos_token_ids=(2, 3), vocab_size=100)
    assert bias == {5: 2.0, 7: -math.inf, 9: -math.inf, 2: -math.inf, 3: -math.inf}
    # Ids outside the vocabulary never reach the sampler (the engine drops them, loaders.base.within_vocabulary).
    request = SamplingParams(logit_bias={"5": 2.0, "300": 1.0}, custom_token_bans=[100, 7])
    assert token_bias(within_vocabulary(request, 100), (2,), 100) == {5: 2.0, 7: -math.inf}
    with pytest.raises(InvalidRequestError, match="every token is banned"):
        token_bias(SamplingParams(custom_token_bans=list(range(4))), (2,), 4)


def test_breaker_token_ids() -> None:
    texts = ["a", "\n", "b:", "c\n\n", "", "d"]
    assert breaker_token_ids(["\n", ":"], texts) == {1, 2, 3}
    assert breaker_token_ids(["\n\n"], texts) == {3}
    assert breaker_token_ids(["", ], texts) == set() and breaker_token_ids([], texts) == set()


# --- our token loop, over a scripted stand-in for exllamav2 ---------------------------------------
VOCAB = 64  # the head is padded to 64 here (exllamav2 pads to a multiple of 32)


class FakeCache:
    def __init__(self, max_seq_len: int) -> None:
        self.current_seq_len = 0
        self.max_seq_len = max_seq_len


class FakeModel:
    """exllamav2's model.forward contract: advances the cache by the ids it is given; the
    logits make token (last + 1) % 50 the most likely one."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], bool]] = []
        self.unloaded = False

    def forward(self, ids: Any, cache: FakeCache, preprocess_only: bool = False,
                abort_event: threading.Event | None = None) -> Any:
        import torch

        assert cache.current_seq_len + ids.shape[1] <= cache.max_seq_len
        self.calls.append((ids[0].tolist(), preprocess_only))
        if abort_event is not None and abort_event.is_set():
            return None
        cache.current_seq_len += ids.shape[1]
        if preprocess_only:
            return None
        logits = torch.zeros((1, ids.shape[1], VOCAB), dtype=torch.float16)
        logits[0, :, (ids[0, -1].item() + 1) % 50] = 5.0
        return logits

    def unload(self) -> None:
        self.unloaded = True


class FakeSettings:
    """ExLlamaV2Sampler.Settings' contract: keyword fields only, the ones 0.3.2 has."""

    def __init__(self, **fields: Any) -> None:
        unknown = set(fields) - EXL2_SAMPLER_FIELDS
        assert not unknown, unknown
        self.fields = fields
        self.token_bias: Any = None
        self.dry_multiplier = fields["dry_multiplier"]
        self.dry_sequence_breakers: Any = None


class FakeSampler:
    """ExLlamaV2Sampler's contract: sample() adds token_bias, then (here) takes the argmax."""

    Settings = FakeSettings
    seen: list[list[int]] = []

    @classmethod
    def sample(cls, logits: Any, settings: Any, sequence: Any, random: float, tokenizer: Any) -> tuple:
        import torch

        assert logits.dtype == torch.float32 and logits.shape == (1, 1, VOCAB) and 0 <= random < 1
        cls.seen.append(sequence[0].tolist())
        if settings.token_bias is not None:
            assert settings.token_bias.shape == (VOCAB,)
            logits += settings.token_bias
        return torch.tensor([[int(logits[0, 0, : tokenizer.get_vocab_size()].argmax())]]), None, None, None, False


class FakeTokenizer:
    def get_vocab_size(self) -> int:
        return 50


def fake_loaded(context: int = 32, tokenizer: Any = None) -> tuple[ExLlamaV2Loader, FakeModel]:
    import torch

    model = FakeModel()
    FakeSampler.seen = []
    info = ModelInfo(name="fake", path=Path("fake"), loader="exllamav2", context_length=context, vocab_size=VOCAB,
                     bos_token_id=1, eos_token_ids=(2,))
    parts = {"model": model, "cache": FakeCache(context), "exl_tokenizer": FakeTokenizer(),
             "tokenizer": tokenizer if tokenizer is not None else SimpleNamespace()}
    loader = ExLlamaV2Loader({"torch": torch, "exllamav2": None, "sampler": FakeSampler}, parts, info)
    return loader, model


def take_steps(gen: Any, n: int) -> list[Step]:
    steps = [s for _, s in zip(range(n), gen, strict=False)]
    assert all(isinstance(s, Step) for s in steps)
    return steps


def take(gen: Any, n: int) -> list[int]:
    return [s.token for s in take_steps(gen, n)]


def test_loop_prefills_then_steps_and_reuses_the_cached_prefix() -> None:
    loader, model = fake_loaded()
    greedy = SamplingParams(temperature=0)
    assert take(loader.generate([1, 10, 11, 12], greedy, threading.Event()), 3) == [13, 14, 15]
    assert model.calls == [([1, 10, 11], True), ([12], False), ([13], False), ([14], False)]
    assert FakeSampler.seen[-1] == [1, 10, 11, 12, 13, 14]  # the whole history reaches the penalties
    model.calls.clear()
    # A follow-up sharing [1, 10, 11, 12, 13]: only the new tokens are evaluated.
    assert take(loader.generate([1, 10, 11, 12, 13, 20, 21], greedy, threading.Event()), 1) == [22]
    assert model.calls == [([20], True), ([21], False)]
    model.calls.clear()
    take(loader.generate([1, 30], greedy, threading.Event()), 1)  # diverges after the BOS
    assert model.calls == [([30], False)]


def test_loop_stops_on_the_event_and_at_the_context_end() -> None:
    loader, model = fake_loaded(context=8)
    stop = threading.Event()
    gen = loader.generate([1, 10], SamplingParams(temperature=0), stop)
    assert next(gen) == Step(11)
    stop.set()
    assert list(gen) == []
    assert len(list(loader.generate([1, 10, 11], SamplingParams(temperature=0), threading.Event()))) == 5
    assert list(loader.generate(list(range(1, 9)), SamplingParams(temperature=0), threading.Event())) == []
    with pytest.raises(ContextLengthExceededError):
        list(loader.generate(list(range(1, 10)), SamplingParams(), threading.Event()))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        list(loader.generate([1, 50], SamplingParams(), threading.Event()))  # 50: padding of the head


def test_a_cancelled_prefill_leaves_a_consistent_cache() -> None:
    loader, model = fake_loaded()
    stop = threading.Event()
    stop.set()
    assert list(loader.generate([1, 10, 11, 12], SamplingParams(temperature=0), stop)) == []
    model.calls.clear()
    take(loader.generate([1, 10, 11, 12], SamplingParams(temperature=0), threading.Event()), 1)
    assert model.calls[0] == ([1, 10, 11], True)  # nothing was wrongly taken as cached


def test_a_new_generation_ends_a_suspended_one() -> None:
    loader, _ = fake_loaded()
    first = loader.generate([1, 10], SamplingParams(temperature=0), threading.Event())
    assert next(first).token == 11
    second = loader.generate([1, 20], SamplingParams(temperature=0), threading.Event())
    assert next(second).token == 21
    assert list(first) == []


def test_bias_bans_and_logprobs_reach_the_sampler() -> None:
    loader, _ = fake_loaded()
    params = SamplingParams(temperature=0, custom_token_bans=[11], logit_bias={"40": 100.0}, logprobs=3)
    [step] = take_steps(loader.generate([1, 10], params, threading.Event()), 1)
    assert step.token == 40
    assert step.logprobs is not None and len(step.logprobs.top) == 3
    assert step.logprobs.top[0][0] == 11  # the raw distribution, before bias and bans
    # Token 40's own raw logit is 0 among 49 zeros and token 11's 5 (over the 50 real tokens).
    assert step.logprobs.logprob == pytest.approx(-math.log(math.exp(5) + 49), abs=1e-6)
    assert take_steps(loader.generate([1, 10], params.replace(logprobs=0), threading.Event()), 1)[0].logprobs is None
    with pytest.raises(InvalidRequestError, match="Mirostat 2.0 only"):
        list(loader.generate([1, 10], SamplingParams(mirostat_mode=1), threading.Event()))


def test_a_grammar_masks_the_logits_before_exllamav2s_sampler(tiny_kit: Any) -> None:
    """The grammar path on CPU, over the fake model (whose favourite is last + 1) and the kit's
    tokenizer: the grammar's tokens win, then EOS (id 2 here) ends the reply. Untested on a GPU."""
    pytest.importorskip("llguidance")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_kit.hf_dir))
    digits = tokenizer.convert_tokens_to_ids(["0", "1", "2"])
    assert all(4 <= d < 50 for d in digits)  # inside the fake's 50 real tokens
    loader, _ = fake_loaded(tokenizer=tokenizer)
    grammar = "root ::= [0-2] [0-2]"
    steps = list(loader.generate([1, 10], SamplingParams(temperature=0, grammar_string=grammar, logprobs=2),
                                 threading.Event()))
    # The fake wants 11 (masked): the first digit allowed wins, then the fake's own "next" (1), then EOS.
    assert [s.token for s in steps] == [digits[0], digits[1], 2]
    assert all(s.logprobs is not None and s.logprobs.top[0][0] != s.token for s in steps[:1])
    lazy = SamplingParams(temperature=0, grammar_string=grammar, grammar_triggers=["NEVER"])
    assert take(loader.generate([1, 10], lazy, threading.Event()), 3) == [11, 12, 13]  # free: the fake's own
    with pytest.raises(InvalidRequestError, match="end of input") as caught:
        list(loader.generate([1, 10], SamplingParams(grammar_string='root ::= "a'), threading.Event()))
    assert caught.value.param == "grammar_string"


def test_unload_frees_and_later_calls_say_so() -> None:
    loader, model = fake_loaded()
    loader.unload()
    assert model.unloaded
    with pytest.raises(Exception, match="has been unloaded"):
        list(loader.generate([1, 10], SamplingParams(), threading.Event()))


# --- on a GPU: exllamav2's converter, our loader, Transformers fp16 ----------------------------
def _gpu_ready() -> str | None:
    if ExLlamaV2Loader.unavailable_reason() is not None:
        return ExLlamaV2Loader.unavailable_reason()
    import torch

    return None if torch.cuda.is_available() else "torch sees no CUDA device"


gpu = pytest.mark.skipif(_gpu_ready() is not None, reason=f"needs CUDA and exllamav2: {_gpu_ready()}")
N_TOKENS = 64
PROMPTS = ("The old lighthouse keeper climbed the stairs one last time and",
           "Cooking rice is simple, yet people argue", "Q: What is the capital of France?\nA:")
#: Teacher-forced top-1 agreement with Transformers fp16 over PROMPTS x 64 tokens, by bits
#: per weight. On this model (logit spread ~4, median top-2 margin ~0.75) bf16 against fp32
#: agreed on 98% of positions (CPU, measured); 8 bpw weights add an error of about bf16's
#: size, so 0.85 leaves room for near-ties without letting a layout bug (which drops
#: agreement to chance, ~1/2300) pass. 4 bpw moves logits by several tenths: 0.5 is a
#: sanity floor there, not a quality claim.
AGREEMENT = {8.0: 0.85, 4.0: 0.5}


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.kit.gpu_model import build_gpu_model

    return build_gpu_model(tmp_path_factory.mktemp("gpu") / "gpu-llama-fp16")


def convert_exl2(source: Path, work: Path, bits: float) -> Path:
    """exllamav2's own converter with a calibration parquet made here (the only file format
    convert_exl2.py's -c reads: pandas.read_parquet(engine="fastparquet"), columns joined)."""
    import pandas

    from tests.kit.gpu_model import calibration_rows

    work.mkdir(parents=True, exist_ok=True)
    parquet = work / "calibration.parquet"
    pandas.DataFrame({"text": calibration_rows(64, 2000)}).to_parquet(parquet, engine="fastparquet")
    out = work / f"exl2-{bits}"
    cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", str(source), "-o", str(work / "job"),
           "-nr", "-cf", str(out), "-c", str(parquet), "-b", str(bits), "-hb", "8" if bits >= 6 else "6",
           "-r", "16", "-mr", "8", "-l", "512", "-ml", "512"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    print(f"\n[exl2 {bits} bpw] conversion {time.perf_counter() - started:.1f} s, rc {done.returncode}")
    assert done.returncode == 0 and (out / "config.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "exl2"
    return out


def reference_continuations(source: Path, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy 64-token continuations from Transformers fp16 on the GPU: the argmax of the
    raw logits at each step, EOS included (our loader yields EOS like any token)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float16).to("cuda").eval()
    out = []
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            step = model(torch.tensor([ids], device="cuda"), use_cache=True)
            tokens: list[int] = []
            while True:
                tokens.append(int(step.logits[0, -1].argmax()))
                if len(tokens) == N_TOKENS:
                    break
                step = model(torch.tensor([[tokens[-1]]], device="cuda"), past_key_values=step.past_key_values,
                             use_cache=True)
            out.append(tokens)
    seconds = time.perf_counter() - started
    print(f"[transformers fp16] greedy decode {len(prompts) * N_TOKENS / seconds:.0f} tokens/s (with prefill), "
          f"VRAM {torch.cuda.memory_allocated() / 2**20:.0f} MiB")
    del model
    torch.cuda.empty_cache()
    return out


@pytest.fixture(scope="module")
def exl2_models(gpu_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """EXL2 conversions of gpu_model, made on first use and shared by the tests."""
    work = tmp_path_factory.mktemp("exl2")

    class Conversions(dict):
        def __missing__(self, bits: float) -> Path:
            self[bits] = convert_exl2(gpu_model, work / str(bits), bits)
            return self[bits]

    return Conversions()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", sorted(AGREEMENT, reverse=True))
def test_exl2_conversion_loads_generates_and_agrees_with_transformers_fp16(
    gpu_model: Path, exl2_models: dict[float, Path], bits: float
) -> None:
    import torch

    exl2_dir = exl2_models[bits]
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    started = time.perf_counter()
    loaded = ExLlamaV2Loader.load(exl2_dir, ExLlamaV2Options(max_seq_len=2048))
    load_s = time.perf_counter() - started
    vram = torch.cuda.memory_allocated() - base
    try:
        prompts = [loaded.encode(p) for p in PROMPTS]
        assert loaded.info.metadata["quantization"].startswith(f"EXL2 {bits}")
        assert loaded.info.chat_template and loaded.info.eos_token == "</s>" and len(loaded.info.eos_token_ids) == 2
        references = reference_continuations(gpu_model, prompts)
        greedy = SamplingParams(temperature=0, max_new_tokens=N_TOKENS)
        agree = total = 0
        for ids, ref in zip(prompts, references, strict=True):
            # Teacher-forced: our top-1 after each reference prefix (the cache keeps the prefix).
            for t in range(N_TOKENS):
                got = next(iter(loaded.generate(ids + ref[:t], greedy, threading.Event()))).token
                agree += got == ref[t]
                total += 1
        free_run = take(loaded.generate(prompts[0], greedy, threading.Event()), N_TOKENS)
        first_diff = next((i for i, (a, b) in enumerate(zip(free_run, references[0], strict=True)) if a != b),
                          N_TOKENS)
        rate = agree / total
        tps = decode_speed(loaded, prompts[0])
        print(f"[exl2 {bits} bpw] teacher-forced top-1 agreement {rate:.3f} ({agree}/{total}); free-running "
              f"greedy equal for {first_diff}/{N_TOKENS} tokens; decode {tps:.0f} tokens/s; load {load_s:.1f} s; "
              f"VRAM {vram / 2**20:.0f} MiB (peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB); "
              f"attention {loaded.info.metadata['attention']}")
        assert rate >= AGREEMENT[bits], f"agreement {rate:.3f} < {AGREEMENT[bits]}"
    finally:
        loaded.unload()


def decode_speed(loaded: ExLlamaV2Loader, prompt: list[int], n: int = 256) -> float:
    """Tokens per second of a 256-token sampled reply (after a warm-up), EOS banned."""
    params = SamplingParams(temperature=0.8, top_p=0.9, ban_eos_token=True, seed=1, max_new_tokens=n)
    take(loaded.generate(prompt, params, threading.Event()), 8)
    started = time.perf_counter()
    count = len(take(loaded.generate(prompt, params, threading.Event()), n))
    return count / (time.perf_counter() - started)


@pytest.mark.gpu
@gpu
def test_samplers_run_on_the_real_sampler_and_a_seed_repeats(exl2_models: dict[float, Path]) -> None:
    """Every sampler we map, through the real ExLlamaV2Sampler.Settings and sample()."""
    exl2_dir = exl2_models[8.0]
    loaded = ExLlamaV2Loader.load(exl2_dir, ExLlamaV2Options(max_seq_len=1024, exl2_cache="q4"))
    try:
        prompt = loaded.encode(PROMPTS[0])
        for params in (
            SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, typical_p=0.95, seed=3),
            SamplingParams(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5, seed=3),
            SamplingParams(dry_multiplier=0.8, dry_penalty_last_n=64, seed=3),
            SamplingParams(xtc_probability=0.5, xtc_threshold=0.05, seed=3),
            SamplingParams(mirostat_mode=2, seed=3),
            SamplingParams(top_n_sigma=1.0, temperature_last=True, temperature=1.5, seed=3),
            SamplingParams(custom_token_bans=[5, 6], logit_bias={7: 5.0}, ban_eos_token=True, seed=3, logprobs=2),
        ):
            first = take(loaded.generate(prompt, params, threading.Event()), 24)
            again = take(loaded.generate(prompt, params, threading.Event()), 24)
            assert len(first) == 24 and first == again, params
            assert not {5, 6} & set(first) or not params.custom_token_bans
    finally:
        loaded.unload()
