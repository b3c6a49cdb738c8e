"""The llama.cpp loader against the tiny kit's GGUF files (real llama-cpp-python, no mocks).

Every model here runs with threads=1: with 2 threads on a busy 2-core machine llama.cpp's
workers spin-wait on each other and a tiny model slows down a thousandfold.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from loaders import get_loader  # noqa: E402
from loaders.llama_cpp import LlamaCppLoader, LlamaCppOptions, read_gguf_metadata  # noqa: E402
from loaders.llama_cpp_sampler import GRAMMAR_SAFE_BAN, ChainContext, chain_seed, logit_bias_entries  # noqa: E402
from modules.core.errors import (  # noqa: E402
    BackendMissingError,
    ContextLengthExceededError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotLoadedError,
)
from modules.core.sampling import SAMPLER_NAMES, SamplingParams  # noqa: E402
from tests.kit import TinyKit  # noqa: E402
from tests.kit.tokenizer import CHAT_TEMPLATE  # noqa: E402

PROMPT = "The old lighthouse keeper climbed the stairs one last time and"
GREEDY = SamplingParams(temperature=0)


def options(**changes: object) -> LlamaCppOptions:
    return LlamaCppOptions(threads=1, threads_batch=1, **changes)  # type: ignore[arg-type]


def take(model: LlamaCppLoader, ids: list[int], params: SamplingParams, n: int = 16) -> list[int]:
    """The first `n` tokens of a generation (the generator is closed after)."""
    out: list[int] = []
    gen = model.generate(ids, params, threading.Event())
    for step in gen:
        out.append(step.token)
        if len(out) >= n:
            break
    gen.close()
    return out


@pytest.fixture(scope="module")
def q8(tiny_kit: TinyKit) -> Iterator[LlamaCppLoader]:
    model = LlamaCppLoader.load(tiny_kit.gguf_q8_0, options())
    yield model
    model.unload()


@pytest.fixture(scope="module")
def f32(tiny_kit: TinyKit) -> Iterator[LlamaCppLoader]:
    model = LlamaCppLoader.load(tiny_kit.gguf_f32, options(cache_type="f32"))
    yield model
    model.unload()


@pytest.fixture(scope="module")
def head32_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kit-style model whose head size (32) a quantised KV cache can hold; the kit's is 16."""
    from tests.kit.gguf_export import LlamaShape, hf_to_gguf_tensor, write_llama_gguf
    from tests.kit.hf_model import random_llama_weights
    from tests.kit.tokenizer import train_tokenizer, vocab_info

    vocab = vocab_info(train_tokenizer())
    shape = LlamaShape(vocab_size=len(vocab.tokens), hidden=64, layers=1, heads=2, kv_heads=2, ffn=128)
    weights = random_llama_weights(shape, seed=1)
    path = tmp_path_factory.mktemp("head32") / "head32-q8_0.gguf"
    return write_llama_gguf(
        path, shape, vocab, "q8_0", lambda g, hf, _s: hf_to_gguf_tensor(g, weights[hf], shape), name="head32"
    )


# --- loading and info --------------------------------------------------------------------
def test_registered_with_its_capabilities() -> None:
    loader = get_loader("llama.cpp")
    assert loader is LlamaCppLoader
    assert loader.capabilities.samplers == frozenset(SAMPLER_NAMES)
    assert loader.capabilities.grammar
    assert loader.options_class is LlamaCppOptions


def test_info_comes_from_the_gguf(f32: LlamaCppLoader, q8: LlamaCppLoader, tiny_kit: TinyKit) -> None:
    for model, file_type in ((f32, "F32"), (q8, "Q8_0")):
        info = model.info
        assert info.loader == "llama.cpp"
        assert info.context_length == 2048  # the kit's trained context, under the 8192 cap
        assert info.chat_template == CHAT_TEMPLATE
        assert info.bos_token == "<s>" and info.eos_token == "</s>"
        assert info.bos_token_id == model.encode("<s>", add_bos=False)[0]
        eos, im_end = model.encode("</s><|im_end|>", add_bos=False)
        assert info.eos_token_ids[0] == eos and im_end in info.eos_token_ids
        assert info.vocab_size == model._llm.n_vocab() > 256
        assert info.metadata["architecture"] == "llama"
        assert info.metadata["file_type"] == file_type
        assert info.metadata["n_threads"] == 1
    assert f32.info.metadata["cache_type"] == "f32"


def test_ctx_size_and_folder_path(tiny_kit: TinyKit, tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    os.symlink(tiny_kit.gguf_q8_0, folder / "model.gguf")
    model = LlamaCppLoader.load(folder, options(ctx_size=256))
    try:
        assert model.info.context_length == 256
        assert model.info.name == "my-model"
    finally:
        model.unload()


def test_header_reader(tiny_kit: TinyKit) -> None:
    header = read_gguf_metadata(tiny_kit.gguf_q8_0)
    assert header["general.architecture"] == "llama"
    assert header["llama.context_length"] == 2048
    assert header["tokenizer.chat_template"] == CHAT_TEMPLATE


# --- tokenizer ---------------------------------------------------------------------------
def test_encode_decode_round_trip(q8: LlamaCppLoader) -> None:
    text = "Привет, мир! 😀 héllo 你好\n<|im_start|>user\nhi<|im_end|>"
    ids = q8.encode(text)
    assert ids[0] == q8.info.bos_token_id and ids[1] != q8.info.bos_token_id
    assert q8.decode(ids, skip_special=False) == "<s>" + text
    assert q8.decode(ids) == "Привет, мир! 😀 héllo 你好\nuser\nhi"
    assert q8.encode(text, add_bos=False) == ids[1:]
    # A prompt that already starts with the BOS text gets no second BOS.
    assert q8.encode("<s>" + text) == ids


def test_a_prompt_starting_with_the_bos_text_gets_one_bos_and_no_warning(q8: LlamaCppLoader) -> None:
    """A rendered chat prompt carries the BOS text: llama.cpp must not be asked to add
    another (it would log "... 2 BOS tokens" on every chat message)."""
    import llama_cpp

    from loaders.llama_cpp import _captured_llama_log

    bos = q8.info.bos_token_id
    rendered = "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with _captured_llama_log(llama_cpp) as log:
        ids = q8.encode(rendered)
        plain = q8.encode("hi")
    assert ids.count(bos) == 1 and ids[0] == bos
    assert ids == q8.encode(rendered[len("<s>"):])  # the same ids as BOS added to the rest
    assert plain[0] == bos and plain.count(bos) == 1
    assert not [text for _, text in log if "BOS" in text], log
    with _captured_llama_log(llama_cpp) as log:  # the check itself sees llama.cpp's warning
        q8._llm.tokenize(rendered.encode(), add_bos=True, special=True)
    assert any("2 BOS tokens" in text for _, text in log)


def test_decode_marks_incomplete_utf8(q8: LlamaCppLoader) -> None:
    ids = q8.encode("🚀", add_bos=False)
    assert len(ids) > 1  # unseen emoji: byte tokens
    assert q8.decode(ids) == "🚀"
    assert q8.decode(ids[:-1]).endswith("\ufffd")
    with pytest.raises(InvalidRequestError):
        q8.decode([q8.info.vocab_size])


def test_decode_keeps_the_space_before_punctuation_so_streamed_deltas_add_up(q8: LlamaCppLoader) -> None:
    """The kit's GPT-2-style vocabulary has llama.cpp's clean_spaces on: llama_detokenize turns
    " ," into ",", so a window's text was no prefix of the next one's and the stream dropped the
    comma (a grammar's JSON came out as `[5] "level"`). Decoding is the pieces, as llama-server
    streams them."""
    from modules.engine.text_stream import IncrementalDetokenizer

    text = 'x = [5] ,"level" . done ?'
    ids = q8.encode(text, add_bos=False)
    assert q8.decode(ids) == text
    stream = IncrementalDetokenizer(q8.decode)
    assert "".join(stream.add(t) for t in ids) + stream.flush() == text


# --- generation --------------------------------------------------------------------------
def test_greedy_is_deterministic_and_matches_raw_llama(f32: LlamaCppLoader, tiny_kit: TinyKit) -> None:
    import llama_cpp

    ids = f32.encode(PROMPT)
    first = take(f32, ids, GREEDY, 24)
    assert take(f32, ids, GREEDY, 24) == first
    llm = llama_cpp.Llama(model_path=str(tiny_kit.gguf_f32), n_ctx=256, n_threads=1, n_threads_batch=1,
                          type_k=0, type_v=0, verbose=False)
    try:
        raw = []
        for token in llm.generate(ids, temp=0.0, top_k=0, top_p=1.0, min_p=0.0):
            raw.append(token)
            if len(raw) == 24:
                break
    finally:
        llm.close()
    assert raw == first


def test_seed_decides_the_sample(q8: LlamaCppLoader) -> None:
    ids = q8.encode(PROMPT)
    params = SamplingParams(temperature=1.0, seed=1)
    a = take(q8, ids, params, 32)
    assert take(q8, ids, params, 32) == a
    assert take(q8, ids, params.replace(seed=2), 32) != a


def test_every_sampler_runs_and_is_reproducible(q8: LlamaCppLoader) -> None:
    ids = q8.encode(PROMPT)
    everything = SamplingParams(
        temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, typical_p=0.95, top_n_sigma=3.0,
        repetition_penalty=1.2, repetition_penalty_range=0, presence_penalty=0.3, frequency_penalty=0.2,
        dry_multiplier=0.8, xtc_probability=0.5, xtc_threshold=0.05, seed=7, temperature_last=True,
    )
    for params in (everything, everything.replace(mirostat_mode=1), everything.replace(mirostat_mode=2)):
        tokens = take(q8, ids, params, 24)
        assert len(tokens) == 24 and all(0 <= t < q8.info.vocab_size for t in tokens)
        assert take(q8, ids, params, 24) == tokens


def test_repetition_penalty_changes_greedy_output(q8: LlamaCppLoader) -> None:
    ids = q8.encode(PROMPT)
    plain = take(q8, ids, GREEDY, 32)
    assert take(q8, ids, GREEDY.replace(repetition_penalty=3.0, repetition_penalty_range=0), 32) != plain


def test_ban_eos_token(q8: LlamaCppLoader) -> None:
    ids = q8.encode(PROMPT)
    eos = q8.info.eos_token_ids[0]
    forced = GREEDY.replace(logit_bias={eos: 100.0})
    assert take(q8, ids, forced, 1) == [eos]  # EOS is yielded like any token
    banned = take(q8, ids, forced.replace(ban_eos_token=True), 16)
    assert not set(banned) & set(q8.info.eos_token_ids)


def test_custom_token_bans(q8: LlamaCppLoader) -> None:
    ids = q8.encode(PROMPT)
    plain = take(q8, ids, GREEDY, 16)
    banned = sorted(set(plain[:3]))
    out = take(q8, ids, GREEDY.replace(custom_token_bans=banned + [10**9]), 16)  # out-of-range ids are ignored
    assert not set(out) & set(banned)


def test_grammar_constrains_output(q8: LlamaCppLoader) -> None:
    ids = q8.encode(PROMPT)
    eog = set(q8.info.eos_token_ids)
    for params in (GREEDY, SamplingParams(temperature=1.5, seed=3), SamplingParams(seed=4, ban_eos_token=True)):
        tokens = take(q8, ids, params.replace(grammar_string='root ::= "yes" | "no"'), 8)
        text_ids = tokens[: next((i for i, t in enumerate(tokens) if t in eog), len(tokens))]
        assert q8.decode(text_ids) in ("yes", "no")
        # Complete: only an end token may follow, even when EOS is banned (no llama.cpp abort).
        assert len(text_ids) < len(tokens) and tokens[len(text_ids)] in eog


def test_invalid_grammar_is_a_request_error(q8: LlamaCppLoader) -> None:
    ids = q8.encode(PROMPT)
    for grammar, reason in (('root ::= "yes', "end of input"), ('start ::= "a"', "root")):
        with pytest.raises(InvalidRequestError) as caught:
            take(q8, ids, SamplingParams(grammar_string=grammar), 1)
        assert caught.value.param == "grammar_string"
        assert reason in str(caught.value)
    assert len(take(q8, ids, GREEDY, 4)) == 4  # the model is fine afterwards


def test_stop_event_stops_within_one_token(q8: LlamaCppLoader) -> None:
    ids = q8.encode(PROMPT)
    stop = threading.Event()
    gen = q8.generate(ids, GREEDY, stop)
    assert next(gen).logprobs is None  # not asked for
    stop.set()
    assert list(gen) == []
    assert list(q8.generate(ids, GREEDY, stop)) == []  # set before the start: nothing at all


def test_next_turn_reuses_the_cached_prefix(f32: LlamaCppLoader) -> None:
    first = f32.encode(PROMPT)
    reply = take(f32, first, GREEDY, 5)
    second = first + reply + f32.encode(" and then", add_bos=False)
    cached = take(f32, second, GREEDY, 8)
    # The first prompt and the replies that were evaluated (at least the first four; the
    # engine may have decoded one more while the reader took the fifth) stayed in the cache.
    assert len(first) + 4 <= f32.last_reused_tokens <= len(first) + 5
    take(f32, f32.encode("Something else entirely"), GREEDY, 2)
    assert f32.last_reused_tokens == 1  # only the BOS is shared
    assert take(f32, second, GREEDY, 8) == cached


def test_an_abandoned_generation_gives_its_slot_to_a_newer_one(q8: LlamaCppLoader) -> None:
    ids = q8.encode(PROMPT)
    old = q8.generate(ids, GREEDY.replace(max_new_tokens=500), threading.Event())
    next(old)  # then never read again, never closed: it holds the only slot
    assert len(take(q8, q8.encode("Other text"), GREEDY, 4)) == 4
    assert len(list(old)) < 500  # it was ended, after the tokens already sent


def test_context_full_ends_generation(tiny_kit: TinyKit) -> None:
    model = LlamaCppLoader.load(tiny_kit.gguf_q8_0, options(ctx_size=32))
    try:
        ids = model.encode(PROMPT)
        tokens = list(model.generate(ids, SamplingParams(temperature=0), threading.Event()))
        assert len(tokens) == 32 - len(ids) + 1  # the last one is sampled from a full context
        with pytest.raises(ContextLengthExceededError):
            take(model, list(range(40)), GREEDY, 1)
        with pytest.raises(InvalidRequestError):
            take(model, [], GREEDY, 1)
    finally:
        model.unload()


# --- options, failures, unload -------------------------------------------------------------
def test_quantised_kv_cache(head32_gguf: Path, tiny_kit: TinyKit) -> None:
    model = LlamaCppLoader.load(head32_gguf, options(cache_type="q8_0"))
    try:
        assert model.info.metadata["cache_type"] == "q8_0"
        assert model.info.metadata["flash_attn"] is True  # a quantised V cache needs it
        assert len(take(model, model.encode(PROMPT), GREEDY, 8)) == 8
    finally:
        model.unload()
    # The kit's heads are 16 wide, narrower than a q8_0 block: llama.cpp's reason is kept.
    with pytest.raises(ModelLoadError, match="block size"):
        LlamaCppLoader.load(tiny_kit.gguf_q8_0, options(cache_type="q8_0"))


def test_bad_options_are_load_errors(tiny_kit: TinyKit) -> None:
    with pytest.raises(ModelLoadError, match="cache_type"):
        LlamaCppLoader.load(tiny_kit.gguf_q8_0, options(cache_type="q5"))
    with pytest.raises(ModelLoadError, match="tensor_split"):
        LlamaCppLoader.load(tiny_kit.gguf_q8_0, options(tensor_split="3,x"))


def test_corrupt_files_are_load_errors(tiny_kit: TinyKit, tmp_path: Path) -> None:
    data = tiny_kit.gguf_q8_0.read_bytes()
    cases = {
        "random.gguf": (os.urandom(4096), "not a valid GGUF file"),
        "empty.gguf": (b"", "not a valid GGUF file"),
        "header-cut.gguf": (data[:1000], "not a valid GGUF file"),
        "tensors-cut.gguf": (data[: len(data) // 2], "corrupted or incomplete"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ModelLoadError, match=message):
            LlamaCppLoader.load(path, options())
    model = LlamaCppLoader.load(tiny_kit.gguf_q8_0, options())  # the next good load works
    try:
        assert len(take(model, model.encode(PROMPT), GREEDY, 4)) == 4
    finally:
        model.unload()


def test_missing_backend_names_the_fix(monkeypatch: pytest.MonkeyPatch, tiny_kit: TinyKit) -> None:
    monkeypatch.setattr(LlamaCppLoader, "package", "llama_cpp_not_installed_here")
    with pytest.raises(BackendMissingError, match="install_llama_cpp.sh"):
        LlamaCppLoader.load(tiny_kit.gguf_q8_0, options())


def test_unload_frees_the_model(tiny_kit: TinyKit) -> None:
    model = LlamaCppLoader.load(tiny_kit.gguf_q8_0, options())
    llm = model._llm
    ids = model.encode(PROMPT)
    suspended = model.generate(ids, GREEDY, threading.Event())
    next(suspended)
    model.unload()
    assert llm._model.model is None and llm._ctx.ctx is None
    assert list(suspended) == []  # it returns instead of touching freed memory
    for call in (lambda: model.encode("x"), lambda: model.decode([1]), lambda: take(model, ids, GREEDY, 1)):
        with pytest.raises(ModelNotLoadedError):
            call()
    model.unload()  # twice is harmless


# --- the chain's pure parts ------------------------------------------------------------------
def test_logit_bias_entries() -> None:
    facts = ChainContext(vocab=None, n_vocab=100, n_ctx=64, eog_ids=(2, 3))
    params = SamplingParams(logit_bias={5: 1.5, 6: -math.inf, 500: 2.0}, custom_token_bans=[7, 1000], ban_eos_token=True)
    assert logit_bias_entries(params, facts) == {5: 1.5, 6: -math.inf, 7: -math.inf, 2: -math.inf, 3: -math.inf}
    with_grammar = logit_bias_entries(params.replace(grammar_string='root ::= "a"'), facts)
    assert with_grammar[2] == with_grammar[6] == GRAMMAR_SAFE_BAN


def test_chain_seed() -> None:
    assert chain_seed(SamplingParams(seed=None)) == 0xFFFFFFFF
    assert chain_seed(SamplingParams(seed=42)) == 42
    assert chain_seed(SamplingParams(seed=2**32 + 5)) == 5
    assert chain_seed(SamplingParams(seed=0xFFFFFFFF)) != 0xFFFFFFFF
