"""Logits processing in torch: the sampler chain of the Transformers loader.

Every processor takes the logits of the current step (a 1-D float tensor over the
vocabulary) and the token history (a 1-D long tensor: prompt + generated so far, on the
same device) and returns the processed logits; it may change the input in place. Removed
tokens get -inf. All work is vectorised over the vocabulary; a sampler that is off is
never built, so neutral settings cost nothing.

`SamplerChain` builds the processors a `SamplingParams` asks for, in the order
`params.active_samplers()` gives, and turns one step's logits into the next token:

- logit bias, token bans and `ban_eos_token` first (a ban always wins);
- greedy (temperature 0): only the penalties (repetition, presence, frequency, DRY) run,
  then argmax; truncation cannot change the argmax and XTC's coin would break determinism;
- mirostat replaces the truncation samplers and the final draw, as in llama.cpp: the chain
  keeps the penalties and temperature and mirostat picks the token;
- otherwise a draw from the softmax with the chain's seeded generator.

torch is imported inside functions only, so importing this module is free.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from loaders.base import TokenLogprobs, within_vocabulary
from modules.core.errors import InvalidRequestError
from modules.core.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

Processor = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
"""(logits, history) -> logits."""

#: Samplers that only cut the candidate set (or, for XTC, reshape it): skipped under mirostat.
TRUNCATION_SAMPLERS = frozenset({"top_n_sigma", "top_k", "top_p", "typical_p", "min_p", "xtc"})
#: Samplers that still run in greedy mode: they change which token is the argmax.
PENALTY_SAMPLERS = frozenset({"repetition_penalty", "presence_penalty", "frequency_penalty", "dry"})

#: DRY stops extending a match this many tokens past `dry_allowed_length`: the penalty is
#: then multiplier * base^50, far beyond any logit, so longer scans change nothing (ooba caps
#: matches at 50 for the same reason).
DRY_MAX_EXTRA_LENGTH = 50
#: Longest breaker token sequence kept (llama.cpp clamps its restart sequences likewise).
DRY_MAX_BREAKER_TOKENS = 20
#: log(FLT_MAX): the largest exponent of e a float32 holds; caps DRY's exponent (llama.cpp).
_FLOAT_MAX_LOG = 88.7228391
#: First top-k tried by the sorting samplers before they widen (see _sorted_prefix).
_FIRST_PREFIX = 1024
#: Mirostat 1 estimates the Zipf exponent from this many most likely tokens (llama.cpp's m).
MIROSTAT_M = 100


def _window(history: torch.Tensor, last_n: int) -> torch.Tensor:
    """The last `last_n` tokens of `history`; all of it when `last_n` is 0."""
    return history[-last_n:] if last_n > 0 else history


# --- penalties ---------------------------------------------------------------------------
def apply_repetition_penalty(
    logits: torch.Tensor, history: torch.Tensor, penalty: float, last_n: int = 0
) -> torch.Tensor:
    """CTRL repetition penalty: each token present in the window has its logit divided by
    `penalty` when positive and multiplied by it when negative (so it always loses ground)."""
    import torch

    ids = torch.unique(_window(history, last_n))
    if ids.numel() == 0:
        return logits
    values = logits[ids]
    logits[ids] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def apply_presence_penalty(
    logits: torch.Tensor, history: torch.Tensor, penalty: float, last_n: int = 0
) -> torch.Tensor:
    """Subtract `penalty` from the logit of every token present in the window (OpenAI's)."""
    import torch

    logits[torch.unique(_window(history, last_n))] -= penalty
    return logits


def apply_frequency_penalty(
    logits: torch.Tensor, history: torch.Tensor, penalty: float, last_n: int = 0
) -> torch.Tensor:
    """Subtract `penalty` times its count in the window from each token's logit (OpenAI's)."""
    import torch

    ids, counts = torch.unique(_window(history, last_n), return_counts=True)
    logits[ids] -= penalty * counts.to(logits.dtype)
    return logits


# --- DRY ---------------------------------------------------------------------------------
def dry_breaker_sequences(
    breakers: Sequence[str],
    encode: Callable[[str], list[int]],
    vocab_texts: Sequence[str] | None = None,
) -> list[tuple[int, ...]]:
    """The token sequences of DRY's breaker strings.

    Each string is tokenized alone and after a letter: SentencePiece tokenizers give a word
    at the start of a text another token (with a leading space) than in the middle, which
    is where breakers occur (ooba tokenizes `a{s}` for the same reason). Sequences longer
    than DRY_MAX_BREAKER_TOKENS are cut to that length. With `vocab_texts` (the text of
    each token id), every token whose text contains a breaker is a breaker too, as in
    llama.cpp: BPE vocabularies merge a newline into tokens such as a double newline or ".\\n".
    """
    prefix = encode("a")
    found: set[tuple[int, ...]] = set()
    for text in breakers:
        if not text:
            continue
        alone = encode(text)
        after = encode("a" + text)
        candidates = [alone]
        if after[: len(prefix)] == prefix and len(after) > len(prefix):
            candidates.append(after[len(prefix) :])
        found.update(tuple(ids[:DRY_MAX_BREAKER_TOKENS]) for ids in candidates if ids)
    if vocab_texts is not None:
        wanted = [text for text in breakers if text]
        found.update((tid,) for tid, token in enumerate(vocab_texts) if any(w in token for w in wanted))
    return sorted(found)


class DryPenalty:
    """DRY ("don't repeat yourself", koboldcpp/ooba/llama.cpp): penalise the token that would
    extend a repeat of the context's end.

    For each earlier place where the last tokens of the history already occurred, the token
    that followed there would continue the repeat; if the repeated suffix is at least
    `allowed_length` long, that token's logit loses `multiplier * base^(length -
    allowed_length)` (the longest suffix per token counts). A repeat never reaches back over
    a breaker sequence (a newline, a colon...), and a single-token breaker is never itself
    penalised: the same rules as llama.cpp's restart sequences.
    """

    def __init__(
        self,
        multiplier: float,
        base: float,
        allowed_length: int,
        last_n: int = 0,
        breakers: Sequence[Sequence[int]] = (),
    ) -> None:
        self.multiplier = multiplier
        self.base = base
        self.allowed_length = allowed_length
        self.last_n = last_n
        self.single_breakers = sorted({seq[0] for seq in breakers if len(seq) == 1})
        self.multi_breakers = [tuple(seq) for seq in breakers if len(seq) > 1]
        self.max_exponent = int(_FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0
        self._singles: torch.Tensor | None = None  # single_breakers as a tensor, built on first use

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        import torch

        window = _window(history, self.last_n)
        if window.numel() < 2:
            return logits
        if self._singles is None or self._singles.device != window.device:
            # Thousands of ids once the vocabulary scan adds every token holding a newline.
            self._singles = torch.tensor(self.single_breakers, dtype=window.dtype, device=window.device)
        singles = self._singles
        limit = self._repeat_limit(window, singles)
        # A repeat of length 0 is no repeat: allowed_length 0 still needs one matching token.
        if limit < max(self.allowed_length, 1):
            return logits
        cap = min(limit, self.allowed_length + DRY_MAX_EXTRA_LENGTH)
        tokens, lengths = self._longest_repeats(window, cap)
        keep = (lengths >= self.allowed_length) & ~torch.isin(tokens, singles)
        tokens, lengths = tokens[keep], lengths[keep]
        if tokens.numel() == 0:
            return logits
        exponent = (lengths - self.allowed_length).clamp(max=self.max_exponent).to(torch.float64)
        penalty = self.multiplier * torch.pow(torch.tensor(self.base, dtype=torch.float64), exponent)
        logits[tokens] -= penalty.to(logits.dtype)
        return logits

    def _repeat_limit(self, window: torch.Tensor, singles: torch.Tensor) -> int:
        """How many tokens follow the last breaker in the window (all of them if none)."""
        import torch

        n = window.numel()
        last_end = -1
        if singles.numel():
            hits = torch.isin(window, singles).nonzero()
            if hits.numel():
                last_end = int(hits[-1])
        for seq in self.multi_breakers:
            if len(seq) > n:
                continue
            pattern = torch.tensor(seq, dtype=window.dtype, device=window.device)
            hits = (window.unfold(0, len(seq), 1) == pattern).all(dim=1).nonzero()
            if hits.numel():
                last_end = max(last_end, int(hits[-1]) + len(seq) - 1)
        return n - 1 - last_end

    @staticmethod
    def _longest_repeats(window: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each token that would continue a repeat of the window's end: the longest such
        repeat (at most `cap` tokens). Returns (unique tokens, lengths)."""
        import torch

        n = window.numel()
        # Earlier positions holding the last token end a repeat of length >= 1; extend them
        # backwards together, one offset per iteration, dropping those that stop matching.
        ends = (window[:-1] == window[-1]).nonzero().squeeze(1)
        lengths = torch.ones_like(ends)
        alive = torch.arange(ends.numel(), device=window.device)
        for offset in range(1, cap):
            starts = ends[alive] - offset
            ok = starts >= 0
            ok &= window[starts.clamp(min=0)] == window[n - 1 - offset]
            alive = alive[ok]
            if alive.numel() == 0:
                break
            lengths[alive] += 1
        following = window[ends + 1]
        tokens, inverse = torch.unique(following, return_inverse=True)
        longest = torch.zeros_like(tokens).scatter_reduce_(0, inverse, lengths, reduce="amax")
        return tokens, longest


# --- temperature and truncation ----------------------------------------------------------
def apply_temperature(logits: torch.Tensor, history: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature (> 0): below 1 sharpens, above 1 flattens."""
    logits /= temperature
    return logits


def apply_top_n_sigma(logits: torch.Tensor, history: torch.Tensor, n: float) -> torch.Tensor:
    """Keep the logits within `n` standard deviations (of the finite logits) of the maximum."""
    import torch

    finite_mask = torch.isfinite(logits)
    finite = logits if bool(finite_mask.all()) else logits[finite_mask]
    if finite.numel() < 2:
        return logits
    threshold = finite.max() - n * finite.std(correction=0)
    return logits.masked_fill_(logits < threshold, -math.inf)


def apply_top_k(logits: torch.Tensor, history: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` highest logits (ties at the border broken by torch.topk)."""
    import torch

    if k >= logits.numel():
        return logits
    return _keep_only(logits, torch.topk(logits, k, sorted=False).indices)


def _sorted_prefix(
    keys: torch.Tensor, enough: Callable[[torch.Tensor], bool], largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first entries of `keys` in sorted order (largest or smallest first) and their
    indices: a top-k that grows until `enough(indices)` says the prefix decides the
    result, else the full sort. torch sorts a 128k vocabulary in ~15 ms on one CPU thread
    while a top-1024 takes ~1 ms, and the answer nearly always lies in the first few."""
    import torch

    n = keys.numel()
    k = min(_FIRST_PREFIX, n)
    while k < n:
        values, indices = torch.topk(keys, k, largest=largest, sorted=True)
        if enough(indices):
            return values, indices
        k *= 8
    return torch.sort(keys, descending=largest)


def _keep_only(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Set every logit to -inf except those at the indices `keep`."""
    import torch

    removed = torch.ones_like(logits, dtype=torch.bool)
    removed[keep] = False
    return logits.masked_fill_(removed, -math.inf)


def apply_top_p(logits: torch.Tensor, history: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (>= 1 token)."""
    probs = logits.softmax(dim=-1)
    top, order = _sorted_prefix(probs, lambda indices: float(probs[indices].sum()) >= p)
    # A token stays while the tokens before it have not reached p; the first one always does.
    count = max(int(((top.cumsum(dim=-1) - top) < p).sum()), 1)
    return _keep_only(logits, order[:count])


def apply_typical_p(logits: torch.Tensor, history: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy,
    up to probability `mass` (the Hugging Face TypicalLogitsWarper rule; >= 1 token)."""
    import torch

    log_probs = logits.log_softmax(dim=-1)
    probs = log_probs.exp()
    entropy = -torch.nan_to_num(log_probs * probs).sum()
    distance = (-log_probs - entropy).abs()
    _, order = _sorted_prefix(distance, lambda indices: float(probs[indices].sum()) >= mass, largest=False)
    cumulative = probs[order].cumsum(dim=-1)
    count = int((cumulative < mass).sum()) + 1
    return _keep_only(logits, order[:count])


def apply_min_p(logits: torch.Tensor, history: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop the tokens less likely than `min_p` times the most likely one."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill_(probs < min_p * probs.max(), -math.inf)


class Xtc:
    """XTC, "exclude top choices": with chance `probability` per step, remove every token at
    or above `threshold` probability except the least likely of them, so the text leaves
    the obvious path but stays on a plausible one. Needs two or more such tokens; a
    threshold above 0.5 can never have two, so it does nothing (as in llama.cpp)."""

    def __init__(self, probability: float, threshold: float, generator: torch.Generator) -> None:
        self.probability = probability
        self.threshold = threshold
        self.generator = generator

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        import torch

        if self.threshold > 0.5:
            return logits
        coin = torch.rand((), generator=self.generator, device=self.generator.device)
        if float(coin) >= self.probability:
            return logits
        probs = logits.softmax(dim=-1)
        above = probs >= self.threshold
        if int(above.sum()) < 2:
            return logits
        least_likely = torch.where(above, probs, torch.full_like(probs, math.inf)).argmin()
        above[least_likely] = False
        return logits.masked_fill_(above, -math.inf)


# --- mirostat ----------------------------------------------------------------------------
class Mirostat:
    """Mirostat 1 and 2 (llama.cpp's algorithms): picks the token itself, steering the
    observed surprise (-log2 p) toward `tau`. Stateful: `mu` starts at 2*tau and learns at
    rate `eta`; build one per generation."""

    def __init__(
        self, mode: int, tau: float, eta: float, vocab_size: int, generator: torch.Generator
    ) -> None:
        if mode not in (1, 2):
            raise InvalidRequestError(f"mirostat_mode must be 1 or 2 here, got {mode!r}", "mirostat_mode")
        self.mode = mode
        self.tau = tau
        self.eta = eta
        self.vocab_size = vocab_size
        self.generator = generator
        self.mu = 2.0 * tau

    def select(self, logits: torch.Tensor) -> int:
        """The chosen token id; updates mu from its surprise."""
        probs = logits.softmax(dim=-1)
        candidates = self._candidates(probs)
        kept = probs[candidates] / probs[candidates].sum()
        index = draw_token(kept, self.generator)
        surprise = -math.log2(max(float(kept[index]), 1e-45))
        self.mu -= self.eta * (surprise - self.tau)
        return int(candidates[index])

    def _candidates(self, probs: torch.Tensor) -> torch.Tensor:
        """The ids mirostat may pick from (at least the most likely one)."""
        import torch

        if self.mode == 2:
            # Mirostat 2: drop the tokens more surprising than mu.
            kept = (-torch.log2(probs) <= self.mu).nonzero().squeeze(1)
            return kept if kept.numel() else probs.argmax().view(1)
        candidates = int((probs > 0).sum())
        if candidates < 2:
            return probs.argmax().view(1)
        # Mirostat 1: estimate the Zipf exponent s from the top m tokens, then keep the top
        # k, with the k that gives surprise mu under that law.
        m = min(MIROSTAT_M, candidates)
        top, order = torch.topk(probs, m)
        i = torch.arange(m - 1, dtype=torch.float64, device=probs.device)
        t = torch.log((i + 2) / (i + 1))
        top = top.to(torch.float64)
        b = torch.log(top[:-1] / top[1:])
        s_hat = float((t * b).sum() / (t * t).sum())
        epsilon = s_hat - 1
        try:
            k = ((epsilon * 2.0**self.mu) / (1 - self.vocab_size ** (-epsilon))) ** (1 / s_hat)
        except (ZeroDivisionError, OverflowError):
            k = float(candidates)
        if isinstance(k, complex) or not math.isfinite(k):
            k = float(candidates)
        k = min(max(int(k), 1), candidates)
        return order[:k] if k <= m else torch.topk(probs, k, sorted=False).indices


def raw_logprobs(logits: torch.Tensor, valid_vocab: int) -> torch.Tensor:
    """The model's own log-probabilities over its real tokens (the first `valid_vocab`
    logits), in float64, taken before any sampler touches the logits: what `logprobs` reports."""
    import torch

    return torch.log_softmax(logits[:valid_vocab].double(), dim=-1)


def token_logprobs(logprobs: torch.Tensor, token: int, top_n: int) -> TokenLogprobs:
    """`token`'s log-probability in the raw distribution `logprobs` and the `top_n` most likely tokens."""
    values, ids = logprobs.topk(min(top_n, logprobs.numel()))
    return TokenLogprobs(float(logprobs[token]), tuple(zip(ids.tolist(), values.tolist(), strict=True)))


def draw_token(probs: torch.Tensor, generator: torch.Generator) -> int:
    """An index drawn from the distribution `probs` (1-D, summing to about 1) with `generator`.

    Inverse-CDF with one uniform number: torch.multinomial draws an exponential per entry,
    ~4 ms for a 128k vocabulary on one CPU thread against ~0.2 ms here. A zero-probability
    entry is never drawn (the first cdf value above u always adds mass).
    """
    import torch

    cdf = probs.to(torch.float64).cumsum(dim=-1)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=generator.device) * cdf[-1]
    return int(torch.searchsorted(cdf, u.to(cdf.device), right=True).clamp(max=probs.numel() - 1))


# --- the chain ---------------------------------------------------------------------------
class SamplerChain:
    """The samplers of one generation: `sample(logits, history)` gives the next token id.

    `vocab_size` is the logits' length; `valid_vocab` (when smaller) bans the padding ids
    past the tokenizer's vocabulary. `eos_token_ids` are masked under `ban_eos_token`.
    `dry_breakers` are DRY's breaker strings as token sequences (see
    dry_breaker_sequences). `seed` defaults to params.seed, else a fresh random one (kept in
    `self.seed`). Token ids in bans or biases outside the vocabulary are dropped by the one
    policy (loaders.base.within_vocabulary, which the engine has applied already: here it
    only keeps tensor indices in range). Stateful (generator, mirostat): build one per
    generation.
    """

    done = False
    """Never set on a plain chain; a grammar's ConstrainedChain sets it once the grammar ended
    the reply (loaders/grammar_mask.py): the loaders' one check for both."""

    def __init__(
        self,
        params: SamplingParams,
        *,
        vocab_size: int,
        device: str | torch.device = "cpu",
        eos_token_ids: Sequence[int] = (),
        dry_breakers: Sequence[Sequence[int]] = (),
        valid_vocab: int | None = None,
        seed: int | None = None,
    ) -> None:
        import torch

        self.vocab_size = vocab_size
        self.greedy = params.greedy
        if seed is None:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.seed = seed
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed % 2**64)  # torch takes seeds below 2**64
        self._bias_ids, self._bias_values, self._ban_ids = _bias_and_bans(
            params, vocab_size, device, eos_token_ids, valid_vocab
        )
        self.names = _chain_names(params)
        self.processors = [self._build(name, params, dry_breakers) for name in self.names]
        self.mirostat = (
            Mirostat(
                params.mirostat_mode, params.mirostat_tau, params.mirostat_eta, vocab_size, self.generator
            )
            if "mirostat" in params.active_samplers()  # never in greedy mode
            else None
        )

    def _build(self, name: str, p: SamplingParams, dry_breakers: Sequence[Sequence[int]]) -> Processor:
        last_n = p.repetition_penalty_range
        builders: dict[str, Callable[[], Processor]] = {
            "repetition_penalty": lambda: partial(
                apply_repetition_penalty, penalty=p.repetition_penalty, last_n=last_n
            ),
            "presence_penalty": lambda: partial(
                apply_presence_penalty, penalty=p.presence_penalty, last_n=last_n
            ),
            "frequency_penalty": lambda: partial(
                apply_frequency_penalty, penalty=p.frequency_penalty, last_n=last_n
            ),
            "dry": lambda: DryPenalty(
                p.dry_multiplier, p.dry_base, p.dry_allowed_length, p.dry_penalty_last_n, dry_breakers
            ),
            "temperature": lambda: partial(apply_temperature, temperature=p.temperature),
            "top_n_sigma": lambda: partial(apply_top_n_sigma, n=p.top_n_sigma),
            "top_k": lambda: partial(apply_top_k, k=p.top_k),
            "top_p": lambda: partial(apply_top_p, p=p.top_p),
            "typical_p": lambda: partial(apply_typical_p, mass=p.typical_p),
            "min_p": lambda: partial(apply_min_p, min_p=p.min_p),
            "xtc": lambda: Xtc(p.xtc_probability, p.xtc_threshold, self.generator),
        }
        return builders[name]()

    def process(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Bias, bans, then every active processor in order; `logits` may be changed in place."""
        if self._bias_ids is not None:
            logits[self._bias_ids] += self._bias_values
        if self._ban_ids is not None:
            logits[self._ban_ids] = -math.inf
        for processor in self.processors:
            logits = processor(logits, history)
        return logits

    def sample(self, logits: torch.Tensor, history: torch.Tensor) -> int:
        """The next token for these logits (1-D, float) after `history` (1-D long)."""

        logits = self.process(logits, history)
        if float(logits.max()) == -math.inf:
            raise InvalidRequestError(
                "every token is banned or removed by the samplers: relax custom_token_bans or logit_bias",
                "custom_token_bans",
            )
        if self.greedy:
            return int(logits.argmax())
        if self.mirostat is not None:
            return self.mirostat.select(logits)
        return draw_token(logits.softmax(dim=-1), self.generator)


def _chain_names(params: SamplingParams) -> list[str]:
    """The processors to run, in order, given greedy and mirostat (see the module doc)."""
    names = [n for n in params.active_samplers() if n != "mirostat"]
    if params.greedy:
        return [n for n in names if n in PENALTY_SAMPLERS]
    if "mirostat" in params.active_samplers():
        return [n for n in names if n not in TRUNCATION_SAMPLERS]
    return names


def _bias_and_bans(
    params: SamplingParams,
    vocab_size: int,
    device: str | torch.device,
    eos_token_ids: Sequence[int],
    valid_vocab: int | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Tensors for logit bias (ids, values) and the banned ids; None where there are none."""
    import torch

    params = within_vocabulary(params, vocab_size)  # an index past the logits would fail (or assert on CUDA)
    bias_ids = bias_values = ban_ids = None
    if params.logit_bias:
        bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=device)
        bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device)
    bans = set(params.custom_token_bans)
    if params.ban_eos_token:
        bans.update(int(i) for i in eos_token_ids)
    if valid_vocab is not None and valid_vocab < vocab_size:
        bans.update(range(valid_vocab, vocab_size))
    if bans:
        ban_ids = torch.tensor(sorted(bans), dtype=torch.long, device=device)
    return bias_ids, bias_values, ban_ids
