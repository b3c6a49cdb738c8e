"""Sampler presets: partial YAML files in presets/, laid over the SamplingParams defaults.

A preset names only what it changes (`temperature: 0.7`), so a preset written today still
means the same thing when a new sampler is added later with a neutral default. Loading
validates the values by building a SamplingParams; saving writes only the fields that
differ from the defaults, atomically. Every name goes through `safe_join`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import yaml

from modules.core.errors import InvalidRequestError, NotFoundError
from modules.core.paths import atomic_write_text, check_name, safe_join
from modules.core.safe_yaml import load_yaml_file
from modules.core.sampling import PARAM_FIELDS, SamplingParams

log = logging.getLogger(__name__)

SUFFIX = ".yaml"

#: Fields that belong to the request rather than to a sampling style: a preset does not
#: save them, and applying a preset keeps the session's values unless the preset names them.
SESSION_FIELDS: frozenset[str] = frozenset({
    "max_new_tokens", "truncation_length", "seed", "stop", "ban_eos_token", "custom_token_bans",
    "logit_bias", "grammar_string", "grammar_triggers", "add_bos_token", "skip_special_tokens", "logprobs",
})

#: Fields a preset saves: the samplers and their order.
PRESET_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(SamplingParams) if f.name not in SESSION_FIELDS
)


class PresetNotFoundError(NotFoundError):
    """No preset of that name in presets/."""


class PresetStore:
    """The presets folder: list, load, save, delete YAML presets by name.

    A name is the file name without `.yaml`; names are checked with `check_name`, so
    `../x` or `CON` never reach the disk.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, name: str) -> Path:
        check_name(name, "preset name")
        return safe_join(self.folder, name + SUFFIX, what="preset name")

    def list(self) -> list[str]:
        """Preset names, sorted case-insensitively; an absent folder holds none."""
        if not self.folder.is_dir():
            return []
        names = [p.name[: -len(SUFFIX)] for p in self.folder.iterdir() if p.is_file() and p.name.endswith(SUFFIX)]
        return sorted((n for n in names if not n.startswith(".")), key=str.lower)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def load(self, name: str) -> dict[str, Any]:
        """The preset's known fields (a partial dict), validated; unknown keys are logged and dropped.

        Raises PresetNotFoundError when absent, InvalidRequestError when the YAML is bad or
        a value is out of range (the message names the field).
        """
        path = self._path(name)
        if not path.is_file():
            raise PresetNotFoundError(f"no preset named {name!r} in {self.folder.name}/", "preset")
        try:
            data = load_yaml_file(path, f"preset {name!r}", "preset") or {}
        except yaml.YAMLError as exc:
            raise InvalidRequestError(f"preset {name!r} is not valid YAML: {exc}", "preset") from None
        if not isinstance(data, dict):
            raise InvalidRequestError(f"preset {name!r} must hold a mapping of parameter: value", "preset")
        known = SamplingParams.field_names()
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            log.warning("preset %s: ignoring unknown keys %s", name, ", ".join(unknown))
        values = {k: v for k, v in data.items() if k in known}
        validate(values, f"preset {name!r}")
        return values

    def save(self, name: str, values: dict[str, Any]) -> Path:
        """Write the preset fields of `values` that differ from the defaults; returns the path."""
        path = self._path(name)
        diff = preset_diff(values)
        text = yaml.safe_dump(diff, sort_keys=False, allow_unicode=True) if diff else "{}\n"
        atomic_write_text(path, text)
        return path

    def delete(self, name: str) -> None:
        """Remove the preset; PresetNotFoundError when it does not exist."""
        path = self._path(name)
        if not path.is_file():
            raise PresetNotFoundError(f"no preset named {name!r} in {self.folder.name}/", "preset")
        path.unlink()


def validate(values: dict[str, Any], what: str = "parameters") -> SamplingParams:
    """SamplingParams over the defaults from `values`; InvalidRequestError naming `what` if bad."""
    try:
        return SamplingParams.from_mapping(values)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{what}: {exc}", exc.param) from None
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{what}: {exc}") from None


def preset_diff(values: dict[str, Any]) -> dict[str, Any]:
    """The preset fields of `values` (validated) that differ from the SamplingParams defaults."""
    params = validate(values)
    defaults = SamplingParams()
    out: dict[str, Any] = {}
    for name in PRESET_FIELDS:
        value = getattr(params, name)
        if value != getattr(defaults, name):
            out[name] = value
    return out


def apply_preset(session: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    """A new session dict: sampler fields reset to the defaults, the preset laid over them.

    Session fields (max_new_tokens, stop strings, seed...) keep the session's values unless
    the preset names them, so picking a preset never drops the user's stop strings.
    """
    defaults = dataclasses.asdict(SamplingParams())
    out = dict(session)
    out.update({name: defaults[name] for name in PRESET_FIELDS})
    out.update(preset)
    return dataclasses.asdict(validate(out))


def check_preset_name(name: object) -> str:
    """`name` stripped, if it can be a preset file name; UnsafePathError otherwise."""
    return check_name(name.strip() if isinstance(name, str) else name, "preset name")


def parameter_docs() -> dict[str, str]:
    """Each SamplingParams field's help (its metadata, written once next to the field), by name.

    The UI shows these as tooltips.
    """
    return {name: f.metadata["help"] for name, f in PARAM_FIELDS.items()}
