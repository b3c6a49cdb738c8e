"""The engine's samplers mapped onto exllamav2's own sampler (`ExLlamaV2Sampler.Settings`).

`sampler_settings(params, ...)` is pure: it returns the keyword arguments of
`ExLlamaV2Sampler.Settings` (exllamav2 0.3.2, exllamav2/generator/sampler.py) as a plain
dict, plus the token bias as {id: value}, so it is tested without exllamav2 or a GPU. The
loader turns the bias into the float tensor exllamav2 wants and builds the Settings.

What exllamav2 0.3.2 does, read from its sampler.py and exllamav2_ext/ext_sampling.cpp,
and what follows for the mapping:

- Its order is fixed: repetition/frequency/presence penalties (one pass, one range), token
  bias, DRY, then `sample_basic`: temperature (unless `temperature_last`), top-k, top-p,
  top-a, min-p, TFS, typical, Mirostat, the post temperature, XTC, the draw. Our
  `sampler_priority` cannot reorder that; `temperature_last` is honoured.
- "Off" values differ from ours: typical 0 (ours 1.0), repetition range -1 for the whole
  context (ours 0), top-k 0, top-p >= 1, min-p 0 as here.
- Temperature below 0.01 is greedy in the C++ (top-k 1 after the penalties, bias and DRY):
  the same as our greedy, where only the penalties still run.
- Its Mirostat is Mirostat 2.0 (mu starts at 2 tau, the candidates above 2^-mu are kept,
  mu moves by eta times the surprise error). Mode 1 is refused rather than run as mode 2.
  Under Mirostat we switch the truncation samplers off, as the other loaders do.
- DRY takes its sequence breakers as a set of token ids; we pass every token whose text
  contains one of the breaker strings (an empty list stays empty: None would mean
  exllamav2's own defaults). Its range must exceed its longest n-gram (an assert), so
  short ranges shorten the n-gram.
- XTC draws nothing itself: it reweights the candidates and the one uniform number per step
  picks the token, so a seed reproduces a reply. exllamav2 keeps newline and special tokens
  out of XTC's exclusions, like ooba.
- top_n_sigma does not exist there: the loader applies it to the logits before exllamav2's
  sampler (see `TOP_N_SIGMA_FIRST`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from loaders.base import within_vocabulary
from modules.core.errors import InvalidRequestError
from modules.core.sampling import SamplingParams

#: exllamav2's DRY never matches n-grams longer than this (Settings.dry_max_ngram default).
DRY_MAX_NGRAM = 20
#: top_n_sigma is applied by the loader to the raw logits, before exllamav2's penalties.
TOP_N_SIGMA_FIRST = True


@dataclass(frozen=True)
class SamplerPlan:
    """What one generation asks of exllamav2's sampler, in plain Python values."""

    settings: dict[str, Any]
    """Keyword arguments of ExLlamaV2Sampler.Settings (no tensors, no token ids of DRY)."""
    token_bias: dict[int, float]
    """Added to the logits before sampling; -inf for banned ids (bans always win)."""
    top_n_sigma: float
    """> 0: keep the logits within n standard deviations of the max (done by the loader)."""
    dry_breakers: tuple[str, ...]
    """DRY's breaker strings; the loader turns them into token ids (see breaker_token_ids)."""


def sampler_settings(
    params: SamplingParams, eos_token_ids: Sequence[int], vocab_size: int
) -> SamplerPlan:
    """Map `params` onto exllamav2's sampler for a model of `vocab_size` usable tokens.

    Raises InvalidRequestError for Mirostat 1 (exllamav2 has Mirostat 2.0 only) and when the
    bans leave no token to sample. Ids outside the vocabulary were dropped by the engine
    (loaders.base.within_vocabulary).
    """
    active = set(params.active_samplers())
    if "mirostat" in active and params.mirostat_mode == 1:
        raise InvalidRequestError(
            "the exllamav2 loader has Mirostat 2.0 only: set mirostat_mode to 2 (or 0 to turn it off)",
            "mirostat_mode",
        )
    settings: dict[str, Any] = {
        **_penalties(params),
        **_dry(params),
        "temperature": 1.0 if params.greedy else float(params.temperature),
        "temperature_last": bool(params.temperature_last),
        "top_k": 0, "top_p": 1.0, "top_a": 0.0, "min_p": 0.0, "tfs": 0.0, "typical": 0.0,
        "smoothing_factor": 0.0, "min_temp": 0.0, "max_temp": 0.0, "skew": 0.0,
        "mirostat": False, "mirostat_tau": float(params.mirostat_tau), "mirostat_eta": float(params.mirostat_eta),
        "xtc_probability": 0.0, "xtc_threshold": float(params.xtc_threshold),
    }
    top_n_sigma = 0.0
    if params.greedy:
        settings["top_k"] = 1  # argmax after the penalties, bias and DRY
    elif "mirostat" in active:
        settings["mirostat"] = True  # replaces the truncation samplers and XTC
    else:
        settings.update(_truncation(params))
        top_n_sigma = float(params.top_n_sigma) if "top_n_sigma" in active else 0.0
    return SamplerPlan(
        settings=settings,
        token_bias=token_bias(params, eos_token_ids, vocab_size),
        top_n_sigma=top_n_sigma,
        dry_breakers=tuple(params.dry_sequence_breakers) if settings["dry_multiplier"] > 0 else (),
    )


def _penalties(params: SamplingParams) -> dict[str, Any]:
    return {
        "token_repetition_penalty": float(params.repetition_penalty),
        # Ours: 0 = the whole context; exllamav2: -1 = the whole context.
        "token_repetition_range": params.repetition_penalty_range or -1,
        "token_repetition_decay": 0,
        "token_frequency_penalty": float(params.frequency_penalty),
        "token_presence_penalty": float(params.presence_penalty),
    }


def _dry(params: SamplingParams) -> dict[str, Any]:
    if params.dry_multiplier <= 0:
        return {"dry_multiplier": 0.0}
    dry_range = params.dry_penalty_last_n
    # exllamav2 asserts dry_range > dry_max_ngram when a range is set.
    max_ngram = DRY_MAX_NGRAM if dry_range == 0 else max(1, min(DRY_MAX_NGRAM, dry_range - 1))
    if dry_range == 1:
        dry_range = 2  # a one-token window cannot hold a repeat; 2 keeps the assert true
    return {
        "dry_multiplier": float(params.dry_multiplier),
        "dry_base": float(params.dry_base),
        "dry_allowed_length": int(params.dry_allowed_length),
        "dry_range": int(dry_range),
        "dry_max_ngram": max_ngram,
    }


def _truncation(params: SamplingParams) -> dict[str, Any]:
    return {
        "top_k": int(params.top_k),
        "top_p": float(params.top_p),
        "min_p": float(params.min_p),
        "typical": 0.0 if params.typical_p >= 1.0 else float(params.typical_p),
        "xtc_probability": float(params.xtc_probability),
    }


def token_bias(params: SamplingParams, eos_token_ids: Sequence[int], vocab_size: int) -> dict[int, float]:
    """logit_bias, then -inf for custom_token_bans and (with ban_eos_token) every EOS id.

    Ids outside `range(vocab_size)` are dropped (the one policy, loaders.base.within_vocabulary,
    applied by the engine already: here it only keeps the bias tensor's indices in range)."""
    params = within_vocabulary(params, vocab_size)
    bias = {int(k): float(v) for k, v in params.logit_bias.items()}
    bans = set(params.custom_token_bans)
    if params.ban_eos_token:
        bans.update(int(i) for i in eos_token_ids if 0 <= int(i) < vocab_size)
    for tid in bans:
        bias[tid] = -math.inf
    banned = sum(1 for v in bias.values() if v == -math.inf)
    if banned >= vocab_size:
        raise InvalidRequestError(
            "every token is banned: relax custom_token_bans or logit_bias", "custom_token_bans"
        )
    return bias


def breaker_token_ids(breakers: Iterable[str], vocab_texts: Sequence[str]) -> set[int]:
    """Ids of the tokens whose text contains one of DRY's breaker strings.

    exllamav2 breaks a repeat on single tokens; a token merely containing a breaker ("\\n\\n",
    ".\\n") breaks too. A breaker that only appears split over several tokens is missed.
    """
    wanted = [b for b in breakers if b]
    if not wanted:
        return set()
    return {tid for tid, text in enumerate(vocab_texts) if any(b in text for b in wanted)}
