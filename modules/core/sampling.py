"""Sampler parameters: one dataclass shared by the UI, the API, presets and every loader.

Defaults are neutral (each sampler off), so a preset or a request only names what it
changes. `__post_init__` normalises the loose shapes real clients send (a stop string
instead of a list, seed -1, token bans as "1,2,3", DRY breakers as a JSON string) and
rejects out-of-range values with an error naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from modules.core.errors import InvalidRequestError

#: Sampler names understood in `sampler_priority` (ooba's names). Names clients send that
#: are not listed here are ignored, the way ooba ignores them.
SAMPLER_NAMES: tuple[str, ...] = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "dry",
    "temperature",
    "top_n_sigma",
    "top_k",
    "top_p",
    "typical_p",
    "min_p",
    "mirostat",
    "xtc",
)

#: ooba's default order: penalties, then temperature, then truncation, then XTC.
DEFAULT_SAMPLER_PRIORITY: tuple[str, ...] = SAMPLER_NAMES


def _default_dry_breakers() -> list[str]:
    return ["\n", ":", '"', "*"]


@dataclass
class SamplingParams:
    """Everything that shapes one generation besides the prompt."""

    max_new_tokens: int = 512
    """Most tokens to generate."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 turns it off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set whose probability reaches top_p; 1 is off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 is off."""
    typical_p: float = 1.0
    """Locally typical sampling mass; 1 is off."""
    top_n_sigma: float = 0.0
    """Keep logits within n standard deviations of the maximum; 0 is off."""
    repetition_penalty: float = 1.0
    """Divide the logits of tokens already present (CTRL-style); 1 is off."""
    repetition_penalty_range: int = 1024
    """How many of the last tokens the three penalties look at; 0 means the whole context."""
    presence_penalty: float = 0.0
    """Subtract this from the logit of every token already present."""
    frequency_penalty: float = 0.0
    """Subtract this times the count of each token already present."""
    mirostat_mode: int = 0
    """0 off, 1 Mirostat, 2 Mirostat 2.0 (replaces the truncation samplers)."""
    mirostat_tau: float = 5.0
    """Mirostat target surprise."""
    mirostat_eta: float = 0.1
    """Mirostat learning rate."""
    dry_multiplier: float = 0.0
    """DRY repetition penalty strength; 0 is off."""
    dry_base: float = 1.75
    """DRY exponential base."""
    dry_allowed_length: int = 2
    """Longest repeated sequence DRY lets pass unpenalised."""
    dry_penalty_last_n: int = 0
    """How many last tokens DRY scans; 0 means the whole context."""
    dry_sequence_breakers: list[str] = field(default_factory=_default_dry_breakers)
    """Strings that break a repeated sequence for DRY."""
    xtc_threshold: float = 0.1
    """XTC: tokens above this probability are candidates for exclusion."""
    xtc_probability: float = 0.0
    """XTC: chance per step of excluding the top choices; 0 is off."""
    temperature_last: bool = False
    """Apply temperature after the truncation samplers instead of before them."""
    sampler_priority: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLER_PRIORITY))
    """Order in which the samplers run; unknown names are ignored."""
    seed: int | None = None
    """Random seed; None (or -1) draws a fresh one."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the generation; they never appear in the output."""
    ban_eos_token: bool = False
    """Never end on the end-of-sequence token."""
    custom_token_bans: list[int] = field(default_factory=list)
    """Token ids that may never be generated."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of the given token ids."""
    grammar_string: str = ""
    """A GBNF grammar the output must follow (loaders that support it)."""
    truncation_length: int = 0
    """Prompt + reply budget in tokens; 0 means the model's context length."""
    add_bos_token: bool = True
    """Prepend the beginning-of-sequence token when the prompt does not start with it."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the returned text."""
    logprobs: int = 0
    """Report the log-probability of each generated token and of its top N alternatives; 0 is off."""

    def __post_init__(self) -> None:
        self._normalise()
        self._validate()

    # --- normalisation of the loose shapes clients send -------------------------------
    def _normalise(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if isinstance(s, str) and s]
        if self.seed is not None and int(self.seed) < 0:
            self.seed = None
        if isinstance(self.custom_token_bans, str):
            self.custom_token_bans = _parse_id_list(self.custom_token_bans)
        if isinstance(self.dry_sequence_breakers, str):
            self.dry_sequence_breakers = _parse_breakers(self.dry_sequence_breakers)
        self.logit_bias = _parse_logit_bias(self.logit_bias)
        if isinstance(self.sampler_priority, str):
            self.sampler_priority = [s.strip() for s in self.sampler_priority.replace(",", "\n").splitlines()]
        self.sampler_priority = [s for s in self.sampler_priority if s in SAMPLER_NAMES]
        self.grammar_string = self.grammar_string or ""

    def _validate(self) -> None:
        _check_range(self, "max_new_tokens", 1, None)
        _check_range(self, "temperature", 0.0, None)
        _check_range(self, "top_k", 0, None)
        _check_range(self, "top_p", 0.0, 1.0)
        _check_range(self, "min_p", 0.0, 1.0)
        _check_range(self, "typical_p", 0.0, 1.0)
        _check_range(self, "top_n_sigma", 0.0, None)
        _check_range(self, "repetition_penalty", 0.0, None, low_open=True)
        _check_range(self, "repetition_penalty_range", 0, None)
        _check_range(self, "presence_penalty", -2.0, 2.0)
        _check_range(self, "frequency_penalty", -2.0, 2.0)
        _check_range(self, "mirostat_tau", 0.0, None)
        _check_range(self, "mirostat_eta", 0.0, None)
        _check_range(self, "dry_multiplier", 0.0, None)
        _check_range(self, "dry_base", 1.0, None)
        _check_range(self, "dry_allowed_length", 0, None)
        _check_range(self, "dry_penalty_last_n", 0, None)
        _check_range(self, "xtc_threshold", 0.0, 1.0)
        _check_range(self, "xtc_probability", 0.0, 1.0)
        _check_range(self, "truncation_length", 0, None)
        _check_range(self, "logprobs", 0, 1000)
        if self.mirostat_mode not in (0, 1, 2):
            raise InvalidRequestError(
                f"mirostat_mode must be 0, 1 or 2, got {self.mirostat_mode!r}", "mirostat_mode"
            )
        for tid in self.custom_token_bans:
            if tid < 0:
                raise InvalidRequestError(f"custom_token_bans holds a negative id {tid}", "custom_token_bans")

    # --- what loaders ask ---------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        """True when the reply is the argmax at each step (temperature 0)."""
        return self.temperature <= 0.0

    def active_samplers(self) -> list[str]:
        """The samplers that change the distribution, in the order they should run."""
        on = {
            "repetition_penalty": self.repetition_penalty != 1.0,
            "presence_penalty": self.presence_penalty != 0.0,
            "frequency_penalty": self.frequency_penalty != 0.0,
            "dry": self.dry_multiplier > 0.0,
            "temperature": not self.greedy and self.temperature != 1.0,
            "top_n_sigma": self.top_n_sigma > 0.0,
            "top_k": self.top_k > 0,
            "top_p": self.top_p < 1.0,
            "typical_p": self.typical_p < 1.0,
            "min_p": self.min_p > 0.0,
            "mirostat": self.mirostat_mode != 0 and not self.greedy,
            "xtc": self.xtc_probability > 0.0,
        }
        order = [s for s in self.sampler_priority if on.get(s)]
        order += [s for s in DEFAULT_SAMPLER_PRIORITY if on.get(s) and s not in order]
        if self.temperature_last and "temperature" in order:
            order.remove("temperature")
            order.append("temperature")
        return order

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: dict[str, Any], base: SamplingParams | None = None) -> SamplingParams:
        """Lay the known keys of `values` over `base` (or the defaults); unknown keys are ignored."""
        known = {k: v for k, v in values.items() if k in cls.field_names()}
        return dataclasses.replace(base or cls(), **known)


def _check_range(
    params: SamplingParams, name: str, low: float | None, high: float | None, low_open: bool = False
) -> None:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}", name)
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low}" if high is None else f"between {low} and {high}"
        raise InvalidRequestError(f"{name} must be {bounds}, got {value!r}", name)


def _parse_id_list(text: str) -> list[int]:
    ids = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            ids.append(int(part))
        except ValueError:
            raise InvalidRequestError(
                f"custom_token_bans must be comma-separated token ids, got {part!r}", "custom_token_bans"
            ) from None
    return ids


def _parse_breakers(text: str) -> list[str]:
    text = text.strip()
    if not text:
        return []
    try:
        value = json.loads(text if text.startswith("[") else f"[{text}]")
    except json.JSONDecodeError:
        raise InvalidRequestError(
            f'dry_sequence_breakers must be a JSON list of strings such as ["\\n", ":"], got {text!r}',
            "dry_sequence_breakers",
        ) from None
    if not all(isinstance(s, str) for s in value):
        raise InvalidRequestError("dry_sequence_breakers must hold strings only", "dry_sequence_breakers")
    return value


def _parse_logit_bias(bias: Any) -> dict[int, float]:
    if not bias:
        return {}
    if not isinstance(bias, dict):
        raise InvalidRequestError("logit_bias must map token ids to numbers", "logit_bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            tid, b = int(key), float(value)
        except (TypeError, ValueError):
            raise InvalidRequestError(
                f"logit_bias must map token ids to numbers, got {key!r}: {value!r}", "logit_bias"
            ) from None
        if not math.isfinite(b) and b != -math.inf:
            raise InvalidRequestError(f"logit_bias for {tid} must be finite, got {value!r}", "logit_bias")
        out[tid] = b
    return out


def parse_stop_strings(text: str) -> list[str]:
    """Stop strings typed in a text box: `"\\nUser:", "###"` (JSON string syntax, so \\n works).

    A bare word without quotes is taken as is. Raises InvalidRequestError on bad quoting.
    """
    text = text.strip()
    if not text:
        return []
    if not text.startswith(("[", '"')):
        return [s.strip() for s in text.split(",") if s.strip()]
    try:
        value = json.loads(text if text.startswith("[") else f"[{text}]")
    except json.JSONDecodeError:
        raise InvalidRequestError(f'stop strings must look like "\\nUser:", "###"; got {text!r}', "stop") from None
    if not all(isinstance(s, str) for s in value):
        raise InvalidRequestError("stop strings must be strings", "stop")
    return value
