"""The loader contract (loaders/base.LoadedModel), checked the same way on every loader this
machine can run: the scripted fake, llama.cpp (the kit's f32 GGUF, one thread), Transformers
(the kit's HF folder, torch on one thread), GPTQ (the kit quantised on CPU; slow, skipped
without gptqmodel) and ExLlamaV2 (CUDA only).

Each model is loaded through the ModelManager and driven through the Generator, as the UI
and the API drive it; the loader itself is called directly only where the contract is about
its steps (tokens, logprobs, cancel). A loader that lacks a capability says so in its
declared `capabilities`, and the case then checks the refusal instead. Replies are a few
tokens long: the whole suite takes well under a minute on 2 cores (GPTQ's quantisation aside).
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loaders.base import (
    FALLBACK_CONTEXT,
    MAX_AUTO_CONTEXT,
    Capabilities,
    LoadedModel,
    Step,
    auto_context,
    concurrency_of,
)
from modules.core.errors import ContextLengthExceededError, InvalidRequestError, ModelNotLoadedError
from modules.core.sampling import SamplingParams
from modules.core.settings import Settings
from modules.engine.app import App
from modules.engine.generation import GenerationChunk
from modules.hub import memory_fit
from tests.fakes import FakeLoader, script_text
from tests.kit import TinyKit
from tests.test_exllamav2_loader import _gpu_ready, exl2_models, gpu_model  # noqa: F401 - fixtures
from tests.test_gptq_loader import eager_on_one_thread, gptq_dir  # noqa: F401 - fixtures

PROMPT = "The old lighthouse keeper climbed the stairs"
OTHER_PROMPT = "Once upon a time, in a small village by the sea,"
GREEDY = SamplingParams(temperature=0, max_new_tokens=10, ban_eos_token=True)
#: The fake's reply: long enough for a cancel to land mid-way at its 1 ms per step.
FAKE_SCRIPT = script_text("The keeper looked at the sea and said: the ships are late tonight. " * 8)


@dataclass
class Served:
    """One loader's model in an App: how to (re)load it, and the App to drive it with."""

    app: App
    name: str
    loader: str
    overrides: dict[str, Any]
    parallel_option: bool
    """Whether the loader has a `parallel` load option (the fake's is set on the instance)."""
    prepare: Callable[[LoadedModel, int], None]
    """Run after each load with the slots asked for (the fake's script lives here)."""
    loaded_parallel: int = 0
    """The slots of the model loaded now; 0 forces the next `load()`."""

    @property
    def batches(self) -> bool:
        return self.parallel_option or self.loader == "fake"

    def load(self, parallel: int = 1) -> LoadedModel:
        """The model loaded through the manager with `parallel` slots (only if not already)."""
        current = self.app.models.current
        if current is not None and self.loaded_parallel == parallel:
            return current
        overrides = {**self.overrides, "parallel": parallel} if self.parallel_option else self.overrides
        self.app.models.load(self.name, loader=self.loader, overrides=overrides)
        model = self.app.models.require()
        self.prepare(model, parallel)
        self.loaded_parallel = parallel
        return model

    def run(self, prompt: str | list[int] = PROMPT, params: SamplingParams = GREEDY) -> list[GenerationChunk]:
        self.load()
        return list(self.app.generator.submit(prompt, params))


#: (model name in the models folder, load overrides, has a `parallel` option, prepare).
Setup = tuple[str, dict[str, Any], bool, Callable[[LoadedModel, int], None]]


def _unchanged(model: LoadedModel, parallel: int) -> None:
    """Nothing to prepare: the load options say it all."""


def _fake(request: pytest.FixtureRequest, models: Path) -> Setup:
    (models / "fake.gguf").write_bytes(b"GGUF")

    def prepare(model: LoadedModel, parallel: int) -> None:
        assert isinstance(model, FakeLoader)
        model.script = list(FAKE_SCRIPT)
        model.step_delay = 0.001
        model.parallel = parallel

    return "fake.gguf", {"ctx_size": 256}, False, prepare


def _llama_cpp(request: pytest.FixtureRequest, models: Path) -> Setup:
    pytest.importorskip("llama_cpp")
    kit: TinyKit = request.getfixturevalue("tiny_kit")
    shutil.copy(kit.gguf_f32, models / "tiny-f32.gguf")
    # f32 KV cache, no flash attention (in the Settings): batched rows then equal lone ones exactly.
    return "tiny-f32.gguf", {"ctx_size": 256}, True, _unchanged


def _transformers(request: pytest.FixtureRequest, models: Path) -> Setup:
    pytest.importorskip("transformers")
    request.getfixturevalue("torch_one_thread")
    kit: TinyKit = request.getfixturevalue("tiny_kit")
    shutil.copytree(kit.hf_dir, models / "tiny-hf")
    return "tiny-hf", {"cpu": True, "dtype": "float32"}, True, _unchanged


def _gptq(request: pytest.FixtureRequest, models: Path) -> Setup:
    folder: Path = request.getfixturevalue("gptq_dir")  # skips without gptqmodel
    shutil.copytree(folder, models / "tiny-GPTQ")
    return "tiny-GPTQ", {"cpu": True}, True, _unchanged


def _exllamav2(request: pytest.FixtureRequest, models: Path) -> Setup:
    if _gpu_ready() is not None:
        pytest.skip(f"ExLlamaV2 needs CUDA and exllamav2: {_gpu_ready()}")
    folder: Path = request.getfixturevalue("exl2_models")[8.0]
    shutil.copytree(folder, models / "gpu-exl2")
    return "gpu-exl2", {"max_seq_len": 256}, False, _unchanged


SETUPS = {"fake": _fake, "llama.cpp": _llama_cpp, "transformers": _transformers, "gptq": _gptq,
          "exllamav2": _exllamav2}


@pytest.fixture(scope="module", params=list(SETUPS))
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp(f"contract-{request.param.replace('.', '')}")
    models = root / "models"
    models.mkdir()
    name, overrides, parallel_option, prepare = SETUPS[request.param](request, models)
    settings = Settings(models_dir=str(models), settings=str(root / "settings.yaml"), threads=1, threads_batch=1,
                        cache_type="f32", no_flash_attn=True)
    app = App.create(settings, root)
    entry = Served(app, name, request.param, overrides, parallel_option, prepare)
    entry.load()
    yield entry
    app.close()


def steps_of(model: LoadedModel, ids: list[int], params: SamplingParams, n: int,
             stop: threading.Event | None = None) -> list[Step]:
    """The first `n` steps straight from the loader (the generator is closed after)."""
    out: list[Step] = []
    gen = model.generate(ids, params, stop or threading.Event())
    try:
        for step in gen:
            out.append(step)
            if len(out) >= n:
                break
    finally:
        gen.close()  # type: ignore[attr-defined]
    return out


# --- what every model declares ---------------------------------------------------------------
def test_capabilities_and_parallel_are_declared(served: Served) -> None:
    model = served.load()
    assert isinstance(model, LoadedModel)
    assert isinstance(model.capabilities, Capabilities) and model.capabilities.samplers
    assert isinstance(model.parallel, int) and model.parallel >= 1
    assert concurrency_of(model) == model.parallel
    assert model.info.loader == served.loader and model.info.vocab_size > 0
    steps = steps_of(model, model.encode(PROMPT), GREEDY, 3)
    assert len(steps) == 3 and all(isinstance(s, Step) and s.logprobs is None for s in steps)


def test_a_grammar_is_honoured_or_refused_by_name(served: Served) -> None:
    model = served.load()
    params = GREEDY.replace(grammar_string='root ::= "yes" | "no"', ban_eos_token=False)
    if model.capabilities.grammar:
        assert served.run(params=params)[-1].text in ("yes", "no")
        return
    with pytest.raises(InvalidRequestError, match="does not support grammars") as err:
        served.run(params=params)
    assert err.value.param == "grammar_string"


def test_under_a_grammar_stop_strings_and_logprobs_still_apply(served: Served) -> None:
    model = served.load()
    if not model.capabilities.grammar:
        pytest.skip(f"{served.loader} has no grammars (the refusal is checked above)")
    want = 2 if model.capabilities.logprobs else 0
    params = GREEDY.replace(grammar_string='root ::= "yes, no" | "no, yes"', ban_eos_token=False, stop=[","],
                            logprobs=want)
    chunks = served.run(params=params)
    assert chunks[-1].text in ("yes", "no") and chunks[-1].finish_reason == "stop"
    described = [lp for c in chunks for lp in c.logprobs]
    assert (len(described) > 0) == bool(want)
    assert all(len(lp.top) == want and lp.logprob <= 0 for lp in described)


# --- error shapes ------------------------------------------------------------------------------
def test_an_empty_or_oversized_prompt_is_refused_with_its_error(served: Served) -> None:
    model = served.load()
    for empty in ([], ""):
        with pytest.raises(InvalidRequestError) as err:
            served.run(empty, GREEDY.replace(add_bos_token=False))
        assert err.value.param == "prompt"
    with pytest.raises(ContextLengthExceededError) as err:  # no room left for the prompt
        served.run(params=GREEDY.replace(truncation_length=8, max_new_tokens=8))
    assert err.value.param == "max_new_tokens"
    # The loader itself refuses what the generator would have cut or refused.
    token = model.encode("a", add_bos=False)[0]
    with pytest.raises(ContextLengthExceededError):
        steps_of(model, [token] * (model.info.context_length + 1), GREEDY, 1)
    with pytest.raises(InvalidRequestError):
        steps_of(model, [], GREEDY, 1)
    with pytest.raises(InvalidRequestError):
        steps_of(model, [token, model.info.vocab_size], GREEDY, 1)
    assert served.run()[-1].completion_tokens == GREEDY.max_new_tokens  # and it keeps serving


def test_after_unload_every_call_says_the_model_is_not_loaded(served: Served) -> None:
    model = served.load()
    ids = model.encode(PROMPT)
    served.app.models.unload()
    try:
        with pytest.raises(ModelNotLoadedError):
            served.app.generator.generate(PROMPT, GREEDY)
        with pytest.raises(ModelNotLoadedError):
            steps_of(model, ids, GREEDY, 1)
        with pytest.raises(ModelNotLoadedError):
            model.encode(PROMPT)
    finally:
        served.loaded_parallel = 0
    assert served.run()[-1].completion_tokens == GREEDY.max_new_tokens  # a reload serves again


# --- logit bias and bans -------------------------------------------------------------------------
def test_ids_outside_the_vocabulary_are_ignored_with_a_warning(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    model = served.load()
    plain = served.run()[-1]
    outside = model.info.vocab_size + 5
    for extra in ({"logit_bias": {outside: 50.0}}, {"custom_token_bans": [outside, 10**9]},
                  {"logit_bias": {10**9: -100.0}, "custom_token_bans": [outside]}):
        caplog.clear()
        with caplog.at_level("WARNING", logger="loaders.base"):
            got = served.run(params=GREEDY.replace(**extra))[-1]
        assert (got.text, got.finish_reason, got.completion_tokens) == (
            plain.text, plain.finish_reason, plain.completion_tokens), extra
        assert any("outside the vocabulary" in r.getMessage() for r in caplog.records), extra


def test_a_banned_token_is_never_sampled(served: Served) -> None:
    model = served.load()
    ids = model.encode(PROMPT)
    plain = [s.token for s in steps_of(model, ids, GREEDY, 8)]
    banned = sorted(set(plain[:2]))
    got = [s.token for s in steps_of(model, ids, GREEDY.replace(custom_token_bans=banned), 8)]
    assert len(got) == 8 and not set(got) & set(banned) and got != plain
    # Through the generator the same ban changes the reply.
    assert served.run(params=GREEDY.replace(custom_token_bans=banned))[-1].text != served.run()[-1].text


# --- stop strings, cancel ------------------------------------------------------------------------
def test_a_stop_string_across_tokens_cuts_the_reply_and_never_leaks(served: Served) -> None:
    params = GREEDY.replace(max_new_tokens=16)
    chunks = served.run(params=params)
    full = chunks[-1].text
    deltas = [c.delta for c in chunks if c.delta]
    for k in range(1, len(deltas)):
        at = len("".join(deltas[:k]))  # a token boundary in the text
        stop = full[at - 1 : at + 1]
        if len(stop) == 2 and "\ufffd" not in stop and full.find(stop) == at - 1:
            break
    else:
        pytest.fail(f"no stop string across a token boundary in {full!r}")
    cut = served.run(params=params.replace(stop=[stop]))
    assert cut[-1].finish_reason == "stop"
    assert cut[-1].text == full[: at - 1]  # nothing of the stop string, nothing after it
    assert "".join(c.delta for c in cut) == cut[-1].text  # not even streamed and taken back


def test_cancel_stops_within_one_step(served: Served) -> None:
    model = served.load()
    stop = threading.Event()
    long = GREEDY.replace(max_new_tokens=200)
    gen = model.generate(model.encode(PROMPT), long, stop)
    next(gen)
    stop.set()
    assert len(list(gen)) <= 1
    stream = served.app.generator.submit(PROMPT, long)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 1:
            stream.cancel()
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].completion_tokens < long.max_new_tokens


# --- logprobs ------------------------------------------------------------------------------------
def test_logprobs_have_their_shape_or_are_refused_by_name(served: Served) -> None:
    model = served.load()
    params = GREEDY.replace(logprobs=3, max_new_tokens=6)
    if not model.capabilities.logprobs:
        with pytest.raises(InvalidRequestError, match=f"the {model.info.loader} loader cannot report") as err:
            served.run(params=params)
        assert err.value.param == "logprobs"
        return
    chunks = served.run(params=params)
    described = [lp for c in chunks for lp in c.logprobs]
    assert len(described) == chunks[-1].completion_tokens == 6
    for token in described:
        values = [lp for _, lp in token.top]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert all(lp <= 0 for lp in values) and token.logprob <= 0
        assert token.logprob <= values[0] + 1e-6
    # Straight from the loader: the numbers ride in each step, the top N most likely first.
    for step in steps_of(model, model.encode(PROMPT), params.replace(ban_eos_token=False), 4):
        assert step.logprobs is not None and len(step.logprobs.top) == 3
        assert step.logprobs.top[0][0] == step.token  # greedy: the sampled token is the most likely
        assert abs(step.logprobs.logprob - step.logprobs.top[0][1]) < 1e-5


# --- several at once, seeds ---------------------------------------------------------------------
def test_two_requests_at_once_give_what_each_gives_alone(served: Served) -> None:
    model = served.load(parallel=2)
    try:
        assert model.parallel == (2 if served.batches else 1)
        assert concurrency_of(model) == model.parallel
        prompts = [PROMPT, OTHER_PROMPT]  # different lengths: padding and slots must not matter
        alone = [served.app.generator.generate(p, GREEDY).text for p in prompts]
        streams = [served.app.generator.submit(p, GREEDY) for p in prompts]
        assert [s.result().text for s in streams] == alone
    finally:
        served.load()  # back to one slot for the other cases


def test_the_same_seed_gives_the_same_sampled_reply(served: Served) -> None:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=11, max_new_tokens=10, ban_eos_token=True)
    first = served.run(params=params)[-1]
    served.run(OTHER_PROMPT, params.replace(seed=12))  # whatever ran in between
    again = served.run(params=params)[-1]
    assert first.completion_tokens == 10 and first.seed == again.seed == 11
    assert again.text == first.text


# --- the memory estimate agrees with what a loader allocates -------------------------------------
def test_the_memory_estimate_assumes_the_context_the_loader_allocates(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from loaders.llama_cpp import LlamaCppLoader, LlamaCppOptions
    from tests.kit.gguf_export import LlamaShape, hf_to_gguf_tensor, write_llama_gguf
    from tests.kit.hf_model import random_llama_weights
    from tests.kit.tokenizer import train_tokenizer, vocab_info

    vocab = vocab_info(train_tokenizer())
    shape = LlamaShape(vocab_size=len(vocab.tokens), hidden=32, layers=1, heads=2, kv_heads=2, ffn=64, context=32768)
    weights = random_llama_weights(shape, seed=2)
    path = write_llama_gguf(tmp_path / "long-f32.gguf", shape, vocab, "f32",
                            lambda g, hf, _s: hf_to_gguf_tensor(g, weights[hf], shape), name="long")
    model = LlamaCppLoader.load(path, LlamaCppOptions(threads=1, threads_batch=1))
    try:
        assert memory_fit.estimate_model(path).n_ctx == model.info.context_length == MAX_AUTO_CONTEXT
    finally:
        model.unload()
    folder = tmp_path / "no-context-hf"
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000}
    (folder / "config.json").write_text(json.dumps(config))
    assert memory_fit.estimate_hf_folder(folder).n_ctx == FALLBACK_CONTEXT == auto_context(0, None)
