"""Lazy grammars on llama.cpp (`grammar_triggers`): free text until a trigger matches, the
grammar from the match (or its first group) on; on one slot and on parallel slots; triggers
llama.cpp could not compile refused by name instead of aborting the process.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator

import pytest

pytest.importorskip("llama_cpp")

from loaders.llama_cpp import LlamaCppLoader, LlamaCppOptions  # noqa: E402
from loaders.llama_cpp_sampler import check_trigger_pattern, never_utf8_tokens  # noqa: E402
from modules.core.errors import InvalidRequestError  # noqa: E402
from modules.core.sampling import SamplingParams  # noqa: E402
from modules.engine.grammars import GrammarBuilder  # noqa: E402
from tests.kit import TinyKit  # noqa: E402

PROMPT = "Once upon a time"
SEEDS = range(5)


def tool_grammar() -> str:
    builder = GrammarBuilder("tools")
    args = builder.add_schema("args", {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 99}},
                                       "required": ["n"]})
    return builder.build(f'"<tool_call>" {args} "</tool_call>"')


def options(**changes: object) -> LlamaCppOptions:
    return LlamaCppOptions(threads=1, threads_batch=1, cache_type="f32", no_flash_attn=True,  # type: ignore[arg-type]
                           ctx_size=512, **changes)


@pytest.fixture(scope="module")
def single(tiny_kit: TinyKit) -> Iterator[LlamaCppLoader]:
    model = LlamaCppLoader.load(tiny_kit.gguf_f32, options())
    yield model
    model.unload()


@pytest.fixture(scope="module")
def three(tiny_kit: TinyKit) -> Iterator[LlamaCppLoader]:
    model = LlamaCppLoader.load(tiny_kit.gguf_f32, options(parallel=3))
    yield model
    model.unload()


def lazy_params(model: LlamaCppLoader, seed: int, **more: object) -> SamplingParams:
    # "<" opens the tag: a bias makes the random model write it soon, the grammar does the rest.
    opener = model.encode("<", add_bos=False)
    assert len(opener) == 1
    return SamplingParams(temperature=1.0, seed=seed, max_new_tokens=120, grammar_string=tool_grammar(),
                          grammar_triggers=["<"], logit_bias={opener[0]: 6.0}, **more)  # type: ignore[arg-type]


def reply(model: LlamaCppLoader, params: SamplingParams) -> str:
    tokens = [s.token for s in model.generate(model.encode(PROMPT), params, threading.Event())]
    assert tokens[-1] in model.info.eos_token_ids, model.decode(tokens)  # the grammar completed
    return model.decode(tokens[:-1])


def assert_free_then_call(text: str) -> bool:
    free, sep, rest = text.partition("<")
    assert sep, text
    match = re.fullmatch(r"<tool_call>(.*)</tool_call>", sep + rest, re.S)
    assert match, text
    assert 0 <= json.loads(match.group(1))["n"] <= 99
    return bool(free)


def test_free_text_before_the_trigger_and_the_grammar_after(single: LlamaCppLoader) -> None:
    free_seen = [assert_free_then_call(reply(single, lazy_params(single, seed))) for seed in SEEDS]
    assert any(free_seen)  # the text before the trigger was not constrained


def test_a_trigger_that_never_matches_leaves_the_output_free(single: LlamaCppLoader) -> None:
    # Under any grammar llama.cpp never samples tokens that are not UTF-8: the same ban here.
    never = never_utf8_tokens(single._lib, single._vocab, single.info.vocab_size)
    plain = SamplingParams(temperature=1.0, seed=3, max_new_tokens=12, custom_token_bans=list(never))
    free = [s.token for s in single.generate(single.encode(PROMPT), plain, threading.Event())]
    lazy = plain.replace(grammar_string=tool_grammar(), grammar_triggers=["NEVER_SAID"])
    assert [s.token for s in single.generate(single.encode(PROMPT), lazy, threading.Event())] == free


def test_the_first_group_starts_the_grammar_inside_the_match(single: LlamaCppLoader) -> None:
    # The match covers the free text too; the grammar sees only the group on. (An empty group
    # counts as none in llama.cpp: the whole match would go to the grammar, see the docs.)
    for seed in SEEDS:
        params = lazy_params(single, seed).replace(grammar_triggers=[r"^[\s\S]*?(<)$"])
        assert_free_then_call(reply(single, params))


def test_parallel_slots_each_follow_their_own_lazy_grammar(single: LlamaCppLoader, three: LlamaCppLoader) -> None:
    jobs = [lazy_params(three, seed) for seed in SEEDS]
    out: dict[int, str] = {}

    def worker(i: int) -> None:
        out[i] = reply(three, jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(out) == len(jobs)
    for i in range(len(jobs)):
        assert_free_then_call(out[i])
        assert out[i] == reply(single, jobs[i])  # a slot in a batch samples as it does alone


@pytest.mark.parametrize("pattern, word", [("(?s)a", "groups"), ("{", "escaped"), (r"\A<", "escape"),
                                           ("[]a]", "class"), ("(", "valid regular expression"),
                                           ("x" * 2000, "longer")])
def test_triggers_llama_cpp_cannot_compile_are_refused_by_name(single: LlamaCppLoader, pattern: str,
                                                                word: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        check_trigger_pattern(pattern)
    assert err.value.param == "grammar_triggers" and word in str(err.value)
    params = SamplingParams(grammar_string='root ::= "a"', grammar_triggers=[pattern])
    with pytest.raises(InvalidRequestError) as err:
        list(single.generate(single.encode(PROMPT), params, threading.Event()))
    assert err.value.param == "grammar_triggers"


def test_a_bad_lazy_grammar_is_refused_naming_grammar_string(single: LlamaCppLoader) -> None:
    params = SamplingParams(grammar_string="root ::= (", grammar_triggers=["<"])
    with pytest.raises(InvalidRequestError) as err:
        list(single.generate(single.encode(PROMPT), params, threading.Event()))
    assert err.value.param == "grammar_string"
