"""The engine over the real loaders and the kit's models: manager + generator end to end."""

from __future__ import annotations

import shutil

import pytest

from modules.core.errors import ModelLoadError
from modules.core.sampling import SamplingParams
from modules.core.settings import Settings
from modules.engine.app import App

pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")

SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=24, ban_eos_token=True)


@pytest.fixture(scope="module")
def real_app(tiny_kit, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    shutil.copy(tiny_kit.gguf_f32, models / "tiny-f32.gguf")
    shutil.copytree(tiny_kit.hf_dir, models / "tiny-hf")
    (models / "corrupt.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    (models / "not-gguf.gguf").write_bytes(b"<html>404 Not Found</html>")
    app = App.create(Settings(models_dir=str(models), threads=1, threads_batch=1, ctx_size=256, cpu=True), models)
    yield app
    app.close()


@pytest.mark.parametrize("name", ["tiny-f32.gguf", "tiny-hf"])
def test_same_seed_same_text_other_seed_other_text(real_app, name):
    report = real_app.models.load(name)
    assert report.loader == ("llama.cpp" if name.endswith(".gguf") else "transformers")
    run = real_app.generator.generate
    first = run("Once upon a time", SAMPLED.replace(seed=7))
    assert first.completion_tokens == 24
    assert run("Once upon a time", SAMPLED.replace(seed=7)).text == first.text
    others = {run("Once upon a time", SAMPLED.replace(seed=s)).text for s in (8, 9, 10)}
    assert others - {first.text}


def test_load_unload_load_another(real_app):
    real_app.models.load("tiny-f32.gguf")
    gguf_model = real_app.models.current
    real_app.models.unload()
    assert real_app.models.current is None
    real_app.models.load("tiny-hf")
    assert real_app.models.current is not gguf_model
    assert real_app.models.current.info.loader == "transformers"
    assert real_app.generator.generate("Hi", SAMPLED.replace(seed=1)).completion_tokens == 24


@pytest.mark.parametrize("bad", ["corrupt.gguf", "not-gguf.gguf"])
def test_a_corrupt_gguf_is_a_clear_error_and_the_app_keeps_serving(real_app, bad):
    with pytest.raises(ModelLoadError) as err:
        real_app.models.load(bad)
    assert bad in str(err.value)
    assert real_app.models.current is None
    real_app.models.load("tiny-f32.gguf")
    assert real_app.generator.generate("Hi", SAMPLED.replace(seed=1)).completion_tokens == 24


def test_stop_string_and_utf8_through_a_real_model(real_app):
    real_app.models.load("tiny-f32.gguf")
    full = real_app.generator.generate("Привет", SAMPLED.replace(seed=3, max_new_tokens=40)).text
    assert len(full) > 4
    stop = full[2:4]
    cut = real_app.generator.generate("Привет", SAMPLED.replace(seed=3, max_new_tokens=40, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


@pytest.mark.parametrize("name", ["tiny-f32.gguf", "tiny-hf"])
def test_chunks_carry_the_logprobs_of_their_tokens(real_app, name):
    real_app.models.load(name)
    params = SamplingParams(temperature=0.8, max_new_tokens=12, ban_eos_token=True, seed=5, logprobs=3)
    chunks = list(real_app.generator.submit("The sea", params))
    steps = [lp for c in chunks for lp in c.logprobs]
    assert len(steps) == chunks[-1].completion_tokens == 12
    for step in steps:
        assert len(step.top) == 3 and step.logprob <= 0
        assert step.logprob <= step.top[0][1] + 1e-9
    joined = "".join(s.text for s in steps)
    if "\ufffd" not in joined:  # lone byte tokens only join into characters when decoded together
        assert joined == chunks[-1].text
