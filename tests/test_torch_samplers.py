"""The torch sampler chain on hand-made logits: each processor against worked results."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from loaders.base import within_vocabulary  # noqa: E402
from loaders.torch_samplers import (  # noqa: E402
    DryPenalty,
    Mirostat,
    SamplerChain,
    Xtc,
    apply_frequency_penalty,
    apply_min_p,
    apply_presence_penalty,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_n_sigma,
    apply_top_p,
    apply_typical_p,
    dry_breaker_sequences,
    raw_logprobs,
    token_logprobs,
)
from modules.core.errors import InvalidRequestError  # noqa: E402
from modules.core.sampling import SamplingParams  # noqa: E402

NO_HISTORY = torch.zeros(0, dtype=torch.long)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def logits_of(probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is `probs`."""
    return torch.tensor(probs, dtype=torch.float32).log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().squeeze(1).tolist()


def history(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


# --- truncation ---------------------------------------------------------------------------
def test_top_k_keeps_the_k_highest() -> None:
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0])
    assert kept(apply_top_k(logits.clone(), NO_HISTORY, 2)) == [1, 3]
    assert kept(apply_top_k(logits.clone(), NO_HISTORY, 1)) == [1]
    assert kept(apply_top_k(logits.clone(), NO_HISTORY, 10)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = logits_of([0.05, 0.5, 0.15, 0.3])
    assert kept(apply_top_p(logits.clone(), NO_HISTORY, 0.75)) == [1, 3]
    assert kept(apply_top_p(logits.clone(), NO_HISTORY, 0.85)) == [1, 2, 3]
    assert kept(apply_top_p(logits.clone(), NO_HISTORY, 0.0)) == [1]  # never empty


def test_min_p_cuts_relative_to_the_top_token() -> None:
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(apply_min_p(logits.clone(), NO_HISTORY, 0.2)) == [0, 1, 2]  # cut below 0.1
    assert kept(apply_min_p(logits.clone(), NO_HISTORY, 0.5)) == [0, 1]  # cut below 0.25


def test_typical_p_may_drop_the_most_likely_token() -> None:
    # One 0.4 token among ten 0.06 ones: the small ones are the typical ones (surprise
    # close to the entropy), so a 0.5 mass keeps nine of them and drops the favourite.
    logits = logits_of([0.4] + [0.06] * 10)
    result = kept(apply_typical_p(logits.clone(), NO_HISTORY, 0.5))
    assert 0 not in result and len(result) == 9


def test_typical_p_on_a_uniform_distribution_keeps_the_mass() -> None:
    logits = torch.zeros(4)
    assert len(kept(apply_typical_p(logits.clone(), NO_HISTORY, 0.5))) == 2


def test_top_n_sigma_keeps_logits_near_the_maximum() -> None:
    logits = torch.tensor([10.0, 9.0, 5.0, 0.0, 0.0, 0.0])
    std = logits.std(correction=0).item()
    expected = [i for i, v in enumerate(logits.tolist()) if v >= 10.0 - 1.5 * std]
    assert kept(apply_top_n_sigma(logits.clone(), NO_HISTORY, 1.5)) == expected == [0, 1, 2]
    assert kept(apply_top_n_sigma(logits.clone(), NO_HISTORY, 0.1)) == [0]


def test_temperature_divides() -> None:
    logits = torch.tensor([1.0, -2.0])
    assert apply_temperature(logits.clone(), NO_HISTORY, 0.5).tolist() == [2.0, -4.0]


# --- penalties -----------------------------------------------------------------------------
def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([2.0, -2.0, 3.0, 1.0])
    out = apply_repetition_penalty(logits.clone(), history(0, 1, 1), 2.0)
    assert out.tolist() == [1.0, -4.0, 3.0, 1.0]


def test_penalty_range_looks_only_at_the_last_tokens() -> None:
    logits = torch.tensor([2.0, 2.0, 2.0])
    out = apply_repetition_penalty(logits.clone(), history(0, 1, 2), 2.0, last_n=1)
    assert out.tolist() == [2.0, 2.0, 1.0]


def test_presence_and_frequency_penalties() -> None:
    logits = torch.zeros(3)
    assert apply_presence_penalty(logits.clone(), history(0, 0, 1), 1.0).tolist() == [-1.0, -1.0, 0.0]
    assert apply_frequency_penalty(logits.clone(), history(0, 0, 1), 0.5).tolist() == [-1.0, -0.5, 0.0]
    assert apply_frequency_penalty(logits.clone(), history(0, 0, 1), 0.5, last_n=2).tolist() == [
        -0.5,
        -0.5,
        0.0,
    ]


# --- DRY -----------------------------------------------------------------------------------
def test_dry_penalises_the_token_that_continues_a_repeat() -> None:
    # "1 2 3" occurred before, followed by 4: emitting 4 would repeat 4 tokens.
    h = history(1, 2, 3, 4, 9, 1, 2, 3)
    out = DryPenalty(multiplier=0.8, base=2.0, allowed_length=2)(torch.zeros(10), h)
    expected = torch.zeros(10)
    expected[4] = -0.8 * 2.0 ** (3 - 2)
    assert torch.allclose(out, expected)
    out = DryPenalty(multiplier=0.8, base=2.0, allowed_length=3)(torch.zeros(10), h)
    assert out[4].item() == pytest.approx(-0.8)
    assert not DryPenalty(multiplier=0.8, base=2.0, allowed_length=4)(torch.zeros(10), h).any()


def test_dry_takes_the_longest_repeat_per_token() -> None:
    # Token 5 follows "3" (length 1) and "2 3" (length 2); token 6 follows "1 2 3" (3).
    h = history(3, 5, 2, 3, 5, 1, 2, 3, 6, 1, 2, 3)
    out = DryPenalty(multiplier=1.0, base=2.0, allowed_length=1)(torch.zeros(10), h)
    assert out[5].item() == pytest.approx(-(2.0**1))
    assert out[6].item() == pytest.approx(-(2.0**2))


def test_dry_repeats_do_not_reach_over_a_breaker() -> None:
    h = history(1, 2, 7, 3, 4, 5, 1, 2, 7, 3)
    assert DryPenalty(1.0, 2.0, 2)(torch.zeros(10), h)[4].item() == pytest.approx(-(2.0**2))
    # With 7 a breaker the repeat is only "3": shorter than the allowed length.
    assert not DryPenalty(1.0, 2.0, 2, breakers=[(7,)])(torch.zeros(10), h).any()


def test_dry_never_penalises_a_single_token_breaker() -> None:
    h = history(1, 2, 7, 5, 1, 2)
    assert DryPenalty(1.0, 2.0, 2)(torch.zeros(10), h)[7].item() < 0
    assert not DryPenalty(1.0, 2.0, 2, breakers=[(7,)])(torch.zeros(10), h).any()


def test_dry_multi_token_breakers_match_in_full() -> None:
    h = history(1, 7, 8, 2, 3, 4, 1, 7, 8, 2, 3)
    # Only "2 3" follows the last full "7 8": too short for allowed_length 3.
    assert DryPenalty(1.0, 2.0, 3, breakers=[(7, 9)])(torch.zeros(10), h)[4].item() < 0
    assert not DryPenalty(1.0, 2.0, 3, breakers=[(7, 8)])(torch.zeros(10), h).any()


def test_dry_last_n_limits_the_scan() -> None:
    h = history(1, 2, 3, 4, 9, 9, 9, 1, 2, 3)
    assert DryPenalty(1.0, 2.0, 2)(torch.zeros(10), h)[4].item() < 0
    assert not DryPenalty(1.0, 2.0, 2, last_n=6)(torch.zeros(10), h).any()


def test_dry_penalty_stays_finite_on_long_repeats() -> None:
    h = torch.tensor([1, 2] * 400)
    out = DryPenalty(0.8, 1.75, 2)(torch.zeros(4), h)
    assert torch.isfinite(out).all() and out[1].item() < -1e6


def reference_dry(
    ids: list[int], multiplier: float, base: float, allowed: int, breakers: set[int]
) -> dict[int, float]:
    """ooba's DRYLogitsProcessor loop, in plain Python: token -> penalty."""
    last = ids[-1]
    if last in breakers:
        return {}
    longest: dict[int, int] = {}
    for i in [idx for idx, val in enumerate(ids[:-1]) if val == last]:
        following = ids[i + 1]
        if following in breakers:
            continue
        length = 1
        while length < 50 and i - length >= 0:
            previous = ids[-(length + 1)]
            if ids[i - length] != previous or previous in breakers:
                break
            length += 1
        longest[following] = max(length, longest.get(following, 0))
    return {t: multiplier * base ** (n - allowed) for t, n in longest.items() if n >= allowed}


@pytest.mark.parametrize("seed", range(20))
def test_dry_agrees_with_a_plain_python_port_of_ooba(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (60,), generator=generator).tolist()
    ids += ids[10:30]  # a long repeat at the end, on top of the chance ones
    expected = reference_dry(ids, 0.8, 1.5, 2, breakers={3})
    out = DryPenalty(0.8, 1.5, 2, breakers=[(3,)])(torch.zeros(4, dtype=torch.float64), torch.tensor(ids))
    assert {t: -v for t, v in enumerate(out.tolist()) if v} == pytest.approx(expected)


def test_dry_breaker_sequences_tokenizes_alone_and_after_a_letter() -> None:
    # A toy SentencePiece-like encoder: a string's start gets a "space" marker token (100).
    table = {
        "a": [100, 1],
        ":": [100, 2],
        "a:": [100, 1, 2],
        "\n": [3],
        "a\n": [100, 1, 3],
        "ab": [100, 1, 4],
    }
    seqs = dry_breaker_sequences([":", "\n", ""], lambda text: table[text])
    assert seqs == [(2,), (3,), (100, 2)]


def test_dry_tokens_containing_a_breaker_are_breakers() -> None:
    texts = ["a", "\n", "\n\n", ".\n", "b:", "c"]
    no_tokenizer = lambda text: []  # noqa: E731  (only the vocabulary scan speaks here)
    assert dry_breaker_sequences(["\n", ":"], no_tokenizer, texts) == [(1,), (2,), (3,), (4,)]


# --- XTC -----------------------------------------------------------------------------------
def test_xtc_removes_the_top_choices_but_keeps_the_least_likely_of_them() -> None:
    logits = logits_of([0.3, 0.4, 0.1, 0.2])
    out = Xtc(probability=1.0, threshold=0.15, generator=torch.Generator())(logits.clone(), NO_HISTORY)
    assert kept(out) == [2, 3]


def test_xtc_needs_two_tokens_above_the_threshold() -> None:
    logits = logits_of([0.1, 0.7, 0.1, 0.1])
    out = Xtc(probability=1.0, threshold=0.3, generator=torch.Generator())(logits.clone(), NO_HISTORY)
    assert kept(out) == [0, 1, 2, 3]
    out = Xtc(probability=1.0, threshold=0.6, generator=torch.Generator())(logits.clone(), NO_HISTORY)
    assert kept(out) == [0, 1, 2, 3]


def test_xtc_fires_with_its_probability() -> None:
    generator = torch.Generator().manual_seed(0)
    xtc = Xtc(probability=0.5, threshold=0.15, generator=generator)
    logits = logits_of([0.3, 0.4, 0.1, 0.2])
    fired = sum(len(kept(xtc(logits.clone(), NO_HISTORY))) == 2 for _ in range(400))
    assert 150 < fired < 250


# --- mirostat ------------------------------------------------------------------------------
def test_mirostat_2_picks_only_tokens_within_mu() -> None:
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    # tau below the distribution's entropy (1.92 bits), so a steady mu exists.
    mirostat = Mirostat(2, tau=1.5, eta=0.1, vocab_size=5, generator=torch.Generator().manual_seed(1))
    assert mirostat.mu == 3.0
    for _ in range(200):
        mu = mirostat.mu
        token = mirostat.select(probs.log())
        assert token == 0 or -math.log2(probs[token].item()) <= mu
    assert mirostat.mu > 1.0 and mirostat.mu < 5.0  # it steers, it does not run away


def test_mirostat_with_a_tiny_tau_sticks_to_the_favourite() -> None:
    for mode in (1, 2):
        mirostat = Mirostat(mode, tau=0.01, eta=0.1, vocab_size=4, generator=torch.Generator().manual_seed(2))
        picks = {mirostat.select(logits_of([0.1, 0.7, 0.1, 0.1])) for _ in range(30)}
        assert picks == {1}


def test_mirostat_1_never_picks_a_removed_token() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    logits[10:20] = -math.inf
    mirostat = Mirostat(1, tau=5.0, eta=0.1, vocab_size=50, generator=torch.Generator().manual_seed(4))
    picks = {mirostat.select(logits.clone()) for _ in range(200)}
    assert not picks & set(range(10, 20)) and len(picks) > 1


# --- the chain -----------------------------------------------------------------------------
def test_neutral_params_build_no_processor() -> None:
    chain = SamplerChain(SamplingParams(), vocab_size=8)
    assert chain.processors == [] and chain.mirostat is None


def test_chain_follows_the_sampler_priority() -> None:
    params = SamplingParams(temperature=0.5, top_k=5, min_p=0.1, repetition_penalty=1.1)
    assert SamplerChain(params, vocab_size=8).names == ["repetition_penalty", "temperature", "top_k", "min_p"]
    last = params.replace(temperature_last=True)
    assert SamplerChain(last, vocab_size=8).names == ["repetition_penalty", "top_k", "min_p", "temperature"]


def test_sampler_order_matters_for_min_p_and_temperature() -> None:
    # A hot temperature flattens the distribution: min_p after it keeps more tokens.
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    params = SamplingParams(temperature=4.0, min_p=0.3)
    temperature_first = SamplerChain(params, vocab_size=5).process(logits.clone(), NO_HISTORY)
    temperature_last = SamplerChain(params.replace(temperature_last=True), vocab_size=5).process(
        logits.clone(), NO_HISTORY
    )
    assert kept(temperature_first) == [0, 1, 2, 3, 4]
    assert kept(temperature_last) == [0, 1]


def test_greedy_runs_penalties_and_bias_but_no_truncation() -> None:
    params = SamplingParams(temperature=0, top_k=1, xtc_probability=1.0, repetition_penalty=4.0)
    chain = SamplerChain(params, vocab_size=3)
    assert chain.names == ["repetition_penalty"]
    assert chain.sample(torch.tensor([3.0, 2.0, 0.0]), history(0)) == 1  # 3/4 < 2


def test_bias_and_bans() -> None:
    logits = torch.tensor([5.0, 1.0, 0.0, 0.0])
    assert (
        SamplerChain(SamplingParams(temperature=0, logit_bias={2: 10}), vocab_size=4).sample(
            logits.clone(), NO_HISTORY
        )
        == 2
    )
    banned = SamplingParams(temperature=0, custom_token_bans=[0])
    assert SamplerChain(banned, vocab_size=4).sample(logits.clone(), NO_HISTORY) == 1
    no_eos = SamplingParams(temperature=0, ban_eos_token=True)
    chain = SamplerChain(no_eos, vocab_size=4, eos_token_ids=[0, 1])
    assert kept(chain.process(logits.clone(), NO_HISTORY)) == [2, 3]


def test_padding_ids_past_the_tokenizer_are_never_sampled() -> None:
    chain = SamplerChain(SamplingParams(temperature=0), vocab_size=4, valid_vocab=2)
    assert chain.sample(torch.tensor([0.0, 1.0, 9.0, 9.0]), NO_HISTORY) == 1


def test_ids_outside_the_vocabulary_are_ignored() -> None:
    """The engine drops them (loaders.base.within_vocabulary) before the chain sees them; the
    chain itself keeps its tensor indices in range the same way rather than fail."""
    logits = torch.tensor([5.0, 1.0, 0.0, 0.0])
    request = SamplingParams(temperature=0, logit_bias={9: 100.0, 2: 10.0}, custom_token_bans=[4, 0])
    assert within_vocabulary(request, 4) == request.replace(logit_bias={2: 10.0}, custom_token_bans=[0])
    for params in (within_vocabulary(request, 4), request):
        chain = SamplerChain(params, vocab_size=4)
        assert kept(chain.process(logits.clone(), NO_HISTORY)) == [1, 2, 3]
        assert SamplerChain(params, vocab_size=4).sample(logits.clone(), NO_HISTORY) == 2


def test_raw_logprobs_and_the_top_n() -> None:
    logits = torch.tensor([2.0, 0.0, 1.0, 9.0])  # id 3: padding past the real tokens
    raw = raw_logprobs(logits, valid_vocab=3)
    assert raw.dtype == torch.float64 and raw.exp().sum().item() == pytest.approx(1.0)
    numbers = token_logprobs(raw, 2, top_n=2)
    assert numbers.logprob == pytest.approx(1 - math.log(math.exp(2) + 1 + math.exp(1)))
    assert [tid for tid, _ in numbers.top] == [0, 2] and numbers.top[0][1] == pytest.approx(float(raw[0]))
    assert len(token_logprobs(raw, 0, top_n=10).top) == 3  # never more than the vocabulary


def test_banning_everything_is_a_clear_error() -> None:
    chain = SamplerChain(SamplingParams(custom_token_bans=[0, 1]), vocab_size=2)
    with pytest.raises(InvalidRequestError, match="every token"):
        chain.sample(torch.zeros(2), NO_HISTORY)


def test_same_seed_same_draws_other_seed_other_draws() -> None:
    logits = torch.zeros(1000)

    def draws(seed: int) -> list[int]:
        chain = SamplerChain(SamplingParams(seed=seed), vocab_size=1000)
        return [chain.sample(logits.clone(), NO_HISTORY) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert (
        SamplerChain(SamplingParams(), vocab_size=4).seed != SamplerChain(SamplingParams(), vocab_size=4).seed
    )


def test_mirostat_replaces_truncation_and_the_final_draw() -> None:
    params = SamplingParams(mirostat_mode=2, top_k=1, min_p=0.5, temperature=0.8, repetition_penalty=1.2)
    chain = SamplerChain(params, vocab_size=8, seed=1)
    assert chain.names == ["repetition_penalty", "temperature"]
    assert chain.mirostat is not None and chain.mirostat.mu == 2 * params.mirostat_tau
    token = chain.sample(torch.randn(8, generator=torch.Generator().manual_seed(0)), history(1))
    assert 0 <= token < 8


def test_every_sampler_at_once_gives_a_valid_token() -> None:
    params = SamplingParams(
        temperature=1.3, top_k=40, top_p=0.9, min_p=0.02, typical_p=0.95, top_n_sigma=2.0,
        repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2, dry_multiplier=0.8,
        xtc_probability=0.5, xtc_threshold=0.05, seed=3,
    )  # fmt: skip
    chain = SamplerChain(params, vocab_size=100, dry_breakers=[(1,)])
    h = torch.tensor([5, 6, 7, 1, 5, 6, 7] * 5)
    for step in range(20):
        token = chain.sample(torch.randn(100, generator=torch.Generator().manual_seed(step)), h)
        assert 0 <= token < 100
        h = torch.cat([h, torch.tensor([token])])
