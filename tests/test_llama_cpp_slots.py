"""llama.cpp slots: continuous batching, per-slot prefix reuse and context shift, on the
tiny kit's real GGUF files (llama-cpp-python, no mocks).

Every model runs with one thread (see tests/test_llama_cpp_loader.py), an f32 KV cache and
no flash attention: then llama.cpp's kernels give the same numbers whatever else is in the
batch, and a request decoded beside others must give exactly the tokens (and
log-probabilities) it gives alone. (Flash attention, on by default, and the tiled matrix
kernels of wider models round differently with the batch's shape, by ~1e-4 in a logprob.)
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from loaders.kv_reuse import common_prefix  # noqa: E402
from loaders.llama_cpp import LlamaCppLoader, LlamaCppOptions  # noqa: E402
from modules.core.sampling import SamplingParams  # noqa: E402
from modules.core.settings import Settings  # noqa: E402
from modules.engine.app import App  # noqa: E402
from tests.kit import TinyKit  # noqa: E402
from tests.kit.gguf_export import hf_to_gguf_tensor, write_llama_gguf  # noqa: E402
from tests.kit.hf_model import random_llama_weights, tiny_shape  # noqa: E402
from tests.kit.tokenizer import train_tokenizer, vocab_info  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_new_tokens=24)
PROMPTS = [
    "The old lighthouse keeper climbed the stairs one last time and",
    "Once upon a time",
    "In a small village by the sea, the fishermen gathered every morning to",
    "Hello",
    "The library was quiet",
    "She opened the map and pointed at the mountains where",
]


def options(**changes: object) -> LlamaCppOptions:
    return LlamaCppOptions(threads=1, threads_batch=1, cache_type="f32", no_flash_attn=True,  # type: ignore[arg-type]
                           **changes)


def run(model: LlamaCppLoader, ids: list[int], params: SamplingParams = GREEDY,
        stop: threading.Event | None = None) -> list[int]:
    return [step.token for step in model.generate(ids, params, stop or threading.Event())]


@pytest.fixture(scope="module")
def single(tiny_kit: TinyKit) -> Iterator[LlamaCppLoader]:
    model = LlamaCppLoader.load(tiny_kit.gguf_f32, options())
    yield model
    model.unload()


@pytest.fixture(scope="module")
def four(tiny_kit: TinyKit) -> Iterator[LlamaCppLoader]:
    model = LlamaCppLoader.load(tiny_kit.gguf_f32, options(parallel=4))
    yield model
    model.unload()


def concurrently(model: LlamaCppLoader, prompts: list[list[int]], params: SamplingParams = GREEDY,
                 stagger: threading.Event | None = None) -> list[list[int]]:
    """Each prompt in its own thread at once; the outputs in prompt order."""
    out: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for step in model.generate(prompts[i], params, threading.Event()):
                out[i].append(step.token)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out


def test_parallel_requests_equal_their_sequential_twins(single: LlamaCppLoader, four: LlamaCppLoader) -> None:
    prompts = [single.encode(p) for p in PROMPTS]  # 6 requests on 4 slots: two wait for a slot
    alone = [run(single, ids) for ids in prompts]
    assert all(len(a) == GREEDY.max_new_tokens for a in alone)
    assert concurrently(four, prompts) == alone
    sampled = SamplingParams(temperature=1.0, top_k=40, seed=5, max_new_tokens=24)
    assert concurrently(four, prompts, sampled) == [run(single, ids, sampled) for ids in prompts]
    assert four.parallel == 4 and four.info.metadata["parallel"] == 4


def test_a_request_joins_while_others_run(single: LlamaCppLoader, four: LlamaCppLoader) -> None:
    long = GREEDY.replace(max_new_tokens=64)
    first_ids, late_ids = single.encode(PROMPTS[0]), single.encode(PROMPTS[2])
    want_first, want_late = run(single, first_ids, long), run(single, late_ids)
    first = four.generate(first_ids, long, threading.Event())
    got_first = [next(first).token for _ in range(10)]  # running, mid-generation
    assert run(four, late_ids) == want_late
    got_first += [step.token for step in first]
    assert got_first == want_first


def test_cancelling_one_request_leaves_the_others_running(single: LlamaCppLoader, four: LlamaCppLoader) -> None:
    ids = [single.encode(p) for p in PROMPTS[:3]]
    want = [run(single, i) for i in ids]
    stop = threading.Event()
    gens = [four.generate(i, GREEDY, stop if n == 1 else threading.Event()) for n, i in enumerate(ids)]
    got: list[list[int]] = [[next(g).token] for g in gens]
    stop.set()
    for n, g in enumerate(gens):
        got[n] += [step.token for step in g]
    assert got[0] == want[0] and got[2] == want[2]
    assert len(got[1]) < len(want[1])
    closed = four.generate(ids[0], GREEDY, threading.Event())
    next(closed)
    closed.close()  # the consumer leaves: its slot is freed for the next request
    assert concurrently(four, ids) == want


def test_each_chat_returns_to_the_slot_that_holds_its_cache(four: LlamaCppLoader) -> None:
    chats = [four.encode(p) for p in PROMPTS[:4]]
    params = GREEDY.replace(max_new_tokens=8)
    for ids in chats:
        ids += run(four, ids, params)
    for _turn in range(2):
        for n, ids in enumerate(chats):
            previous = len(ids)
            ids += four.encode(f" and then {n}", add_bos=False)
            ids += run(four, ids, params)
            # Everything but the last evaluated reply token was already in the cache.
            assert four.last_reused_tokens >= previous - 1, (n, four.last_reused_tokens, previous)


def test_each_step_carries_its_own_requests_logprobs(single: LlamaCppLoader, four: LlamaCppLoader) -> None:
    """Requests batched side by side get the numbers they get alone, each in its own steps."""
    params = GREEDY.replace(logprobs=3, max_new_tokens=12)
    ids = [single.encode(p) for p in PROMPTS[:3]]

    def numbers(model: LlamaCppLoader, prompt: list[int]) -> list[tuple[int, float]]:
        got = []
        for step in model.generate(prompt, params, threading.Event()):
            lp = step.logprobs
            assert lp is not None and lp.top[0][0] == step.token  # greedy: the top token is the one taken
            got.append((step.token, round(lp.logprob, 4)))
        return got

    want = [numbers(single, i) for i in ids]
    results: list[list[tuple[int, float]]] = [[] for _ in ids]
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, numbers(four, ids[n]))) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == want


def test_the_tokenizer_answers_while_every_slot_is_busy(four: LlamaCppLoader) -> None:
    """Token counting (SillyTavern sends a dozen before each generation) and model info
    never wait for the decode loop."""
    ids = four.encode(PROMPTS[0])
    gens = [four.generate(ids, GREEDY.replace(max_new_tokens=300), threading.Event()) for _ in range(4)]
    for g in gens:
        next(g)  # four slots running, none of them read on
    done = threading.Event()
    threading.Thread(target=lambda: (four.encode("count me " * 200), four.decode(ids), done.set()),
                     daemon=True).start()
    assert done.wait(10)
    for g in gens:
        g.close()


def test_unload_ends_every_running_request(tiny_kit: TinyKit) -> None:
    model = LlamaCppLoader.load(tiny_kit.gguf_f32, options(parallel=2))
    ids = model.encode(PROMPTS[0])
    gens = [model.generate(ids, GREEDY.replace(max_new_tokens=400), threading.Event()) for _ in range(2)]
    for g in gens:
        next(g)
    model.unload()
    for g in gens:
        list(g)  # returns: no crash, no hang


# --- context shift ---------------------------------------------------------------------
def one_layer_gguf(folder: Path) -> Path:
    """The kit's tokenizer with a one-layer random Llama: its keys and values depend only on
    each token and its position, so a shifted cache is exactly a freshly evaluated one."""
    tokenizer = train_tokenizer()
    vocab = vocab_info(tokenizer)
    shape = dataclasses.replace(tiny_shape(len(vocab.tokens)), layers=1)
    weights = random_llama_weights(shape, seed=3)
    path = folder / "one-layer-f32.gguf"

    def source(gguf_name: str, hf_name: str, np_shape: tuple[int, ...]) -> np.ndarray:
        return hf_to_gguf_tensor(gguf_name, weights[hf_name], shape)

    write_llama_gguf(path, shape, vocab, "f32", source, name="one-layer")
    return path


def chat_that_overflows(model: LlamaCppLoader) -> tuple[list[int], list[int]]:
    """(what the slot's cache holds, the next prompt with the two oldest turns dropped)."""
    pinned = model.encode("System: you are the keeper of the old lighthouse by the sea.\n")
    turns = [model.encode(f"User: tell me about day {n} at the lighthouse and the ships.\nBot: it was day {n}.\n",
                          add_bos=False) for n in range(6)]
    cached = pinned + sum(turns, [])
    prompt = pinned + sum(turns[2:], []) + model.encode("User: and the storm?\nBot:", add_bos=False)
    return cached, prompt


def test_context_shift_gives_what_a_fresh_evaluation_gives(tmp_path: Path) -> None:
    path = one_layer_gguf(tmp_path)
    params = GREEDY.replace(max_new_tokens=32)
    fresh = LlamaCppLoader.load(path, options())
    shifted = LlamaCppLoader.load(path, options())
    try:
        cached, prompt = chat_that_overflows(shifted)
        run(shifted, cached, params.replace(max_new_tokens=1))  # the slot now holds the whole chat
        got = run(shifted, prompt, params)
        assert shifted.last_shifted_tokens > 100  # the kept turns moved, not re-evaluated
        assert shifted.last_reused_tokens == len(prompt) - len(shifted.encode("User: and the storm?\nBot:",
                                                                             add_bos=False))
        assert got == run(fresh, prompt, params)
        assert fresh.last_shifted_tokens == 0
    finally:
        fresh.unload()
        shifted.unload()


def test_without_context_shift_a_deeper_model_gets_exactly_a_fresh_read(tiny_kit: TinyKit) -> None:
    """With two layers the kept turns' keys and values were computed beside the dropped
    turns, so a shift (like koboldcpp's ContextShift) only approximates a fresh read; on this
    random model the replies part at once. `no_context_shift` re-reads them: exact."""
    params = GREEDY.replace(max_new_tokens=32)
    fresh = LlamaCppLoader.load(tiny_kit.gguf_f32, options())
    exact = LlamaCppLoader.load(tiny_kit.gguf_f32, options(no_context_shift=True))
    try:
        cached, prompt = chat_that_overflows(exact)
        run(exact, cached, params.replace(max_new_tokens=1))
        got = run(exact, prompt, params)
        assert exact.last_shifted_tokens == 0
        assert exact.last_reused_tokens == common_prefix(cached, prompt)  # the pinned start and no more
        assert got == run(fresh, prompt, params)
    finally:
        fresh.unload()
        exact.unload()


# --- through the engine ----------------------------------------------------------------
def test_the_generator_serves_as_many_requests_at_once_as_the_model_has_slots(tiny_kit: TinyKit) -> None:
    app = App.create(Settings(models_dir=str(tiny_kit.root), threads=1, threads_batch=1, cache_type="f32",
                              no_flash_attn=True, parallel=3), Path("."))
    try:
        app.models.load(tiny_kit.gguf_f32.name)
        model = app.models.require()
        prompts = PROMPTS[:5]
        want = [model.decode(run(model, model.encode(p))) for p in prompts]  # type: ignore[arg-type]
        streams = [app.generator.submit(p, GREEDY) for p in prompts]
        texts = [s.result().text for s in streams]
        assert [t.replace("\ufffd", "") for t in texts] == [w.replace("\ufffd", "") for w in want]
        assert app.generator.running == 0
    finally:
        app.models.unload()


def test_a_repeated_request_gives_its_first_answer_from_the_cache(tmp_path: Path) -> None:
    """The second run finds all but the last prompt token cached; it must still compute the
    same logits as the first run. Batch shapes change llama.cpp's Q8_0 rounding on a wide
    enough model with 2 threads, so the last prompt token always gets a step of its own."""
    tokenizer = train_tokenizer()
    vocab = vocab_info(tokenizer)
    shape = dataclasses.replace(tiny_shape(len(vocab.tokens)), hidden=1024, heads=16, kv_heads=16, ffn=2048)
    weights = random_llama_weights(shape, seed=0)
    path = write_llama_gguf(tmp_path / "wide-q8_0.gguf", shape, vocab, "q8_0",
                            lambda g, hf, _s: hf_to_gguf_tensor(g, weights[hf], shape), name="wide")
    model = LlamaCppLoader.load(path, LlamaCppOptions(threads=2, threads_batch=2))
    try:
        params = SamplingParams(temperature=0, max_new_tokens=24, logprobs=1)
        for n in range(12):
            ids = model.encode(f"Prompt {n}: the old lighthouse keeper climbed the stairs one last time and " * 2)
            runs = []
            for _ in range(2):
                run_ = []
                for step in model.generate(ids, params, threading.Event()):
                    run_.append((step.token, step.logprobs.logprob))  # type: ignore[union-attr]
                runs.append(run_)
            assert model.last_reused_tokens == len(ids) - 1
            assert runs[1] == runs[0], n
    finally:
        model.unload()
