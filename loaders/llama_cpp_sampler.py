"""The per-request llama.cpp sampler chain, built from SamplingParams with the low-level API.

llama.cpp samples inside C: a chain of `llama_sampler` objects rewrites the candidate
logits and the last one picks the token, so the per-token hot path never touches Python
lists. This module only assembles that chain; `loaders/llama_cpp.py` runs it.

The `llama_cpp` module is passed in (`lib`) rather than imported: the app must start
without the backend installed.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from modules.core.errors import InvalidRequestError
from modules.core.sampling import SamplingParams

#: llama.cpp's "draw a fresh random seed" value (LLAMA_DEFAULT_SEED).
RANDOM_SEED = 0xFFFFFFFF

#: A ban that yields to a grammar. When the grammar allows only banned tokens (say, it is
#: complete and only EOS may follow while `ban_eos_token` is on), a -inf ban would leave
#: every candidate at -inf; llama.cpp then picks a token the grammar rejects and aborts
#: the whole process. A huge finite penalty still never wins against an allowed token.
GRAMMAR_SAFE_BAN = -1e9

PENALTY_NAMES = ("repetition_penalty", "presence_penalty", "frequency_penalty")
#: Samplers that only cut the tail: they cannot change the argmax (XTC is random), so
#: greedy decoding skips them, and Mirostat replaces them with its own truncation.
TRUNCATION_NAMES = frozenset({"top_n_sigma", "top_k", "top_p", "typical_p", "min_p", "xtc"})


@dataclass(frozen=True)
class ChainContext:
    """The model facts a chain needs: llama.cpp's vocab pointer, sizes and EOG tokens."""

    vocab: Any
    n_vocab: int
    n_ctx: int
    eog_ids: tuple[int, ...]


def build_sampler_chain(
    lib: Any, facts: ChainContext, params: SamplingParams, history: Sequence[int]
) -> Any:
    """A new llama_sampler chain for one request; the caller frees it with llama_sampler_free.

    Order: logit bias and bans, the grammar, the active samplers in
    `params.active_samplers()` order, then the sampler that picks (greedy, Mirostat or a
    seeded dist). `history` (the prompt) primes the penalty and DRY samplers, as
    llama-server does, so a reply is penalised for repeating the prompt too.
    Raises InvalidRequestError(param="grammar_string") for a grammar llama.cpp rejects.
    """
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    try:
        _fill_chain(lib, chain, facts, params, history)
    except BaseException:
        lib.llama_sampler_free(chain)  # frees the samplers already added too
        raise
    return chain


def chain_seed(params: SamplingParams) -> int:
    """The uint32 seed for the seeded samplers; RANDOM_SEED when the request has none."""
    if params.seed is None:
        return RANDOM_SEED
    seed = int(params.seed) & 0xFFFFFFFF
    # An explicit seed must stay reproducible, so it may not collide with "random".
    return seed - 1 if seed == RANDOM_SEED else seed


def _fill_chain(lib: Any, chain: Any, facts: ChainContext, params: SamplingParams, history: Sequence[int]) -> None:
    add = lib.llama_sampler_chain_add
    bias = logit_bias_entries(params, facts)
    if bias:
        array = (lib.llama_logit_bias * len(bias))()
        for i, (token, value) in enumerate(bias.items()):
            array[i].token = token
            array[i].bias = value
        add(chain, lib.llama_sampler_init_logit_bias(facts.n_vocab, len(bias), array))
    if params.grammar_string:
        # Before any truncation: a cut that kept only tokens the grammar rejects would
        # leave nothing valid to pick (llama.cpp aborts on that).
        add(chain, _grammar_sampler(lib, facts, params.grammar_string))
    for sampler in _distribution_samplers(lib, facts, params, history):
        add(chain, sampler)
    add(chain, _picker(lib, facts, params))


def logit_bias_entries(params: SamplingParams, facts: ChainContext) -> dict[int, float]:
    """Token id -> bias: `logit_bias`, then `custom_token_bans` and `ban_eos_token` as bans.

    The policy for ids outside the vocabulary is loaders.base.within_vocabulary, which the
    generator applies (with a warning) before any loader sees the params; the bounds check
    here is only defence for a direct caller, since llama.cpp would index past its arrays.
    """
    ban = GRAMMAR_SAFE_BAN if params.grammar_string else -math.inf
    entries: dict[int, float] = {}
    for token, value in params.logit_bias.items():
        if 0 <= token < facts.n_vocab:
            entries[token] = ban if value == -math.inf else value
    banned = list(params.custom_token_bans)
    if params.ban_eos_token:
        banned += facts.eog_ids
    for token in banned:
        if 0 <= token < facts.n_vocab:
            entries[token] = ban
    return entries


def _grammar_sampler(lib: Any, facts: ChainContext, grammar: str) -> Any:
    sampler = lib.llama_sampler_init_grammar(facts.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:  # NULL: llama.cpp could not parse it (the reason went to its log)
        raise InvalidRequestError(
            "grammar_string is not a valid GBNF grammar with a 'root' rule", "grammar_string"
        )
    return sampler


def _distribution_samplers(
    lib: Any, facts: ChainContext, params: SamplingParams, history: Sequence[int]
) -> list[Any]:
    names = params.active_samplers()
    if params.greedy or "mirostat" in names:
        names = [n for n in names if n not in TRUNCATION_NAMES]
    names = [n for n in names if n != "mirostat"]  # it picks the token: added last
    makers: dict[str, Callable[[], Any]] = {
        "dry": lambda: _dry(lib, facts, params, history),
        "temperature": lambda: lib.llama_sampler_init_temp(params.temperature),
        "top_n_sigma": lambda: lib.llama_sampler_init_top_n_sigma(params.top_n_sigma),
        "top_k": lambda: lib.llama_sampler_init_top_k(params.top_k),
        "top_p": lambda: lib.llama_sampler_init_top_p(params.top_p, 1),
        "typical_p": lambda: lib.llama_sampler_init_typical(params.typical_p, 1),
        "min_p": lambda: lib.llama_sampler_init_min_p(params.min_p, 1),
        "xtc": lambda: lib.llama_sampler_init_xtc(
            params.xtc_probability, params.xtc_threshold, 1, chain_seed(params)
        ),
    }
    samplers = []
    i = 0
    while i < len(names):
        if names[i] in PENALTY_NAMES:
            # llama.cpp applies the three penalties in one sampler; adjacent ones merge.
            group = set()
            while i < len(names) and names[i] in PENALTY_NAMES:
                group.add(names[i])
                i += 1
            samplers.append(_penalties(lib, facts, params, history, group))
            continue
        samplers.append(makers[names[i]]())
        i += 1
    return samplers


def _penalties(
    lib: Any, facts: ChainContext, params: SamplingParams, history: Sequence[int], names: set[str]
) -> Any:
    # The C API reads penalty_last_n 0 as "off", so "0 = whole context" becomes n_ctx.
    # A window past the context is the whole context (and a huge one made llama.cpp crawl).
    last_n = min(params.repetition_penalty_range or facts.n_ctx, facts.n_ctx)
    sampler = lib.llama_sampler_init_penalties(
        facts.n_vocab,
        last_n,
        params.repetition_penalty if "repetition_penalty" in names else 1.0,
        params.frequency_penalty if "frequency_penalty" in names else 0.0,
        params.presence_penalty if "presence_penalty" in names else 0.0,
    )
    _prime(lib, sampler, history, last_n)
    return sampler


def _dry(lib: Any, facts: ChainContext, params: SamplingParams, history: Sequence[int]) -> Any:
    last_n = min(params.dry_penalty_last_n or facts.n_ctx, facts.n_ctx)
    breakers = [b.encode("utf-8") for b in params.dry_sequence_breakers if b]
    array = (ctypes.c_char_p * max(1, len(breakers)))(*breakers)
    sampler = lib.llama_sampler_init_dry(
        facts.vocab, params.dry_multiplier, params.dry_base, params.dry_allowed_length, last_n,
        array, len(breakers),
    )
    _prime(lib, sampler, history, last_n)
    return sampler


def _prime(lib: Any, sampler: Any, history: Sequence[int], last_n: int) -> None:
    accept = lib.llama_sampler_accept
    for token in history[-last_n:]:
        accept(sampler, token)


def _picker(lib: Any, facts: ChainContext, params: SamplingParams) -> Any:
    if params.greedy:
        return lib.llama_sampler_init_greedy()
    seed = chain_seed(params)
    if params.mirostat_mode == 1:
        # m = 100 as in the Mirostat paper and llama.cpp's own default.
        return lib.llama_sampler_init_mirostat(
            facts.n_vocab, seed, params.mirostat_tau, params.mirostat_eta, 100
        )
    if params.mirostat_mode == 2:
        return lib.llama_sampler_init_mirostat_v2(seed, params.mirostat_tau, params.mirostat_eta)
    return lib.llama_sampler_init_dist(seed)
