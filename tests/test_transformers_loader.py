"""The Transformers loader on the tiny kit's HF folder: loading, tokens, generation, refusals."""

from __future__ import annotations

import gc
import json
import shutil
import sys
import threading
import weakref
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from loaders import get_loader  # noqa: E402
from loaders.base import LoadedModel, Step, within_vocabulary  # noqa: E402
from loaders.transformers import TransformersLoader, TransformersOptions  # noqa: E402
from modules.core.errors import (  # noqa: E402
    BackendMissingError,
    ContextLengthExceededError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotLoadedError,
    UnsupportedOptionError,
)
from modules.core.sampling import SamplingParams  # noqa: E402
from tests.kit import TinyKit  # noqa: E402

PROMPT = "The old lighthouse keeper climbed the stairs one last time and"
N_TOKENS = 32
GREEDY = SamplingParams(temperature=0)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def model(tiny_kit: TinyKit) -> Iterator[TransformersLoader]:
    loaded = TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions(cpu=True))
    yield loaded
    loaded.unload()


def run(
    model: TransformersLoader, params: SamplingParams, n: int = N_TOKENS, prompt: str = PROMPT
) -> list[int]:
    ids = model.encode(prompt)
    return [step.token for step in islice(model.generate(ids, params, threading.Event()), n)]


def hf_reference_greedy(folder: Path, prompt_ids: list[int], n: int) -> list[int]:
    """Plain Transformers: argmax over the full sequence each step, no cache, no samplers."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        for _ in range(n):
            token = reference(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


# --- loading and info ---------------------------------------------------------------------
def test_registered_with_its_options_and_capabilities() -> None:
    assert get_loader("transformers") is TransformersLoader
    assert TransformersLoader.options_class is TransformersOptions
    assert "dry" in TransformersLoader.capabilities.samplers
    assert "mirostat" in TransformersLoader.capabilities.samplers
    assert TransformersLoader.capabilities.grammar is True


def test_info(model: TransformersLoader, tiny_kit: TinyKit) -> None:
    config = json.loads((tiny_kit.hf_dir / "config.json").read_text())
    info = model.info
    assert isinstance(model, LoadedModel)
    assert info.loader == "transformers" and info.name == tiny_kit.hf_dir.name
    assert info.context_length == config["max_position_embeddings"]
    assert info.vocab_size == config["vocab_size"]
    tokenizer_ids = {model.encode(t, add_bos=False)[0] for t in ("</s>", "<|im_end|>")}
    assert set(info.eos_token_ids) == tokenizer_ids  # generation_config's list + tokenizer eos
    assert info.bos_token == "<s>" and info.eos_token == "</s>"
    assert info.bos_token_id == model.encode("<s>", add_bos=False)[0]
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert info.special_tokens["eos_token"] == "</s>"
    assert info.metadata["architecture"] == "LlamaForCausalLM"
    assert info.metadata["device"] == "cpu" and info.metadata["dtype"] == "float32"
    assert info.metadata["parameters"] > 0
    assert model.parallel == 1 and info.metadata["parallel"] == 1


# --- tokens -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text", ["Hello world", "Привет, мир! Как дела?", "emoji 🙂🚀 mix 👍🏽", "  two\n\n\tspaces"]
)
def test_encode_decode_round_trip(model: TransformersLoader, text: str) -> None:
    assert model.decode(model.encode(text, add_bos=False)) == text
    assert model.decode(model.encode(text)) == text  # bos is special: skipped


def test_encode_prepends_bos_once(model: TransformersLoader) -> None:
    bos = model.info.bos_token_id
    ids = model.encode("hi")
    assert ids[0] == bos and bos not in ids[1:]
    assert model.encode("hi", add_bos=False)[0] != bos
    assert model.encode("<s>hi") == ids  # already there: not doubled


def test_special_token_text_maps_to_the_special_token(model: TransformersLoader) -> None:
    ids = model.encode("<|im_start|>user\nhi<|im_end|>", add_bos=False)
    im_end = model.info.eos_token_ids[1]
    assert ids[-1] == im_end
    assert model.decode(ids, skip_special=False) == "<|im_start|>user\nhi<|im_end|>"
    assert model.decode(ids) == "user\nhi"


def test_incomplete_utf8_decodes_to_replacement_char(model: TransformersLoader) -> None:
    ids = model.encode("🙂", add_bos=False)
    whole = model.decode(ids)
    assert whole == "🙂"
    if len(ids) > 1:  # a byte-level split: the first half alone is not a character
        assert model.decode(ids[:-1]).endswith("\ufffd")


# --- generation ---------------------------------------------------------------------------
def test_greedy_matches_plain_transformers(model: TransformersLoader, tiny_kit: TinyKit) -> None:
    ids = model.encode(PROMPT)
    steps = list(islice(model.generate(ids, GREEDY, threading.Event()), N_TOKENS))
    assert all(isinstance(s, Step) and s.logprobs is None for s in steps)  # none asked for
    ours = [s.token for s in steps]
    assert ours == run(model, GREEDY)  # deterministic
    assert ours == hf_reference_greedy(tiny_kit.hf_dir, ids, N_TOKENS)


def test_seed_decides_the_sampled_text(model: TransformersLoader) -> None:
    params = SamplingParams(temperature=1.0, seed=1234)
    first = run(model, params)
    assert run(model, params) == first
    assert run(model, params.replace(seed=4321)) != first


def test_ban_eos_token_masks_every_end_id(model: TransformersLoader) -> None:
    force_end = {tid: 100.0 for tid in model.info.eos_token_ids}
    assert run(model, SamplingParams(temperature=0, logit_bias=force_end), n=1)[0] in model.info.eos_token_ids
    banned = run(model, SamplingParams(temperature=0, logit_bias=force_end, ban_eos_token=True), n=8)
    assert not set(banned) & set(model.info.eos_token_ids)
    sampled = run(model, SamplingParams(seed=5, logit_bias=force_end, ban_eos_token=True), n=8)
    assert not set(sampled) & set(model.info.eos_token_ids)


def test_each_step_carries_its_own_tokens_logprobs(model: TransformersLoader) -> None:
    ids = model.encode(PROMPT)
    steps = list(islice(model.generate(ids, GREEDY.replace(logprobs=3), threading.Event()), 8))
    assert [s.token for s in steps] == run(model, GREEDY, n=8)
    for step in steps:
        assert step.logprobs is not None and len(step.logprobs.top) == 3
        assert step.logprobs.top[0][0] == step.token  # greedy: the raw argmax
        assert step.logprobs.logprob == pytest.approx(step.logprobs.top[0][1])
    # The raw distribution, before the samplers: a bias moves the token, not the numbers.
    forced = next(iter(model.generate(ids, GREEDY.replace(logprobs=2, logit_bias={5: 100.0}), threading.Event())))
    assert forced.token == 5 and forced.logprobs is not None
    assert forced.logprobs.top == steps[0].logprobs.top[:2]


def test_ids_outside_the_vocabulary_are_ignored(model: TransformersLoader) -> None:
    """The engine drops them (within_vocabulary) before the loader sees the params: the reply
    is the one without them."""
    outside = model.info.vocab_size + 5
    params = within_vocabulary(GREEDY.replace(logit_bias={outside: 50.0}, custom_token_bans=[outside]),
                               model.info.vocab_size)
    assert run(model, params, n=8) == run(model, GREEDY, n=8)


def test_custom_token_bans(model: TransformersLoader) -> None:
    greedy = run(model, GREEDY, n=8)
    bans = sorted(set(greedy))
    banned = run(model, SamplingParams(temperature=0, custom_token_bans=bans), n=8)
    assert not set(banned) & set(bans)


def test_stop_event_stops_within_one_token(model: TransformersLoader) -> None:
    stop = threading.Event()
    tokens = model.generate(model.encode(PROMPT), GREEDY, stop)
    next(tokens)
    stop.set()
    assert list(tokens) == []
    assert list(model.generate(model.encode(PROMPT), GREEDY, stop)) == []  # set before the start


def test_generation_ends_when_the_context_is_full(model: TransformersLoader) -> None:
    context = model.info.context_length
    prompt = (model.encode(PROMPT * 200) * 50)[: context - 3]
    assert len(list(model.generate(prompt, GREEDY, threading.Event()))) == 3
    assert list(model.generate(prompt + [1, 2, 3], GREEDY, threading.Event())) == []
    with pytest.raises(ContextLengthExceededError):
        next(model.generate(prompt + [1, 2, 3, 4], GREEDY, threading.Event()))


def test_bad_prompts_are_refused(model: TransformersLoader) -> None:
    with pytest.raises(InvalidRequestError):
        next(model.generate([], GREEDY, threading.Event()))
    with pytest.raises(InvalidRequestError):
        next(model.generate([model.info.vocab_size], GREEDY, threading.Event()))


def test_every_sampler_runs(model: TransformersLoader) -> None:
    params = SamplingParams(
        temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, typical_p=0.95, top_n_sigma=3.0,
        repetition_penalty=1.15, presence_penalty=0.2, frequency_penalty=0.1, dry_multiplier=0.8,
        xtc_probability=0.3, seed=9,
    )  # fmt: skip
    tokens = run(model, params, n=16)
    assert len(tokens) == 16 and all(0 <= t < model.info.vocab_size for t in tokens)
    for mode in (1, 2):
        assert len(run(model, SamplingParams(mirostat_mode=mode, seed=9), n=8)) == 8


def test_dry_changes_a_repetitive_greedy_reply(model: TransformersLoader) -> None:
    plain = run(model, GREEDY, n=64)
    with_dry = run(model, SamplingParams(temperature=0, dry_multiplier=5.0, dry_allowed_length=1), n=64)
    assert with_dry != plain


# --- refusals and lifecycle ---------------------------------------------------------------
def pickle_only_copy(kit: TinyKit, target: Path) -> Path:
    """The kit's model with its weights as a pickled pytorch_model.bin instead of safetensors."""
    from safetensors.torch import load_file

    target.mkdir()
    for source in kit.hf_dir.iterdir():
        if source.suffix != ".safetensors":
            shutil.copy(source, target / source.name)
    torch.save(load_file(str(kit.hf_dir / "model.safetensors")), target / "pytorch_model.bin")
    return target


def test_pickled_weights_need_allow_pickle(
    tiny_kit: TinyKit, tmp_path: Path, model: TransformersLoader
) -> None:
    folder = pickle_only_copy(tiny_kit, tmp_path / "pickled")
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        TransformersLoader.load(folder, TransformersOptions(cpu=True))
    loaded = TransformersLoader.load(folder, TransformersOptions(cpu=True, allow_pickle=True))
    try:
        assert run(loaded, GREEDY, n=8) == run(model, GREEDY, n=8)
    finally:
        loaded.unload()


def test_4bit_on_cpu_is_unsupported(tiny_kit: TinyKit) -> None:
    with pytest.raises(UnsupportedOptionError, match="CUDA"):
        TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions(cpu=True, load_in_4bit=True))
    with pytest.raises(UnsupportedOptionError):
        TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions(cpu=True, load_in_8bit=True))
    with pytest.raises(UnsupportedOptionError, match="dtype"):
        TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions(dtype="float8"))


def test_folders_without_a_model_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        TransformersLoader.load(tmp_path, TransformersOptions())
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="weights"):
        TransformersLoader.load(tmp_path, TransformersOptions())
    (tmp_path / "model.safetensors").write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="could not load"):
        TransformersLoader.load(tmp_path, TransformersOptions())


def test_remote_code_models_need_trust_remote_code(tmp_path: Path) -> None:
    config = {"model_type": "my_own_arch", "auto_map": {"AutoModelForCausalLM": "modeling.MyModel"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        TransformersLoader.load(tmp_path, TransformersOptions())


def test_missing_backend_names_the_install_command(
    tiny_kit: TinyKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(BackendMissingError, match="pip install"):
        TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions())


def test_unload_frees_the_model(tiny_kit: TinyKit) -> None:
    loaded = TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions(cpu=True))
    weights = weakref.ref(loaded._model)
    run(loaded, GREEDY, n=2)
    loaded.unload()
    gc.collect()
    assert weights() is None
    with pytest.raises(ModelNotLoadedError):
        loaded.encode("hi")
    with pytest.raises(ModelNotLoadedError):
        next(loaded.generate([1], GREEDY, threading.Event()))
