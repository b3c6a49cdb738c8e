"""The generator's token loop, on the scripted fake loader."""

from __future__ import annotations

import threading

import pytest

from loaders.base import TokenLogprobs, concurrency_of
from modules.core.errors import ContextLengthExceededError, InvalidRequestError, ModelNotLoadedError
from modules.core.sampling import SamplingParams
from tests.fakes import BOS, EOS, script_text

GREEDY = SamplingParams(temperature=0, max_new_tokens=40)


def collect(app, prompt="hi", params=GREEDY):
    chunks = list(app.generator.submit(prompt, params))
    return chunks, chunks[-1]


def test_deltas_add_up_to_the_text_and_end_on_eos(app, fake):
    fake.script = script_text("Hello there") + [EOS] + script_text("never")
    chunks, last = collect(app)
    assert last.text == "Hello there"
    assert "".join(c.delta for c in chunks) == last.text
    assert last.finish_reason == "stop"
    assert last.completion_tokens == len("Hello there")
    assert last.prompt_tokens == 3  # BOS + "hi"


def test_stop_string_split_across_tokens_never_leaks(app, fake):
    fake.script = script_text("Sure.\nUser: more")
    chunks, last = collect(app, params=GREEDY.replace(stop=["\nUser:"]))
    assert last.text == "Sure."
    assert last.finish_reason == "stop"
    assert all("\n" not in c.delta and "User" not in c.delta for c in chunks)


def test_partial_stop_prefix_is_released_when_no_stop_follows(app, fake):
    fake.script = script_text("a\nUs") + [EOS]
    _, last = collect(app, params=GREEDY.replace(stop=["\nUser:"]))
    assert last.text == "a\nUs"


def test_earliest_of_several_stop_strings_wins(app, fake):
    fake.script = script_text("one ### two </s> three")
    _, last = collect(app, params=GREEDY.replace(stop=["</s>", "###"]))
    assert last.text == "one "


def test_multibyte_utf8_is_never_split(app, fake):
    text = "Привет, мир 🙂 你好"
    fake.script = script_text(text) + [EOS]
    chunks, last = collect(app)
    assert last.text == text
    assert all("\ufffd" not in c.delta for c in chunks)
    assert "".join(c.delta for c in chunks) == text


def test_stop_string_made_of_multibyte_characters(app, fake):
    fake.script = script_text("да 🙂 нет")
    _, last = collect(app, params=GREEDY.replace(stop=["🙂"]))
    assert last.text == "да "


def test_max_new_tokens_ends_with_length(app, fake):
    fake.script = script_text("abcdefghij")
    _, last = collect(app, params=GREEDY.replace(max_new_tokens=4))
    assert last.text == "abcd"
    assert last.finish_reason == "length"


def test_ban_eos_keeps_going_past_eos(app, fake):
    fake.script = script_text("ab") + [EOS] + script_text("cd")
    _, last = collect(app, params=GREEDY.replace(ban_eos_token=True))
    assert last.text == "abcd"


def test_prompt_is_left_truncated_to_fit_and_keeps_bos(app, fake):
    fake.script = script_text("x") + [EOS]
    prompt = "".join(chr(ord("a") + i % 26) for i in range(100))  # 101 ids with BOS; context is 64
    _, last = collect(app, prompt, GREEDY.replace(max_new_tokens=10, truncation_length=40))
    seen = fake.seen_prompts[-1]
    assert len(seen) == 30
    assert seen[0] == BOS
    assert bytes(seen[1:]).decode() == prompt[-29:]
    assert last.truncated_tokens == 101 - 30


def test_truncation_length_is_capped_by_the_model_context(app, fake):
    fake.script = [EOS]
    collect(app, "y" * 200, GREEDY.replace(max_new_tokens=4, truncation_length=100000))
    assert len(fake.seen_prompts[-1]) == 64 - 4


def test_no_room_for_the_prompt_is_a_clear_error(app, fake):
    with pytest.raises(ContextLengthExceededError, match="max_new_tokens"):
        collect(app, "hi", GREEDY.replace(max_new_tokens=64))


def test_cancel_mid_stream_stops_within_one_token(app, fake):
    fake.script = script_text("a" * 50)
    fake.step_delay = 0.002
    stream = app.generator.submit("hi", GREEDY.replace(max_new_tokens=50))
    got = []
    for chunk in stream:
        got.append(chunk)
        if len(got) == 5:
            stream.cancel()
    assert got[-1].finish_reason == "cancelled"
    assert got[-1].completion_tokens <= 6
    assert fake.steps <= 7


def test_abandoned_stream_is_cancelled(app, fake):
    fake.script = script_text("b" * 50)
    fake.step_delay = 0.002
    stream = app.generator.submit("hi", GREEDY.replace(max_new_tokens=50))
    it = iter(stream)
    next(it)
    it.close()  # the consumer went away (closed tab, dropped connection)
    app.generator.generate("again", GREEDY.replace(max_new_tokens=1))  # the queue moves on
    assert fake.steps < 50


def test_requests_are_served_in_order_and_a_cancelled_queued_one_never_runs(app, fake):
    fake.script = script_text("c" * 50)
    fake.step_delay = 0.002
    first = app.generator.submit("1", GREEDY.replace(max_new_tokens=20))
    second = app.generator.submit("2", GREEDY.replace(max_new_tokens=20))
    second.cancel()
    third = app.generator.submit("3", GREEDY.replace(max_new_tokens=5))
    assert first.result().text == "c" * 20
    assert second.result().finish_reason == "cancelled"
    assert third.result().text == "c" * 5
    assert [bytes(p[1:]).decode() for p in fake.seen_prompts] == ["1", "3"]


def test_a_seed_is_drawn_and_reported_when_none_is_given(app, fake):
    fake.script = [EOS]
    _, last = collect(app, params=GREEDY)
    assert isinstance(last.seed, int)
    assert fake.seen_params[-1].seed == last.seed
    _, last = collect(app, params=GREEDY.replace(seed=1234))
    assert last.seed == 1234


def test_no_model_loaded_is_a_clear_error(app):
    with pytest.raises(ModelNotLoadedError, match="Model tab"):
        app.generator.generate("hi", GREEDY)


def test_generation_waits_for_nothing_after_an_error(app, fake):
    with pytest.raises(ContextLengthExceededError):
        app.generator.generate("hi", GREEDY.replace(max_new_tokens=500))
    fake.script = script_text("ok") + [EOS]
    assert app.generator.generate("hi", GREEDY).text == "ok"


def test_load_waits_for_a_running_generation(app, fake):
    fake.script = script_text("d" * 40)
    fake.step_delay = 0.005
    stream = app.generator.submit("hi", GREEDY.replace(max_new_tokens=40))
    it = iter(stream)
    next(it)
    done = threading.Event()
    loader = threading.Thread(target=lambda: (app.models.load("fake.gguf", loader="fake"), done.set()))
    loader.start()
    rest = list(it)
    loader.join(5)
    assert done.is_set()
    assert rest[-1].text == "d" * 40  # the reply finished on the old model before the load ran
    assert fake.unloaded


def test_verbose_logs_the_prompt_the_model_sees(app, fake, caplog):
    fake.script = [EOS]
    with caplog.at_level("DEBUG", logger="modules.engine.generation"):
        collect(app, "secret prompt")
    assert any("secret prompt" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("INFO", logger="modules.engine.generation"):
        collect(app, "quiet prompt")
    assert not any("quiet prompt" in r.getMessage() for r in caplog.records)


def test_cancel_all_stops_running_and_queued_generations(app, fake):
    fake.script = script_text("e" * 40)
    fake.step_delay = 0.005
    running = app.generator.submit("1", GREEDY)
    queued = app.generator.submit("2", GREEDY)
    next(iter(running))
    assert app.generator.cancel_all() == 2
    assert running.result().finish_reason == "cancelled"
    assert queued.result().finish_reason == "cancelled"
    assert app.generator.cancel_all() == 0


# --- several at once -------------------------------------------------------------------
def test_requests_run_side_by_side_up_to_the_models_slots(app, fake):
    fake.parallel = 3
    fake.script = script_text("abcdefgh")
    fake.step_delay = 0.02
    running, peak, lock = [0], [0], threading.Lock()
    original = fake.generate

    def counting(prompt_ids, params, stop_event):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            yield from original(prompt_ids, params, stop_event)
        finally:
            with lock:
                running[0] -= 1

    fake.generate = counting
    streams = [app.generator.submit(f"p{i}", GREEDY) for i in range(7)]
    assert [s.result().text for s in streams] == ["abcdefgh"] * 7
    assert peak[0] == 3  # never more than the slots, and all of them used


def test_a_load_waits_for_every_running_request(app, fake):
    fake.parallel = 2
    fake.script = script_text("x" * 30)
    fake.step_delay = 0.01
    readers = [iter(app.generator.submit("hi", GREEDY)) for _ in range(2)]
    assert all(next(r).delta == "x" for r in readers)  # both are running
    app.models.unload()  # waits for both to end: none is cut off by the unload
    assert fake.unloaded
    for reader in readers:
        last = list(reader)[-1]
        assert last.text == "x" * 30 and last.finish_reason == "length"


# --- the loader contract as the engine uses it -------------------------------------------
def test_chunks_carry_the_logprobs_their_steps_brought(app, fake):
    fake.script = script_text("ab") + [EOS]
    fake.report_logprobs([TokenLogprobs(-0.5, ((ord("a"), -0.5), (ord("z"), -1.5))),
                          TokenLogprobs(-2.0, ((ord("y"), -0.1), (ord("b"), -2.0)))])
    chunks, last = collect(app, params=GREEDY.replace(logprobs=2))
    steps = [lp for c in chunks for lp in c.logprobs]
    assert [(s.text, s.logprob, s.top) for s in steps] == [
        ("a", -0.5, (("a", -0.5), ("z", -1.5))), ("b", -2.0, (("y", -0.1), ("b", -2.0)))]
    assert len(steps) == last.completion_tokens == 2


def test_logprobs_from_a_loader_without_the_capability_are_refused_by_name(app, fake):
    fake.script = script_text("ab")
    with pytest.raises(InvalidRequestError, match="fake loader cannot report token probabilities") as err:
        app.generator.generate("hi", GREEDY.replace(logprobs=1))
    assert err.value.param == "logprobs"
    assert fake.seen_prompts == []  # refused before the loader saw it


def test_token_ids_outside_the_vocabulary_are_dropped_once_with_a_warning(app, fake, caplog):
    fake.script = script_text("abc") + [EOS]  # the fake refuses out-of-vocabulary ids outright
    params = GREEDY.replace(logit_bias={ord("x"): 2.0, 10**6: 5.0}, custom_token_bans=[ord("b"), 258])
    with caplog.at_level("WARNING", logger="loaders.base"):
        assert app.generator.generate("hi", params).text == "ac"  # the in-vocabulary ban holds
    seen = fake.seen_params[-1]
    assert seen.logit_bias == {ord("x"): 2.0} and seen.custom_token_bans == [ord("b")]
    assert any("outside the vocabulary" in r.getMessage() and "1000000" in r.getMessage() for r in caplog.records)


def test_concurrency_is_the_declared_parallel(app, fake):
    assert concurrency_of(fake) == 1 and concurrency_of(None) == 1
    fake.parallel = 4
    assert concurrency_of(fake) == 4


def test_a_prompt_with_a_lone_surrogate_is_refused_before_any_tokenizer(app, fake):
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        app.generator.submit("hi \ud83d there", SamplingParams(max_new_tokens=2))
    assert app.generator.waiting == 0  # its place in the queue was given back
    assert app.generator.generate("hi", SamplingParams(max_new_tokens=2)).finish_reason
