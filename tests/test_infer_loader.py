"""infer_loader picks the loader from a model's files alone, or says what is missing."""

from __future__ import annotations

import json

import pytest

from loaders import get_loader, infer_loader, loader_names
from modules.core.errors import ModelLoadError, UnknownLoaderError


def folder(tmp_path, *files, config=None):
    path = tmp_path / "model"
    path.mkdir()
    for name in files:
        (path / name).write_bytes(b"x")
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_gguf_file(tmp_path):
    path = tmp_path / "m.Q4_K_M.gguf"
    path.write_bytes(b"GGUF")
    choice = infer_loader(path)
    assert choice.loader == "llama.cpp" and "GGUF" in choice.reason


def test_folder_with_a_gguf(tmp_path):
    assert infer_loader(folder(tmp_path, "m.gguf")).loader == "llama.cpp"


def test_safetensors_folder(tmp_path):
    path = folder(tmp_path, "model.safetensors", "tokenizer.json", config={"model_type": "llama"})
    assert infer_loader(path).loader == "transformers"


def test_exl2_config(tmp_path):
    path = folder(tmp_path, "output.safetensors", config={"quantization_config": {"quant_method": "exl2", "bits": 4.0}})
    choice = infer_loader(path)
    assert choice.loader == "exllamav2" and "exl2" in choice.reason


def test_gptq_config_prefers_exllamav2_only_when_installed(tmp_path):
    path = folder(tmp_path, "model.safetensors", config={"quantization_config": {"quant_method": "gptq", "bits": 4}})
    assert infer_loader(path, installed=lambda name: False).loader == "gptq"
    assert infer_loader(path, installed=lambda name: name == "exllamav2").loader == "exllamav2"


def test_an_8bit_gptq_quant_goes_to_gptqmodel_even_with_exllamav2(tmp_path):
    path = folder(tmp_path, "model.safetensors", config={"quantization_config": {"quant_method": "gptq", "bits": 8}})
    choice = infer_loader(path, installed=lambda name: True)
    assert choice.loader == "gptq" and "8-bit" in choice.reason


def test_pickle_only_folder_needs_an_opt_in(tmp_path):
    choice = infer_loader(folder(tmp_path, "pytorch_model.bin", config={"model_type": "llama"}))
    assert choice.loader == "transformers"
    assert choice.pickled_weights and "--allow-pickle" in choice.reason


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="empty"):
        infer_loader(folder(tmp_path))


def test_folder_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no weights"):
        infer_loader(folder(tmp_path, "README.md", config={}))


def test_unreadable_config_is_a_clear_error(tmp_path):
    path = folder(tmp_path, "model.safetensors")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        infer_loader(path)


def test_non_model_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hi")
    with pytest.raises(ModelLoadError, match="not a model"):
        infer_loader(path)


def test_registry_knows_the_backends_and_lists_names_on_error():
    assert {"llama.cpp", "transformers"} <= set(loader_names())
    with pytest.raises(UnknownLoaderError, match="available loaders"):
        get_loader("nope")
