"""The one small protocol every backend implements.

A loader class is registered by name; `load(path, options)` returns a loaded model that
can encode, decode, stream steps (a token id with its log-probabilities) for a prompt and
unload itself. Capabilities and parallelism are declared data, so the engine and the UI
never branch on which loader it is. The policies every loader shares live here too: the
prompt check, the auto-context rule and the out-of-vocabulary rule for bias and bans.
tests/test_loader_contract.py checks every available loader against this contract.

Loaders import their backend library (torch, llama_cpp, ...) inside `load()` only, and
never import the engine: they see sampler parameters and errors from layer 0 and nothing
else.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from modules.core.errors import ContextLengthExceededError, InvalidRequestError
from modules.core.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capabilities:
    """What a loader can honour; the engine warns about or refuses the rest."""

    samplers: frozenset[str]
    """Names from modules.core.sampling.SAMPLER_NAMES this loader applies."""
    grammar: bool = False
    """GBNF grammars (`grammar_string`)."""
    devices: tuple[str, ...] = ("cpu",)
    """Where it runs: "cpu", "cuda", "metal"."""
    logprobs: bool = False
    """Reports token log-probabilities (see LoadedModel.generate)."""


@dataclass(frozen=True)
class TokenLogprobs:
    """The model's raw log-probability of a sampled token, and its top alternatives."""

    logprob: float
    top: tuple[tuple[int, float], ...]
    """(token id, log-probability) pairs, most likely first."""


@dataclass(frozen=True)
class Step:
    """One generation step: the sampled token id and, when logprobs were asked for and the
    loader declares the `logprobs` capability, its numbers (they travel together: no side
    channel, whatever thread consumes the step)."""

    token: int
    logprobs: TokenLogprobs | None = None


@dataclass
class ModelInfo:
    """What the engine and the UI need to know about a loaded model."""

    name: str
    path: Path
    loader: str
    context_length: int
    """Tokens the model can attend to as loaded (prompt + reply)."""
    vocab_size: int
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None
    """The model's own Jinja2 chat template, when it ships one."""
    special_tokens: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    """Backend-specific facts worth showing (architecture, quantisation, device...)."""


@runtime_checkable
class LoadedModel(Protocol):
    """A model in memory, ready to generate: everything the engine relies on is declared here.

    `capabilities` and `parallel` are data the engine reads as they are (never a lookup by
    class or a getattr default): a capability the loader lacks is refused by name the same
    way for every loader, and `parallel` generations run at once.
    """

    info: ModelInfo
    capabilities: Capabilities
    """What it honours (normally the loader class's own, see Loader.capabilities)."""
    parallel: int
    """How many `generate()` calls it serves at once, each consumed in its own thread: its
    batch slots, 1 when it does not batch."""

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special-token text such as `<|im_end|>` is parsed as such."""
        ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`. Incomplete UTF-8 at the end comes back as U+FFFD."""
        ...

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, stop_event: threading.Event
    ) -> Iterator[Step]:
        """Yield one Step per sampled token, after evaluating `prompt_ids`.

        Honours every sampler in `params` the loader declares, the seed, logit bias, token
        bans and `ban_eos_token` (EOS is masked); the engine has already dropped ids outside
        the vocabulary from the bias and the bans (`within_vocabulary`). It yields EOS like
        any other token: the caller decides to stop. When `params.logprobs` is N > 0 and the
        loader declares the `logprobs` capability, each step carries the token's
        TokenLogprobs (its raw log-probability and the top N, most likely first); otherwise
        `step.logprobs` is None. The numbers travel in the step itself, so a loader with
        `parallel` > 1 needs no per-thread state. Raises InvalidRequestError for an empty
        prompt (or ids outside the vocabulary) and ContextLengthExceededError for one longer
        than the context (see check_prompt_ids). It returns when `stop_event` is set (checked
        before each step) or when the context window is full. The caller may close it at
        any time.
        """
        ...

    def unload(self) -> None:
        """Free the weights (and GPU memory) now rather than at garbage collection; later
        calls raise ModelNotLoadedError."""
        ...


def check_prompt_ids(prompt_ids: Sequence[int], context_length: int, vocab_size: int, hint: str = "") -> None:
    """Refuse a prompt no loader can evaluate: empty, longer than the context (`hint` says
    how to get a longer one), or holding ids outside `range(vocab_size)`."""
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty: at least one token is needed", "prompt")
    if len(prompt_ids) > context_length:
        raise ContextLengthExceededError(
            f"the prompt has {len(prompt_ids)} tokens but the context holds {context_length}{hint}", "prompt"
        )
    low, high = min(prompt_ids), max(prompt_ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary (0-{vocab_size - 1})", "prompt")


MAX_AUTO_CONTEXT = 8192
"""The longest context taken automatically (a larger one must be asked for: its KV cache can
take more memory than the weights)."""
FALLBACK_CONTEXT = 2048
"""The context of a model that does not say what it was trained on."""


def auto_context(requested: int, trained: int | None) -> int:
    """The one auto-context rule, for every loader and the memory estimate: the requested
    length when one is given (> 0), else the model's trained context capped at MAX_AUTO_CONTEXT,
    else FALLBACK_CONTEXT."""
    if requested > 0:
        return requested
    return min(trained, MAX_AUTO_CONTEXT) if trained and trained > 0 else FALLBACK_CONTEXT


def within_vocabulary(params: SamplingParams, vocab_size: int) -> SamplingParams:
    """The one policy for token ids in `logit_bias` and `custom_token_bans`: ids outside
    `range(vocab_size)` are dropped (with a warning in the log) before any backend sees them,
    so every loader answers such a request the same way (200).

    Why drop rather than refuse: the clients that send these (SillyTavern's banned tokens and
    biases, OpenAI-tuned code) compute ids with their own tokenizer guess; an id this model
    does not have cannot be sampled anyway, and refusing would fail a whole chat over it
    (llama.cpp's server drops them too)."""
    bias = {tid: v for tid, v in params.logit_bias.items() if 0 <= tid < vocab_size}
    bans = [tid for tid in params.custom_token_bans if 0 <= tid < vocab_size]
    if len(bias) == len(params.logit_bias) and len(bans) == len(params.custom_token_bans):
        return params
    dropped = sorted({*params.logit_bias, *params.custom_token_bans} - {*bias, *bans})
    log.warning("ignoring token ids outside the vocabulary (0-%d) in logit_bias/custom_token_bans: %s",
                vocab_size - 1, dropped[:10])
    return params.replace(logit_bias=bias, custom_token_bans=bans)


def concurrency_of(model: LoadedModel | None) -> int:
    """How many generations run at once on `model` (its declared `parallel`); 1 without a model."""
    return max(1, model.parallel) if model is not None else 1


class Loader(Protocol):
    """A backend: a name, its options, its capabilities and a `load` constructor."""

    name: ClassVar[str]
    options_class: ClassVar[type]
    capabilities: ClassVar[Capabilities]
    package: ClassVar[str]
    """The importable module the backend needs (checked without importing it)."""
    install_hint: ClassVar[str]
    """The command that installs the backend, shown when it is missing."""

    @classmethod
    def load(cls, path: Path, options: Any) -> LoadedModel: ...

    @classmethod
    def unavailable_reason(cls) -> str | None: ...


class LoaderBase:
    """Shared class-level helpers; concrete loaders inherit these."""

    name: ClassVar[str]
    package: ClassVar[str]
    install_hint: ClassVar[str]
    parallel: int = 1
    """See LoadedModel.parallel: a loader that batches sets it on the instance at load."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the backend can be imported here, else why not and how to fix it."""
        if importlib.util.find_spec(cls.package) is None:
            return f"the {cls.name} loader needs the '{cls.package}' package: {cls.install_hint}"
        return None
