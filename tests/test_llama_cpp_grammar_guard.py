"""A grammar on llama.cpp never takes the process down, whatever the sampling settings.

llama.cpp's grammar throws through its C API (an abort) when made to accept a token it
rejects; that happened when settings at the edges of 32-bit floats turned the logits into
NaN or +inf and the pick landed on a masked token (found by the API fuzzer: a repetition
penalty of 5e-324 rounds to 0, and -inf * 0 is NaN). The guard in front of the grammar
refuses such a token, and the request ends with a 400-class error naming the grammar. An
abort here would end the whole test run, so these tests fail loudly without the guard.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

pytest.importorskip("llama_cpp")

from loaders.llama_cpp import LlamaCppLoader, LlamaCppOptions  # noqa: E402
from modules.core.errors import InvalidRequestError  # noqa: E402
from modules.core.sampling import SamplingParams  # noqa: E402
from modules.engine.grammars import GrammarBuilder  # noqa: E402
from tests.kit import TinyKit  # noqa: E402

#: Settings that break float32 arithmetic in llama.cpp's samplers (each aborted the process).
EXTREMES = {
    "repetition penalty that rounds to 0": {"temperature": 0, "repetition_penalty": 5e-324},
    "temperature below the smallest float": {"temperature": 1e-40},
    "temperature past the largest float": {"temperature": 1e39},
    "bias past the largest float": {"temperature": 1.0, "logit_bias": {5: 1e300, 6: -1e300}},
}


def any_json() -> str:
    builder = GrammarBuilder("guard")
    return builder.build(builder.add_schema("value", {}))


@pytest.fixture(scope="module")
def model(tiny_kit: TinyKit) -> Iterator[LlamaCppLoader]:
    loaded = LlamaCppLoader.load(tiny_kit.gguf_f32, LlamaCppOptions(  # type: ignore[arg-type]
        threads=1, threads_batch=1, cache_type="f32", no_flash_attn=True, ctx_size=512, parallel=2))
    yield loaded
    loaded.unload()


def run(model: LlamaCppLoader, **settings: object) -> str:
    params = SamplingParams(**{"seed": 1, "max_new_tokens": 12, "grammar_string": any_json(), **settings})  # type: ignore[arg-type]
    ids = [step.token for step in model.generate(model.encode("hi"), params, threading.Event())]
    return model.decode(ids)


@pytest.mark.parametrize("settings", EXTREMES.values(), ids=EXTREMES.keys())
def test_settings_that_break_the_arithmetic_end_the_request_not_the_process(
    model: LlamaCppLoader, settings: dict
) -> None:
    try:
        run(model, **settings)
    except InvalidRequestError as exc:
        assert exc.param == "grammar_string" and "32-bit floats" in str(exc)
    # The model serves on, on the same slots, with the grammar enforced.
    text = run(model, temperature=0, max_new_tokens=60).lstrip()
    assert text[:1] in set('{["-0123456789tfn'), text


def test_the_guard_catches_the_penalty_that_rounds_to_zero(model: LlamaCppLoader) -> None:
    # BOS (id 0) is in the penalised history: -inf * 0 makes its logit NaN and greedy picks it.
    with pytest.raises(InvalidRequestError, match="no token the grammar allows"):
        run(model, temperature=0, repetition_penalty=5e-324)


def test_xtc_with_threshold_zero_keeps_to_the_grammar(model: LlamaCppLoader) -> None:
    # A 0 threshold counted the masked tokens (probability 0) as likely and kept one alone.
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=12, xtc_probability=1.0,
                                xtc_threshold=0.0, grammar_string=any_json())
        assert list(model.generate(model.encode("hi"), params, threading.Event()))


def test_a_rejected_token_leaves_the_other_slot_running(model: LlamaCppLoader) -> None:
    results: dict[str, object] = {}

    def good() -> None:
        results["good"] = run(model, temperature=0, max_new_tokens=40)

    worker = threading.Thread(target=good)
    worker.start()
    with pytest.raises(InvalidRequestError):
        run(model, temperature=0, repetition_penalty=5e-324)
    worker.join(60)
    assert isinstance(results.get("good"), str) and results["good"]
