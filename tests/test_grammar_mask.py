"""GBNF grammars on the torch loaders (loaders/grammar_mask.py over llguidance), on the tiny
kit's random-weight HF model: at temperature 1 only the grammar makes the output valid.

Covers: yes/no and a JSON schema's GBNF always obeyed (alone and batched), lazy triggers
(free text, then the grammar from the match), EOS masked until the grammar is complete and
forced once nothing may follow, bad grammars and triggers refused by name with the library's
message, one compilation per distinct grammar (LRU), logprobs unchanged, and the plain
sampler chain (no wrapper, no mask) when there is no grammar.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llguidance")
jsonschema_rs = pytest.importorskip("jsonschema_rs")

from loaders.grammar_mask import ConstrainedChain, GrammarCompiler  # noqa: E402
from loaders.torch_samplers import SamplerChain  # noqa: E402
from loaders.transformers import TransformersLoader, TransformersOptions  # noqa: E402
from modules.core.errors import InvalidRequestError  # noqa: E402
from modules.core.sampling import SamplingParams  # noqa: E402
from tests.kit import TinyKit  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPT = "The old lighthouse keeper climbed the stairs"
YES_NO = 'root ::= "yes" | "no"'
#: The GBNF of PERSON_SCHEMA, written by hand: strings and arrays are bounded so that a
#: random model, which never wants to close a string, still finishes within the budget.
PERSON_GBNF = r"""
root ::= "{" ws "\"name\":" ws string "," ws "\"age\":" ws age "," ws "\"pet\":" ws pet "," ws "\"tags\":" ws tags "," ws "\"home\":" ws home ws "}"
home ::= "{" ws "\"city\":" ws string ws "}"
tags ::= "[" ws ( string ( "," ws string ){0,2} )? ws "]"
pet ::= "\"cat\"" | "\"dog\"" | "null"
age ::= [0-9] | [1-9] [0-9]
string ::= "\"" [a-zA-Z0-9 ]{0,8} "\""
ws ::= " "?
"""
PERSON_SCHEMA = {
    "type": "object",
    "required": ["name", "age", "pet", "tags", "home"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "home": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}},
    },
}
SEEDS = range(6)


@pytest.fixture(scope="module")
def model(tiny_kit: TinyKit) -> Iterator[TransformersLoader]:
    loaded = TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions(cpu=True))
    yield loaded
    loaded.unload()


@pytest.fixture(scope="module")
def batched(tiny_kit: TinyKit) -> Iterator[TransformersLoader]:
    loaded = TransformersLoader.load(tiny_kit.hf_dir, TransformersOptions(cpu=True, parallel=3))
    assert loaded.parallel == 3
    yield loaded
    loaded.unload()


def sampled(seed: int, grammar: str = "", **more: Any) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, grammar_string=grammar, **more)


def reply(model: TransformersLoader, params: SamplingParams, limit: int = 200) -> tuple[str, list[int]]:
    """(text before EOS, every token) of one generation, at most `limit` tokens."""
    tokens: list[int] = []
    for step in model.generate(model.encode(PROMPT), params, threading.Event()):
        tokens.append(step.token)
        if step.token in model.info.eos_token_ids or len(tokens) >= limit:
            break
    body = tokens[:-1] if tokens and tokens[-1] in model.info.eos_token_ids else tokens
    return model.decode(body, skip_special=False), tokens


def assert_person(text: str) -> None:
    assert jsonschema_rs.is_valid(PERSON_SCHEMA, json.loads(text)), text


# --- the grammar decides the output ---------------------------------------------------------
def test_without_a_grammar_the_random_model_says_anything(model: TransformersLoader) -> None:
    texts = {reply(model, sampled(seed), limit=8)[0] for seed in SEEDS}
    assert not texts <= {"yes", "no"}


def test_yes_no_grammar_always_yields_exactly_yes_or_no_then_eos(model: TransformersLoader) -> None:
    answers = set()
    for seed in SEEDS:
        text, tokens = reply(model, sampled(seed, YES_NO))
        assert text in ("yes", "no") and tokens[-1] in model.info.eos_token_ids
        answers.add(text)
    assert answers == {"yes", "no"}  # the model's own choice, not a forced one


def test_json_grammar_yields_json_valid_against_the_schema(model: TransformersLoader) -> None:
    for seed in SEEDS:
        text, tokens = reply(model, sampled(seed, PERSON_GBNF))
        assert tokens[-1] in model.info.eos_token_ids, text
        assert_person(text)


def test_greedy_mirostat_and_truncation_samplers_stay_inside_the_grammar(model: TransformersLoader) -> None:
    for params in (SamplingParams(temperature=0), sampled(1, top_k=3, min_p=0.2),
                   sampled(2, mirostat_mode=2), sampled(3, repetition_penalty=1.5, dry_multiplier=0.8)):
        text, _ = reply(model, params.replace(grammar_string=PERSON_GBNF))
        assert_person(text)


def test_batched_rows_each_follow_their_own_grammar(batched: TransformersLoader) -> None:
    jobs = [sampled(seed, PERSON_GBNF if seed % 3 == 0 else YES_NO if seed % 3 == 1 else "") for seed in SEEDS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda p: reply(batched, p, limit=200 if p.grammar_string else 40)[0], jobs))
    for params, text in zip(jobs, texts, strict=True):
        if params.grammar_string == PERSON_GBNF:
            assert_person(text)
        elif params.grammar_string == YES_NO:
            assert text in ("yes", "no")
    assert batched._scheduler is not None and batched._scheduler.peak_rows >= 2


def test_logprobs_still_come_with_each_step_under_a_grammar(model: TransformersLoader) -> None:
    steps = list(model.generate(model.encode(PROMPT), sampled(4, YES_NO, logprobs=3), threading.Event()))
    assert model.decode([s.token for s in steps[:-1]]) in ("yes", "no")
    assert steps[-1].token in model.info.eos_token_ids
    for step in steps:
        assert step.logprobs is not None and len(step.logprobs.top) == 3 and step.logprobs.logprob <= 0


# --- lazy grammars ---------------------------------------------------------------------------
def test_a_lazy_grammar_leaves_the_text_free_until_its_trigger_then_constrains(model: TransformersLoader) -> None:
    brace = model.encode("{", add_bos=False)
    assert len(brace) == 1
    grammar = r'root ::= "{\"n\": " [0-9]{1,3} "}"'
    seen_free = 0
    for seed in SEEDS:
        # The bias makes the random model open a brace soon; the grammar takes over from it.
        params = sampled(seed, grammar, grammar_triggers=[r"\{"], logit_bias={brace[0]: 4.0})
        text, tokens = reply(model, params)
        free, _, rest = text.partition("{")
        assert re.fullmatch(r'\{"n": [0-9]{1,3}\}', "{" + rest), text
        assert tokens[-1] in model.info.eos_token_ids
        seen_free += bool(free)
    assert seen_free  # some replies did say something before the trigger


def test_a_trigger_group_starts_the_grammar_inside_the_match(model: TransformersLoader) -> None:
    # The group is empty, at the end of 12+ characters of free text: the grammar applies from there.
    params = sampled(5, YES_NO, grammar_triggers=[r"(?s)^.{12,}()$"])
    text, tokens = reply(model, params)
    assert re.fullmatch(r"(?s).{12,}(yes|no)", text), text
    assert text[:-3 if text.endswith("yes") else -2] and tokens[-1] in model.info.eos_token_ids


def test_a_trigger_that_never_matches_leaves_the_output_free(model: TransformersLoader) -> None:
    free, _ = reply(model, sampled(0), limit=10)
    lazy, _ = reply(model, sampled(0, YES_NO, grammar_triggers=["NEVER_SAID"]), limit=10)
    assert lazy == free


# --- end of sequence ---------------------------------------------------------------------------
def test_eos_is_masked_until_the_grammar_is_complete_and_alone_after(model: TransformersLoader) -> None:
    matcher = model._grammars.matcher('root ::= "yes" | "yes!"')
    eos = model.info.eos_token_ids
    first = matcher.mask(torch.zeros(model.info.vocab_size))
    assert all(first[i] == -float("inf") for i in eos)
    for token in model.encode("yes", add_bos=False):
        matcher.advance(token)
    accepting = matcher.mask(torch.zeros(model.info.vocab_size))
    assert all(accepting[i] == 0 for i in eos)  # complete: may end, or go on to "yes!"
    matcher.advance(model.encode("!", add_bos=False)[0])
    final = matcher.mask(torch.zeros(model.info.vocab_size))
    assert set(torch.isfinite(final).nonzero().flatten().tolist()) == set(eos)
    assert matcher.forced() == eos[0]


def test_a_complete_grammar_ends_the_reply_even_with_eos_banned(model: TransformersLoader) -> None:
    steps = list(model.generate(model.encode(PROMPT), sampled(0, YES_NO, ban_eos_token=True), threading.Event()))
    assert model.decode([s.token for s in steps[:-1]]) in ("yes", "no")
    assert steps[-1].token in model.info.eos_token_ids  # then the generator returns


# --- refusals and the compile cache ---------------------------------------------------------------
@pytest.mark.parametrize(("grammar", "reason"), [
    ('root ::= "yes', "end of input"),
    ('start ::= "a"', "root"),
    ("root ::= missing", "missing"),
    ("   ", "empty"),
])
def test_an_invalid_grammar_is_a_request_error_with_the_librarys_message(
    model: TransformersLoader, grammar: str, reason: str
) -> None:
    with pytest.raises(InvalidRequestError, match=reason) as caught:
        reply(model, sampled(0, grammar))
    assert caught.value.param == "grammar_string"


def test_an_invalid_trigger_regex_is_a_request_error_naming_the_triggers(model: TransformersLoader) -> None:
    with pytest.raises(InvalidRequestError, match="not a valid regex") as caught:
        reply(model, sampled(0, YES_NO, grammar_triggers=["(unclosed"]))
    assert caught.value.param == "grammar_triggers"


def test_each_distinct_grammar_compiles_once_and_the_cache_is_bounded(model: TransformersLoader) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model.info.path))
    compiler = GrammarCompiler(tokenizer, eos_token_ids=model.info.eos_token_ids,
                               vocab_size=model.info.vocab_size, cache_size=2)
    for _ in range(3):
        compiler.matcher(YES_NO)
    assert compiler.compilations == 1
    compiler.matcher('root ::= "a"')
    compiler.matcher('root ::= "b"')  # evicts YES_NO, the least recently used
    compiler.matcher('root ::= "b"')
    assert compiler.compilations == 3
    compiler.matcher(YES_NO)
    assert compiler.compilations == 4


def test_matchers_of_one_grammar_are_independent(model: TransformersLoader) -> None:
    one, two = model._grammars.matcher(YES_NO), model._grammars.matcher(YES_NO)
    one.advance(model.encode("yes", add_bos=False)[0])
    mask = two.mask(torch.zeros(model.info.vocab_size))
    assert mask[model.encode("no", add_bos=False)[0]] == 0


def test_no_grammar_means_the_plain_chain_and_the_same_tokens(model: TransformersLoader) -> None:
    assert type(model._new_chain(sampled(0))) is SamplerChain
    assert isinstance(model._new_chain(sampled(0, YES_NO)), ConstrainedChain)
    assert reply(model, sampled(7), limit=12) == reply(model, sampled(7), limit=12)
