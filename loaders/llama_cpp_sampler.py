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
import re
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

#: The smallest normal 32-bit float.
FLT_MIN = 1.1754944e-38

NEVER_UTF8 = re.compile(b"[\\xC0\\xC1\\xF5-\\xFF]")
#: Trigger patterns: llama.cpp re-runs each on the whole free text after every token.
MAX_TRIGGER_CHARS = 1000
#: The alphanumeric escapes ECMAScript and Python's re both read the same way.
TRIGGER_ESCAPES = frozenset("dDwWsSbBnrtfvxu")

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
    #: Tokens holding a byte no UTF-8 text contains (C0, C1, F5-FF): banned under a grammar.
    never_utf8_ids: tuple[int, ...] = ()


class GrammarGuard:
    """The grammar sampler behind a check that no token it rejects ever reaches it.

    llama.cpp's grammar throws a C++ exception when it is made to accept a token it does
    not allow, and nothing catches it between there and the C API: the process aborts. The
    grammar masks every token it rejects to -inf before the pick, so that only happens when
    the sampling arithmetic itself breaks: settings at the edges of 32-bit floats (a
    temperature of 1e-40 or 1e39, a repetition penalty that rounds to 0, a bias of 1e300,
    XTC with threshold 0) turn logits into NaN or +inf, and the pick lands on a masked
    token. Bounding each setting would be a chase; this checks the one thing that matters.

    Before each accept, the token goes through the grammar alone (a one-token candidate
    array: applying a grammar changes no state). A rejected token is not accepted: it is
    recorded in `rejected`, and the engine ends the request with an error instead of using
    it. Costs two Python callbacks per token, only under a grammar (not yet benchmarked).
    """

    def __init__(self, lib: Any, grammar: Any) -> None:
        self.rejected: int | None = None
        self._lib, self._grammar = lib, grammar
        self._probe = lib.llama_token_data(0, 0.0, 0.0)
        self._probe_array = lib.llama_token_data_array(ctypes.pointer(self._probe), 1, -1, False)
        iface = lib.llama_sampler_i()
        # The callbacks live as long as this object; the engine keeps it beside the chain.
        self._callbacks = (
            lib.llama_sampler_i_accept(self._accept), lib.llama_sampler_i_apply(self._apply),
            lib.llama_sampler_i_reset(self._reset), lib.llama_sampler_i_free(self._free),
        )
        iface.accept, iface.apply, iface.reset, iface.free = self._callbacks
        self._iface = iface
        self.sampler = lib.llama_sampler_init(ctypes.pointer(iface), None)

    def allows(self, token: int) -> bool:
        self._probe.id, self._probe.logit = token, 0.0
        self._probe_array.size, self._probe_array.selected = 1, -1
        self._lib.llama_sampler_apply(self._grammar, ctypes.byref(self._probe_array))
        return self._probe.logit != -math.inf

    def _apply(self, _sampler: Any, candidates: Any) -> None:
        self._lib.llama_sampler_apply(self._grammar, candidates)

    def _accept(self, _sampler: Any, token: int) -> None:
        if self.rejected is not None:
            return
        if self.allows(token):
            self._lib.llama_sampler_accept(self._grammar, token)
        else:
            self.rejected = token

    def _reset(self, _sampler: Any) -> None:
        self.rejected = None
        self._lib.llama_sampler_reset(self._grammar)

    def _free(self, _sampler: Any) -> None:
        if self._grammar is not None:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None


@dataclass(eq=False)
class LlamaChain:
    """One request's llama_sampler chain, and its grammar's guard when it has a grammar
    (whose callbacks must live as long as the chain)."""

    pointer: Any
    guard: GrammarGuard | None = None

    def free(self, lib: Any) -> None:
        if self.pointer is not None:
            lib.llama_sampler_free(self.pointer)  # frees the guard's grammar through its callback
            self.pointer = None


def build_sampler_chain(
    lib: Any, facts: ChainContext, params: SamplingParams, history: Sequence[int]
) -> LlamaChain:
    """A new llama_sampler chain for one request; the caller frees it with `LlamaChain.free`.

    Order: logit bias and bans, the grammar, the active samplers in
    `params.active_samplers()` order, then the sampler that picks (greedy, Mirostat or a
    seeded dist). `history` (the prompt) primes the penalty and DRY samplers, as
    llama-server does, so a reply is penalised for repeating the prompt too.
    Raises InvalidRequestError(param="grammar_string") for a grammar llama.cpp rejects and
    (param="grammar_triggers") for a trigger pattern it could not compile.
    """
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    try:
        guard = _fill_chain(lib, chain, facts, params, history)
    except BaseException:
        lib.llama_sampler_free(chain)  # frees the samplers already added too
        raise
    return LlamaChain(chain, guard)


def chain_seed(params: SamplingParams) -> int:
    """The uint32 seed for the seeded samplers; RANDOM_SEED when the request has none."""
    if params.seed is None:
        return RANDOM_SEED
    seed = int(params.seed) & 0xFFFFFFFF
    # An explicit seed must stay reproducible, so it may not collide with "random".
    return seed - 1 if seed == RANDOM_SEED else seed


def _fill_chain(
    lib: Any, chain: Any, facts: ChainContext, params: SamplingParams, history: Sequence[int]
) -> GrammarGuard | None:
    add = lib.llama_sampler_chain_add
    guard = None
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
        grammar = _grammar_sampler(lib, facts, params.grammar_string, params.grammar_triggers)
        guard = GrammarGuard(lib, grammar)
        add(chain, guard.sampler)
    for sampler in _distribution_samplers(lib, facts, params, history):
        add(chain, sampler)
    add(chain, _picker(lib, facts, params))
    return guard


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
    if params.grammar_string:
        # llama.cpp's grammar decodes UTF-8 leniently (an F8 lead passes as F0), so such a
        # token could put bytes no JSON parser reads inside a string the grammar allowed.
        banned += facts.never_utf8_ids
    if params.ban_eos_token:
        banned += facts.eog_ids
    for token in banned:
        if 0 <= token < facts.n_vocab:
            entries[token] = ban
    return entries


def never_utf8_tokens(lib: Any, vocab: Any, n_vocab: int) -> tuple[int, ...]:
    """The ids whose piece holds a byte that never occurs in valid UTF-8 (C0, C1, F5-FF)."""
    buf = ctypes.create_string_buffer(256)
    found = []
    for token in range(n_vocab):
        n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        if n > 0 and NEVER_UTF8.search(buf.raw[:n]):
            found.append(token)
    return tuple(found)


def _grammar_sampler(lib: Any, facts: ChainContext, grammar: str, triggers: Sequence[str] = ()) -> Any:
    if triggers:
        # Lazy: free output until a pattern matches the text so far, then the grammar from
        # the match's first non-empty group (or the match) on: llama.cpp's own semantics.
        patterns = [check_trigger_pattern(t).encode("utf-8") for t in triggers]
        array = (ctypes.c_char_p * len(patterns))(*patterns)
        sampler = lib.llama_sampler_init_grammar_lazy_patterns(
            facts.vocab, grammar.encode("utf-8"), b"root", array, len(patterns), None, 0
        )
    else:
        sampler = lib.llama_sampler_init_grammar(facts.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:  # NULL: llama.cpp could not parse it (the reason went to its log)
        raise InvalidRequestError(
            "grammar_string is not a valid GBNF grammar with a 'root' rule", "grammar_string"
        )
    return sampler


def check_trigger_pattern(pattern: str) -> str:
    """`pattern` if llama.cpp's std::regex (ECMAScript) takes it the way Python's re does.

    llama.cpp compiles triggers with std::regex and does not catch its exception, so a
    pattern it cannot read would abort the whole process: anything outside the dialect both
    read alike is refused here (InvalidRequestError naming grammar_triggers).
    """
    problem = _trigger_problem(pattern)
    if problem:
        raise InvalidRequestError(f"grammar_triggers: {pattern!r} is not supported: {problem}", "grammar_triggers")
    return pattern


def _trigger_problem(pattern: str) -> str:
    if len(pattern) > MAX_TRIGGER_CHARS:
        return f"longer than {MAX_TRIGGER_CHARS} characters"
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"not a valid regular expression ({exc})"
    i, in_class = 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1:i + 2]
            if nxt.isalnum() and nxt not in TRIGGER_ESCAPES:
                return f"the escape \\{nxt} (ECMAScript regexes have no such escape)"
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            if pattern.startswith(("[]", "[^]"), i):
                return "a class may not start with ']' (ECMAScript reads [] and [^] as whole classes)"
            in_class = True
        elif ch == "(" and pattern.startswith("(?", i) and pattern[i + 2:i + 3] not in (":", "=", "!"):
            return "only (?:...), (?=...) and (?!...) groups (no flags, names or lookbehind)"
        elif ch == "{":
            count = re.match(r"\{\d+(,\d*)?\}", pattern[i:])
            if not count:
                return "a literal '{' must be escaped as \\{"
            i += count.end() - 1
        elif ch in "}]":
            return f"a literal '{ch}' must be escaped as \\{ch}"
        i += 1
    return ""


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
        # A threshold of 0 would count tokens of probability 0 (those a grammar masked) as
        # "likely" and keep one of them alone; the smallest normal float excludes only those.
        "xtc": lambda: lib.llama_sampler_init_xtc(
            params.xtc_probability, max(params.xtc_threshold, FLT_MIN), 1, chain_seed(params)
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
