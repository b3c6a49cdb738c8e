"""GBNF grammars for the torch loaders (Transformers, GPTQ, ExLlamaV2) through llguidance.

llama.cpp runs `grammar_string` natively; the torch loaders sample in our own loop, so they
mask the logits with a constrained-decoding library instead. llguidance was chosen by
measurement (docs/CONSTRAINED_DECODING.md): a Rust wheel with no CUDA or torch dependency,
a GBNF converter of its own, and a mask under a millisecond per token at a 128k vocabulary.

- `GrammarCompiler` belongs to one loaded model (so to one tokenizer): it converts GBNF to
  llguidance's Lark and compiles it once per distinct grammar text (an LRU of pristine
  matchers, each request gets a cheap copy), off the per-token path. A bad grammar is an
  InvalidRequestError naming `grammar_string`, with the library's message.
- `GrammarMatcher` follows one sequence: `mask(logits)` sets every token the grammar rejects
  to -inf, `advance(token)` moves the grammar on. End of sequence: while the grammar is
  incomplete its EOS ids are masked; once it is complete they are allowed, and once nothing
  may follow, only EOS is.
- Lazy grammars (`grammar_triggers`, llama.cpp's semantics): the output is free until one of
  the regexes matches the generated text; from the start of its first group (or of the
  match) on, that text is fed to the grammar, which constrains every later token.
- `ConstrainedChain` wraps a SamplerChain: mask, sample, advance. A generation without a
  grammar never builds one, so its hot path is the plain chain, untouched.

llguidance and torch are imported inside functions only.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from modules.core.errors import GenerationError, InvalidRequestError

if TYPE_CHECKING:
    import torch

    from loaders.torch_samplers import SamplerChain

LIBRARY = "llguidance"
INSTALL_HINT = "pip install llguidance==1.9.1"
#: Distinct grammars kept compiled per model: a tool-calling client sends the same few
#: grammars over and over, and a compiled one costs little memory.
CACHE_SIZE = 32


class GrammarCompiler:
    """Compiles GBNF grammars for one tokenizer and hands out per-sequence matchers.

    `tokenizer` is the model's fast Hugging Face tokenizer (or anything with a
    `backend_tokenizer`); `eos_token_ids` are the ids that end a reply (EOS and the chat's
    stop tokens), which the grammar allows only once it is complete; `vocab_size` is the
    width of the logits. The llguidance tokenizer is built on the first grammar (it takes
    up to a second on a large vocabulary), so a model that never sees one pays nothing.
    Thread-safe: parallel requests share it.
    """

    def __init__(self, tokenizer: Any, *, eos_token_ids: Sequence[int], vocab_size: int,
                 cache_size: int = CACHE_SIZE) -> None:
        self._hf_tokenizer = tokenizer
        self._eos = tuple(int(i) for i in eos_token_ids)
        self._vocab_size = vocab_size
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self.compilations = 0
        """How many grammars were compiled (not served from the cache): a figure for tests."""

    def matcher(self, grammar: str, triggers: Sequence[str] = ()) -> GrammarMatcher:
        """A fresh matcher of `grammar` (GBNF, root rule `root`) for one sequence, lazy when
        `triggers` (regexes) are given. Raises InvalidRequestError naming grammar_string
        (or grammar_triggers) when either is invalid, or when llguidance is missing."""
        patterns = _compile_triggers(triggers)
        pristine, ll_tokenizer = self._pristine(grammar)
        return GrammarMatcher(pristine.deep_copy(), ll_tokenizer, patterns, eos_token_ids=self._eos,
                              width=self._vocab_size)

    def _pristine(self, grammar: str) -> tuple[Any, Any]:
        """The compiled, untouched matcher of `grammar` (from the LRU or compiled now)."""
        with self._lock:
            ll_tokenizer = self._tokenizer()
            found = self._compiled.get(grammar)
            if found is not None:
                self._compiled.move_to_end(grammar)
                return found, ll_tokenizer
        # Compiled outside the lock: a slow grammar must not hold up the others' requests.
        compiled = _compile(grammar, ll_tokenizer)
        with self._lock:
            self.compilations += 1
            self._compiled[grammar] = compiled
            self._compiled.move_to_end(grammar)
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return compiled, ll_tokenizer

    def _tokenizer(self) -> Any:
        """llguidance's view of the tokenizer, built once (called under the lock)."""
        if self._ll_tokenizer is None:
            import_llguidance()
            from llguidance.hf import from_tokenizer

            # As wide as the logits (a padded head), never narrower than the tokenizer.
            width = max(self._vocab_size, len(self._hf_tokenizer))
            try:
                self._ll_tokenizer = from_tokenizer(self._hf_tokenizer, n_vocab=width,
                                                    eos_token=list(self._eos) or None)
            except ValueError as exc:  # "Only fast tokenizers are supported"
                raise InvalidRequestError(
                    f"grammars need the model's fast tokenizer (tokenizer.json): {exc}", "grammar_string"
                ) from exc
        return self._ll_tokenizer


class GrammarMatcher:
    """One sequence's grammar state: mask the logits, then advance on the sampled token.

    With `triggers` it starts inactive (free text) and turns active when one matches the
    generated text; without, it is active from the first token.
    """

    def __init__(self, matcher: Any, ll_tokenizer: Any, triggers: Sequence[re.Pattern[str]], *,
                 eos_token_ids: Sequence[int], width: int) -> None:
        import torch

        self._matcher = matcher
        self._ll_tokenizer = ll_tokenizer
        self._triggers = list(triggers)
        self._eos = tuple(eos_token_ids)
        self._width = width
        self.active = not self._triggers
        """Whether the grammar constrains the next token (False while waiting for a trigger)."""
        self.done = False
        """Set once the grammar is complete and EOS has been sampled: nothing may follow."""
        self._free = bytearray()  # the free text so far, while waiting for a trigger
        words = (ll_tokenizer.vocab_size + 31) // 32
        self._bits = torch.zeros(words, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)
        self._allowed_width = min(ll_tokenizer.vocab_size, width)

    def forced(self) -> int | None:
        """The EOS id when the grammar is complete and nothing else may follow, else None
        (the grammar wins over ban_eos_token here, as llama.cpp's does)."""
        if self.active and self._matcher.is_stopped() and self._eos:
            return self._eos[0]
        return None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Set every logit the grammar rejects to -inf, in place (nothing while inactive)."""
        if not self.active:
            return logits
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        bits = self._bits.to(logits.device, non_blocking=True)
        allowed = ((bits.unsqueeze(1) >> self._shifts.to(logits.device)) & 1).flatten()
        n = min(self._allowed_width, logits.numel())
        logits[:n].masked_fill_(allowed[:n] == 0, -math.inf)
        if logits.numel() > n:
            logits[n:] = -math.inf
        return logits

    def advance(self, token: int) -> None:
        """Move the grammar on by the sampled `token` (or look for a trigger in the free
        text). GenerationError when the grammar refuses it, which the mask prevents."""
        if not self.active:
            self._free += self._ll_tokenizer.decode_bytes([token])
            self._look_for_trigger()
            return
        if token in self._eos and self._matcher.is_accepting():
            self.done = True
        if not self._matcher.consume_token(token):
            raise GenerationError(f"the grammar refused token {token}: {_error_of(self._matcher)}")

    def _look_for_trigger(self) -> None:
        text = self._free.decode("utf-8", errors="replace")
        starts = [_grammar_start(match) for pattern in self._triggers if (match := pattern.search(text))]
        if not starts:
            return
        start = min(starts)
        self.active = True
        self._free = bytearray()
        rest = text[start:].encode("utf-8")
        if not rest:
            return
        tokens = self._ll_tokenizer.tokenize_bytes(rest, parse_special=True)
        if not self._matcher.consume_tokens(tokens):
            raise GenerationError(
                f"the text a grammar trigger matched ({text[start:]!r}) does not begin the grammar: "
                f"{_error_of(self._matcher)}"
            )


class ConstrainedChain:
    """A SamplerChain under a grammar: `sample(logits, history)` masks, samples and
    advances; `done` once the grammar ended the reply (the loader then returns)."""

    def __init__(self, chain: SamplerChain, matcher: GrammarMatcher) -> None:
        self.chain = chain
        self.matcher = matcher

    @property
    def done(self) -> bool:
        return self.matcher.done

    def sample(self, logits: torch.Tensor, history: torch.Tensor) -> int:
        token = self.matcher.forced()
        if token is None:
            # Before the bias, bans and truncation samplers: a top-k that kept only tokens
            # the grammar rejects would leave nothing to sample.
            token = self.chain.sample(self.matcher.mask(logits), history)
        self.matcher.advance(token)
        return token


def _grammar_start(match: re.Match[str]) -> int:
    """Where the grammar starts in a trigger's match: its first group, else the match."""
    if match.re.groups and match.start(1) >= 0:
        return match.start(1)
    return match.start()


def _compile_triggers(triggers: Sequence[str]) -> list[re.Pattern[str]]:
    patterns = []
    for trigger in triggers:
        try:
            patterns.append(re.compile(trigger))
        except re.error as exc:
            raise InvalidRequestError(f"grammar trigger {trigger!r} is not a valid regex: {exc}",
                                      "grammar_triggers") from exc
    return patterns


_UNREPRESENTABLE = re.compile(
    r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}-\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
    r"|\\U0*(?:1[1-9a-fA-F]|[2-9a-fA-F][0-9a-fA-F])[0-9a-fA-F]{4}-\\U[0-9a-fA-F]{8}")
"""Ranges of surrogates or of values past U+10FFFF in a character class: llama.cpp's lenient
UTF-8 decoder can produce them, so grammars exclude them for it (modules/engine/schema_subset.py),
but they are no Unicode scalar values, so llguidance's regexes refuse them; its text is valid
UTF-8, which never holds them, so dropping the ranges changes nothing it could match."""


def _compile(grammar: str, ll_tokenizer: Any) -> Any:
    """A pristine llguidance matcher of the GBNF `grammar`; InvalidRequestError with the
    library's message when it is not a valid grammar."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark

    if not grammar.strip():
        raise InvalidRequestError("grammar_string is empty", "grammar_string")
    try:
        lark = gbnf_to_lark(_UNREPRESENTABLE.sub("", grammar))
    except Exception as exc:  # noqa: BLE001 - the converter raises bare Exceptions for bad grammars
        raise InvalidRequestError(f"grammar_string is not a valid GBNF grammar: {exc}", "grammar_string") from exc
    matcher = LLMatcher(ll_tokenizer, LLMatcher.grammar_from_lark(lark), log_level=0)
    if matcher.is_error():
        raise InvalidRequestError(f"grammar_string is not a valid grammar: {_error_of(matcher)}",
                                  "grammar_string")
    return matcher


def _error_of(matcher: Any) -> str:
    """llguidance's error message without the parser-state dump it appends."""
    return matcher.get_error().split("\n<state>", 1)[0].strip()


def import_llguidance() -> Any:
    """The llguidance module, or InvalidRequestError naming the install command."""
    try:
        import llguidance
    except ImportError as exc:
        raise InvalidRequestError(f"grammars on this loader need {LIBRARY}: {INSTALL_HINT}",
                                  "grammar_string") from exc
    return llguidance
