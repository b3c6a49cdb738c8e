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


def _param(default: Any, help: str, **rules: Any) -> Any:
    """A SamplingParams field with its help and rules, in the metadata every reader takes them from:
    validation (`_validate`), the Parameters tab's controls, the API schema and the preset docs.

    Rules: bounds=(low, high) with None for an open end (low_open: the low end excluded),
    choices=(...), slider=(low, high, step), the part of the range the Parameters tab's
    slider offers (within the bounds; a preset or a request may go beyond it), and
    internal=True for a field the engine sets and no API dialect accepts.
    """
    meta = {"help": help, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SamplingParams:
    """Everything that shapes one generation besides the prompt."""

    max_new_tokens: int = _param(512, "Most tokens to generate.", bounds=(1, None), slider=(1, 8192, 1))
    temperature: float = _param(1.0, "Softmax temperature; 0 means greedy decoding.",
                                bounds=(0.0, None), slider=(0, 5, 0.01))
    top_k: int = _param(0, "Keep the k most likely tokens; 0 turns it off.", bounds=(0, None), slider=(0, 200, 1))
    top_p: float = _param(1.0, "Nucleus sampling: keep the smallest set whose probability reaches top_p; 1 is off.",
                          bounds=(0.0, 1.0), slider=(0.0, 1.0, 0.01))
    min_p: float = _param(0.0, "Drop tokens less likely than min_p times the most likely one; 0 is off.",
                          bounds=(0.0, 1.0), slider=(0.0, 1.0, 0.01))
    typical_p: float = _param(1.0, "Locally typical sampling mass; 1 is off.", bounds=(0.0, 1.0), slider=(0.0, 1.0, 0.01))
    top_n_sigma: float = _param(0.0, "Keep logits within n standard deviations of the maximum; 0 is off.",
                                bounds=(0.0, None), slider=(0, 5, 0.01))
    repetition_penalty: float = _param(1.0, "Divide the logits of tokens already present (CTRL-style); 1 is off.",
                                       bounds=(0.0, None), low_open=True, slider=(1, 2, 0.01))
    repetition_penalty_range: int = _param(
        1024, "How many of the last tokens the three penalties look at; 0 means the whole context.",
        bounds=(0, None), slider=(0, 16384, 1))
    presence_penalty: float = _param(0.0, "Subtract this from the logit of every token already present.",
                                     bounds=(-2.0, 2.0), slider=(-2, 2, 0.05))
    frequency_penalty: float = _param(0.0, "Subtract this times the count of each token already present.",
                                      bounds=(-2.0, 2.0), slider=(-2, 2, 0.05))
    mirostat_mode: int = _param(0, "0 off, 1 Mirostat, 2 Mirostat 2.0 (replaces the truncation samplers).",
                                choices=(0, 1, 2))
    mirostat_tau: float = _param(5.0, "Mirostat target surprise.", bounds=(0.0, None), slider=(0, 10, 0.01))
    mirostat_eta: float = _param(0.1, "Mirostat learning rate.", bounds=(0.0, None), slider=(0.0, 1.0, 0.01))
    dry_multiplier: float = _param(0.0, "DRY repetition penalty strength; 0 is off.",
                                   bounds=(0.0, None), slider=(0, 5, 0.01))
    dry_base: float = _param(1.75, "DRY exponential base.", bounds=(1.0, None), slider=(1, 4, 0.01))
    dry_allowed_length: int = _param(2, "Longest repeated sequence DRY lets pass unpenalised.",
                                     bounds=(0, None), slider=(0, 20, 1))
    dry_penalty_last_n: int = _param(0, "How many last tokens DRY scans; 0 means the whole context.",
                                     bounds=(0, None), slider=(0, 16384, 1))
    dry_sequence_breakers: list[str] = _param(["\n", ":", '"', "*"], "Strings that break a repeated sequence for DRY.")
    xtc_threshold: float = _param(0.1, "XTC: tokens above this probability are candidates for exclusion.",
                                  bounds=(0.0, 1.0), slider=(0, 0.5, 0.01))
    xtc_probability: float = _param(0.0, "XTC: chance per step of excluding the top choices; 0 is off.",
                                    bounds=(0.0, 1.0), slider=(0.0, 1.0, 0.01))
    temperature_last: bool = _param(False, "Apply temperature after the truncation samplers instead of before them.")
    sampler_priority: list[str] = _param(list(DEFAULT_SAMPLER_PRIORITY),
                                         "Order in which the samplers run; unknown names are ignored.")
    seed: int | None = _param(None, "Random seed; None (or -1) draws a fresh one.")
    stop: list[str] = _param([], "Strings that end the generation; they never appear in the output.")
    ban_eos_token: bool = _param(False, "Never end on the end-of-sequence token.")
    custom_token_bans: list[int] = _param([], "Token ids that may never be generated.")
    logit_bias: dict[int, float] = _param({}, "Added to the logits of the given token ids.")
    grammar_string: str = _param("", "A GBNF grammar the output must follow (loaders that support it).")
    grammar_triggers: list[str] = _param(
        [], "Regexes that switch grammar_string on (a lazy grammar): the output is free until one matches, and "
        "the grammar applies from the match's first group (or the match) on; empty: from the first token.",
        # Set by the tool-call path only, never by a client: a trigger whose text the grammar then
        # rejects makes llama.cpp throw through its C API, which aborts the process.
        internal=True)
    truncation_length: int = _param(0, "Prompt + reply budget in tokens; 0 means the model's context length.",
                                    bounds=(0, None))
    add_bos_token: bool = _param(True, "Prepend the beginning-of-sequence token when the prompt does not start with it.")
    skip_special_tokens: bool = _param(True, "Leave special tokens out of the returned text.")
    logprobs: int = _param(0, "Report the log-probability of each generated token and of its top N alternatives; "
                           "0 is off.", bounds=(0, 1000))

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
        self.grammar_triggers = [t for t in (self.grammar_triggers or []) if isinstance(t, str) and t]

    def _validate(self) -> None:
        # Every range first, then every choice: one order, whichever fields are bad.
        for f in _BOUNDED:
            low, high = f.metadata["bounds"]
            _check_range(self, f.name, low, high, low_open=f.metadata.get("low_open", False))
        for f in _CHOICES:
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if value not in choices:
                allowed = ", ".join(str(c) for c in choices[:-1]) + f" or {choices[-1]}"
                raise InvalidRequestError(f"{f.name} must be {allowed}, got {value!r}", f.name)
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


PARAM_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(SamplingParams)}
"""Each field by name: its metadata holds the help and the rules (see `_param`)."""
_BOUNDED = tuple(f for f in PARAM_FIELDS.values() if "bounds" in f.metadata)
_CHOICES = tuple(f for f in PARAM_FIELDS.values() if "choices" in f.metadata)


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
