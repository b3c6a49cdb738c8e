"""The Transformers loader serving several generations at once (parallel > 1, one batched
forward per step): outputs equal to each request alone, isolation of cancels and failures,
logprobs carried by each request's own steps, and the scheduler's lifecycle."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from loaders.base import concurrency_of  # noqa: E402
from loaders.transformers import TransformersLoader, TransformersOptions  # noqa: E402
from loaders.transformers_batch import SHARED_PREFILL_CHUNK  # noqa: E402
from modules.core.errors import (  # noqa: E402
    GenerationError,
    InvalidRequestError,
    ModelNotLoadedError,
    UnsupportedOptionError,
)
from modules.core.sampling import SamplingParams  # noqa: E402
from tests.kit import TinyKit  # noqa: E402

GREEDY = SamplingParams(temperature=0)
N_TOKENS = 40
TEXTS = (
    "The old lighthouse keeper climbed the stairs one last time and",
    "Once",
    "She opened the letter, read the first line twice and",
    "Rain again.",
)
TIMEOUT = 30


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def alone(tiny_kit: TinyKit) -> Iterator[TransformersLoader]:
    loaded = TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions(cpu=True))
    yield loaded
    loaded.unload()


@pytest.fixture(scope="module")
def batched(tiny_kit: TinyKit) -> Iterator[TransformersLoader]:
    loaded = TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions(cpu=True, parallel=4))
    yield loaded
    loaded.unload()


def long_prompt(model: TransformersLoader, tokens: int) -> list[int]:
    """A prompt of exactly `tokens` ids, longer than one shared prefill chunk when asked."""
    ids = model.encode(" ".join(TEXTS) * 40)
    assert len(ids) >= tokens
    return ids[:tokens]


def take(model: TransformersLoader, ids: list[int], n: int = N_TOKENS,
         params: SamplingParams = GREEDY) -> list[int]:
    return [step.token for step in islice(model.generate(ids, params, threading.Event()), n)]


def in_threads(*jobs: Callable[[], Any]) -> list[Any]:
    """Run each job in its own thread; their results (or the exception each raised)."""
    results: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except Exception as exc:  # noqa: BLE001 - returned for the test to check
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "a consumer hung"
    return results


def after(seconds: float, job: Callable[[], Any]) -> Callable[[], Any]:
    def delayed() -> Any:
        time.sleep(seconds)
        return job()

    return delayed


# --- the option ---------------------------------------------------------------------------
def test_parallel_option_declares_the_concurrency(batched: TransformersLoader, alone: TransformersLoader) -> None:
    assert concurrency_of(batched) == 4 and batched.info.metadata["parallel"] == 4
    assert concurrency_of(alone) == 1 and alone._scheduler is None


def test_parallel_below_one_is_refused(tiny_kit: TinyKit) -> None:
    with pytest.raises(UnsupportedOptionError, match="parallel"):
        TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions(cpu=True, parallel=0))


def test_a_cache_that_cannot_be_batched_falls_back_to_one_at_a_time(tiny_kit: TinyKit, tmp_path: Any) -> None:
    """A sliding-window model (Mistral's DynamicSlidingWindowLayer) is served alone, and says why."""
    import json
    import shutil

    from transformers import MistralConfig, MistralForCausalLM

    folder = tmp_path / "tiny-mistral-sliding"
    shutil.copytree(tiny_kit.hf_dir, folder)
    (folder / "model.safetensors").unlink()
    vocab = json.loads((tiny_kit.hf_dir / "config.json").read_text())["vocab_size"]
    config = MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    MistralForCausalLM(config).save_pretrained(str(folder))
    model = TransformersLoader.load(folder, TransformersOptions(cpu=True, parallel=4))
    try:
        assert concurrency_of(model) == 1 and model._scheduler is None
        assert "SlidingWindow" in model.info.metadata["parallel_note"]
        assert len(take(model, model.encode(TEXTS[1]), 4)) == 4
    finally:
        model.unload()


# --- equality with each request alone -------------------------------------------------------
def test_concurrent_greedy_equals_each_request_alone(
    batched: TransformersLoader, alone: TransformersLoader
) -> None:
    """Different prompt lengths (one longer than a shared prefill chunk), staggered starts."""
    prompts = [batched.encode(t) for t in TEXTS[:3]] + [long_prompt(batched, SHARED_PREFILL_CHUNK * 2 + 17)]
    expected = [take(alone, p) for p in prompts]
    got = in_threads(*(after(0.02 * i, lambda p=p: take(batched, p)) for i, p in enumerate(prompts)))
    assert got == expected
    assert batched._scheduler is not None and batched._scheduler.peak_rows >= 2


def test_requests_joining_a_running_batch_match_alone(
    batched: TransformersLoader, alone: TransformersLoader
) -> None:
    """A shorter and a longer prompt join while a row is mid-generation (padding on either side)."""
    first, short, longer = batched.encode(TEXTS[0]), batched.encode(TEXTS[1]), long_prompt(batched, 90)
    expected = [take(alone, p, 60) for p in (first, short, longer)]
    running = threading.Event()

    def slow_first() -> list[int]:
        out = []
        for step in islice(batched.generate(first, GREEDY, threading.Event()), 60):
            out.append(step.token)
            if len(out) == 5:
                running.set()
            time.sleep(0.002)
        return out

    def joiner(ids: list[int]) -> Callable[[], list[int]]:
        def job() -> list[int]:
            assert running.wait(TIMEOUT)
            return take(batched, ids, 60)

        return job

    assert in_threads(slow_first, joiner(short), joiner(longer)) == expected


def test_seeded_sampling_is_per_request(batched: TransformersLoader, alone: TransformersLoader) -> None:
    """Each request draws from its own seeded generator, whatever runs beside it."""
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=s) for s in (1, 2, 3)]
    ids = batched.encode(TEXTS[0])
    expected = [take(alone, ids, 24, p) for p in params]
    assert in_threads(*(lambda p=p: take(batched, ids, 24, p) for p in params)) == expected


def test_logprobs_travel_with_each_requests_steps(batched: TransformersLoader, alone: TransformersLoader) -> None:
    """Each step carries its own request's numbers, whatever runs beside it."""
    params = SamplingParams(temperature=0, logprobs=3)

    def with_numbers(model: TransformersLoader, ids: list[int]) -> list[tuple[int, int, float]]:
        out = []
        for step in islice(model.generate(ids, params, threading.Event()), 16):
            numbers = step.logprobs
            assert numbers is not None
            out.append((step.token, numbers.top[0][0], numbers.logprob))
        return out

    prompts = [batched.encode(t) for t in TEXTS[:3]]
    expected = [with_numbers(alone, p) for p in prompts]
    got = in_threads(*(lambda p=p: with_numbers(batched, p) for p in prompts))
    for mine, theirs in zip(got, expected, strict=True):
        assert [m[:2] for m in mine] == [t[:2] for t in theirs]
        assert [m[2] for m in mine] == pytest.approx([t[2] for t in theirs], abs=1e-4)


# --- fairness -----------------------------------------------------------------------------
def test_a_short_request_finishes_while_a_long_one_runs(batched: TransformersLoader) -> None:
    long_ids, short_ids = batched.encode(TEXTS[0]), batched.encode(TEXTS[3])
    short_done = threading.Event()
    long_count_then: list[int] = []

    def long_job() -> int:
        count = 0
        for _ in islice(batched.generate(long_ids, GREEDY, threading.Event()), 1500):
            count += 1
            if short_done.is_set() and not long_count_then:
                long_count_then.append(count)
                break
        return count

    def short_job() -> list[int]:
        time.sleep(0.05)
        out = take(batched, short_ids, 20)
        short_done.set()
        return out

    _, short = in_threads(long_job, short_job)
    assert len(short) == 20
    assert long_count_then, "the short request only finished after the long one"


def test_a_long_prompt_is_evaluated_in_chunks_between_decode_steps(
    batched: TransformersLoader, alone: TransformersLoader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running rows get a decode step after every prompt chunk of a newcomer."""
    scheduler = batched._scheduler
    assert scheduler is not None
    real, calls = scheduler._forward, []

    def recording(ids: Any, cache: Any, mask: Any, positions: Any) -> Any:
        calls.append(("decode" if mask is not None else "prefill", ids.shape[1]))
        return real(ids, cache, mask, positions)

    monkeypatch.setattr(scheduler, "_forward", recording)
    running = threading.Event()
    newcomer = long_prompt(batched, SHARED_PREFILL_CHUNK * 4 + 5)

    def first() -> list[int]:
        out = []
        for step in islice(batched.generate(batched.encode(TEXTS[0]), GREEDY, threading.Event()), 300):
            out.append(step.token)
            if len(out) == 3:
                running.set()
        return out

    def second() -> list[int]:
        assert running.wait(TIMEOUT)
        return take(batched, newcomer, 10)

    _, got = in_threads(first, second)
    assert got == take(alone, newcomer, 10)
    chunks = [i for i, (kind, width) in enumerate(calls) if kind == "prefill" and width > 1 and i > 0]
    assert len(chunks) >= 5 and all(calls[i][1] <= SHARED_PREFILL_CHUNK for i in chunks)
    assert all(calls[i + 1][0] == "decode" for i in chunks[:-1])


# --- isolation ----------------------------------------------------------------------------
def test_a_cancelled_request_leaves_the_others_running(
    batched: TransformersLoader, alone: TransformersLoader
) -> None:
    keep, drop = batched.encode(TEXTS[0]), batched.encode(TEXTS[2])
    expected = take(alone, keep, 60)
    stop = threading.Event()

    def cancelled() -> int:
        count = 0
        for _ in batched.generate(drop, GREEDY, stop):
            count += 1
            if count == 5:
                stop.set()
        return count

    def closed_early() -> list[int]:
        return take(batched, drop, 3)  # islice drops the iterator: the row is dropped

    kept, count, early = in_threads(lambda: take(batched, keep, 60), cancelled, closed_early)
    assert kept == expected
    assert count == 5  # nothing is yielded once the stop event is set
    assert early == take(alone, drop, 3)


def test_a_failing_sampler_fails_only_its_request(
    batched: TransformersLoader, alone: TransformersLoader
) -> None:
    ids = batched.encode(TEXTS[0])
    everything_banned = SamplingParams(temperature=0, custom_token_bans=list(range(batched.info.vocab_size)))
    good, bad = in_threads(lambda: take(batched, ids), lambda: take(batched, ids, params=everything_banned))
    assert good == take(alone, ids)
    assert isinstance(bad, InvalidRequestError)


def test_a_failing_forward_is_raised_in_every_row_and_the_model_recovers(
    batched: TransformersLoader, alone: TransformersLoader, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = batched._scheduler
    assert scheduler is not None
    real = scheduler._forward
    decode_steps = {"n": 0}
    both_running = threading.Barrier(2)

    def flaky(ids: Any, cache: Any, mask: Any, positions: Any) -> Any:
        if mask is not None and ids.shape[0] == 2:
            decode_steps["n"] += 1
            if decode_steps["n"] == 3:
                raise GenerationError("the model failed during generation: injected")
        return real(ids, cache, mask, positions)

    monkeypatch.setattr(scheduler, "_forward", flaky)
    prompts = [batched.encode(t) for t in TEXTS[:2]]

    def job(ids: list[int]) -> Callable[[], list[int]]:
        def run() -> list[int]:
            both_running.wait(TIMEOUT)
            return take(batched, ids, 200)

        return run

    results = in_threads(job(prompts[0]), job(prompts[1]))
    assert all(isinstance(r, GenerationError) and "injected" in str(r) for r in results), results
    monkeypatch.setattr(scheduler, "_forward", real)
    assert take(batched, prompts[0]) == take(alone, prompts[0])


# --- lifecycle ----------------------------------------------------------------------------
def test_unload_stops_the_scheduler_and_ends_open_generations(tiny_kit: TinyKit) -> None:
    model = TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions(cpu=True, parallel=2))
    scheduler = model._scheduler
    assert scheduler is not None
    tokens = model.generate(model.encode(TEXTS[0]), GREEDY, threading.Event())
    next(tokens)
    model.unload()
    assert scheduler._thread is not None and not scheduler._thread.is_alive()
    with pytest.raises(ModelNotLoadedError):
        list(islice(tokens, 10_000))  # queued tokens may come first, then the unload
    with pytest.raises(ModelNotLoadedError):
        next(model.generate([1, 2, 3], GREEDY, threading.Event()))
