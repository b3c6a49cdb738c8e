"""Instruction templates: render chat messages to a prompt, store templates, pick one per model.

Templates are Jinja2 in Hugging Face's chat-template dialect (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, `strftime_now`,
`tojson`), so a model's own `chat_template` and ooba's instruction-template YAML files both
work unchanged. They are untrusted code (a GGUF from the Hub carries one), so they run in
template_sandbox's `BoundedSandbox`, each render under a time, loop and memory budget, and
every failure comes back as `InvalidRequestError(param="instruction_template")`, never as a
crash, a hang or an exhausted machine.

Which template a model gets (`choose_template`), highest first:
  1. the user's explicit choice (a name in instruction-templates/);
  2. the model's own chat template (tokenizer_config.json / chat_template.jinja, or the
     GGUF `tokenizer.chat_template`): the people who trained the model know its format best;
  3. the first regex in models/config.yaml that matches the model name;
  4. ChatML, the most widely trained format, with a reason that says it is a guess.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import yaml

from modules.chat.template_sandbox import (
    MAX_LOOP_STEPS,
    MAX_TEXT_CHARS,
    PARAM,
    RENDER_TIME_LIMIT_S,
    BoundedSandbox,
    guard_filter,
    render_budget,
    text_of,
)
from modules.core.errors import InvalidRequestError, TemplateNotFoundError
from modules.core.paths import atomic_write_text, check_name, safe_join
from modules.core.safe_yaml import check_size, load_yaml, load_yaml_file

TEMPLATE_SUFFIXES = (".yaml", ".yml", ".jinja")
"""Files TemplateStore reads, in the order a name is looked up."""
FALLBACK_TEMPLATE = "ChatML"
MODEL_TEMPLATE_NAME = "(model's template)"
"""TemplateChoice.name when the model's own chat template is used; as a user choice it means "automatic"."""
CACHE_SIZE = 64
"""Compiled templates kept per renderer: a few models and user templates, each compiled once."""

CHATML_SOURCE = (
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}"
)
"""The fallback's source, used when instruction-templates/ChatML.yaml is missing too."""


# ----------------------------------------------------------------------------- rendering


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text for training masks.

    Some models' templates use it (transformers tracks the span); for a prompt it only has
    to render its body, or those templates would not compile here.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, as transformers' does (defence in depth)."""

    # `self` is taken from args, as Jinja's own Namespace does, so `namespace(self=...)` works.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace cannot hold the attribute {name!r}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes `<>&'` and takes no ensure_ascii; chat templates are
    # written against transformers' version, which is plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: object) -> None:
    text = text_of(message)  # a container in the message is measured before it is printed
    if len(text) > 2000:  # an error message, not a way to smuggle the prompt out
        text = text[:2000] + "…"
    raise InvalidRequestError(f"the instruction template refused this chat: {text}", PARAM)


def _strftime_now(now: Callable[[], datetime]) -> Callable[[str], str]:
    def strftime_now(fmt: str) -> str:
        if isinstance(fmt, str) and len(fmt) > 1000:  # each directive may print dozens of characters
            raise InvalidRequestError(f"the instruction template gives strftime_now a format of {len(fmt):,} "
                                      "characters", PARAM)
        return now().strftime(fmt)

    return strftime_now


@dataclass
class CacheStats:
    """How the compiled-template cache has been used (for tests and the --verbose log)."""

    hits: int = 0
    misses: int = 0
    size: int = 0


class TemplateRenderer:
    """Renders Jinja2 chat templates in a sandbox, compiling each distinct source once.

    One renderer is built by the app and shared; it is thread-safe (the cache is locked,
    compiled templates are reentrant, each render's budget is its own). `now` is the clock
    behind `strftime_now`, injectable so tests can render date-stamped templates
    deterministically; `time_limit` (seconds of wall time) and `max_loop_steps` bound each
    render, and are lowered only by tests.
    """

    def __init__(self, cache_size: int = CACHE_SIZE, now: Callable[[], datetime] = datetime.now, *,
                 time_limit: float = RENDER_TIME_LIMIT_S, max_loop_steps: int = MAX_LOOP_STEPS) -> None:
        self._env = BoundedSandbox(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag],
        )
        self._env.filters["tojson"] = guard_filter("tojson", _tojson)
        self._env.globals["raise_exception"] = _raise_exception
        self._env.globals["strftime_now"] = _strftime_now(now)
        self._env.globals["namespace"] = _Namespace
        self._time_limit = time_limit
        self._max_loop_steps = max_loop_steps
        self._cache: OrderedDict[str, jinja2.Template] = OrderedDict()
        self._cache_size = max(1, cache_size)
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def compile(self, source: str) -> jinja2.Template:
        """The compiled template for `source`, from the cache when it was compiled before.

        Raises InvalidRequestError (param "instruction_template") with Jinja's message and
        line when `source` is not valid template syntax.
        """
        if not isinstance(source, str):
            raise InvalidRequestError("the instruction template must be text", PARAM)
        with self._lock:
            template = self._cache.get(source)
            if template is not None:
                self._cache.move_to_end(source)
                self.stats.hits += 1
                return template
        try:
            template = self._env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidRequestError(
                f"the instruction template does not compile: {exc.message} (line {exc.lineno})", PARAM
            ) from exc
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"the instruction template does not compile: {exc}", PARAM) from exc
        except RecursionError as exc:  # `((((...))))` a few thousand deep overflows Jinja's parser
            raise InvalidRequestError("the instruction template does not compile: it is nested too deeply",
                                      PARAM) from exc
        with self._lock:
            self.stats.misses += 1
            self._cache[source] = template
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            self.stats.size = len(self._cache)
        return template

    def render(self, source: str, messages: Iterable[Any], *, add_generation_prompt: bool = True,
               bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
        """The prompt `source` makes of `messages` (dicts with "role" and "content", or Messages).

        `extra` reaches the template as variables too (`tools`, `date_string`,
        `enable_thinking`...); `tools` and `documents` default to None as in transformers.
        Every failure (syntax, sandbox violation, `raise_exception`, a type error inside the
        template, a result over MAX_TEXT_CHARS, the time, loop or memory budget spent) raises
        InvalidRequestError naming "instruction_template"; the messages given are never modified.
        """
        template = self.compile(source)
        variables = {"tools": None, "documents": None, **_plain(extra)}
        variables.update(messages=_plain_messages(messages), add_generation_prompt=bool(add_generation_prompt),
                         bos_token=bos_token or "", eos_token=eos_token or "")
        return _render_bounded(template, variables, self._time_limit, self._max_loop_steps)

    def render_continuing(self, source: str, messages: Iterable[Any], *, bos_token: str = "",
                          eos_token: str = "", **extra: Any) -> str:
        """The prompt with the last message (normally the assistant's) left open, to be continued.

        Used by "Continue" and "Start reply with": the last message's content is rendered
        with a unique sentinel appended, and the prompt is cut right before the sentinel, so
        whatever the template puts after a message (an end-of-turn token, the eos, a newline)
        is dropped while its header and the text so far stay exactly as the template wrote
        them. This is what transformers' `continue_final_message` does, except that the
        text's own trailing whitespace is kept (the model should continue after it).
        """
        chat = _plain_messages(messages)
        if not chat:
            raise InvalidRequestError("there is no message to continue", "messages")
        content = chat[-1].get("content")
        if not isinstance(content, str):
            raise InvalidRequestError("the message to continue has no text content", "messages")
        # Letters and digits only, so no template's escaping or trimming can alter it.
        sentinel = f"CONTINUE{uuid.uuid4().hex}"
        chat[-1] = {**chat[-1], "content": content + sentinel}
        extra.pop("add_generation_prompt", None)
        text = self.render(source, chat, add_generation_prompt=False, bos_token=bos_token,
                           eos_token=eos_token, **extra)
        cut = text.rfind(sentinel)
        if cut < 0:
            raise InvalidRequestError(
                "the instruction template leaves out the last message, so it cannot be continued", PARAM
            )
        return text[:cut]


def _render_bounded(template: jinja2.Template, variables: dict[str, Any], time_limit: float,
                    max_loop_steps: int) -> str:
    """Render `template` under a fresh budget, turning every template failure into InvalidRequestError."""
    parts: list[str] = []
    size = 0
    try:
        # The budget is reset on the way out, however the render ends: the next render on
        # this thread starts from nothing.
        with render_budget(time_limit, max_loop_steps):
            # generate() streams the output, so a runaway template is stopped at the limit
            # instead of after it has built the whole string.
            for part in template.generate(**variables):
                size += len(part)
                if size > MAX_TEXT_CHARS:
                    raise InvalidRequestError(f"the instruction template produced over {MAX_TEXT_CHARS} characters",
                                              PARAM)
                parts.append(part)
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"the instruction template failed: {exc}", PARAM) from exc
    except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError, RecursionError, MemoryError,
            AssertionError) as exc:
        # A template bug such as `'text' + 1`, a message without "content", or a filter's own
        # assertion on its arguments (`'x'|truncate(1)`).
        raise InvalidRequestError(f"the instruction template failed: {type(exc).__name__}: {exc}", PARAM) from exc
    return "".join(parts)


def _plain_messages(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Messages as fresh plain dicts: Message dataclasses become {"role", "content"}."""
    if isinstance(messages, (str, bytes, Mapping)):
        raise InvalidRequestError("messages must be a list of messages", "messages")
    chat: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, Mapping):
            chat.append(_plain(dict(message)))
        elif hasattr(message, "role") and hasattr(message, "content"):
            chat.append({"role": str(message.role), "content": _plain(message.content)})
        else:
            raise InvalidRequestError(f"a message must have a role and a content, not {message!r}", "messages")
    return chat


def _plain(value: Any) -> Any:
    """`value` rebuilt from JSON types only; anything else becomes an inert "<TypeName>".

    Objects reachable from a template are its attack surface: a rich object may have a
    method the sandbox does not know is dangerous. Plain data has none.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return f"<{type(value).__name__}>"


# ----------------------------------------------------------------------------- the store


class TemplateStore:
    """The instruction-templates/ folder: `NAME.yaml` in ooba's format, or `NAME.jinja`.

    A YAML file holds the source under `instruction_template:` (ooba's layout, so users can
    drop ooba's files in); a `.jinja` file is the source itself (the layout of a model's
    chat_template.jinja). Every name goes through check_name / safe_join; writes are atomic
    and only of templates that compile.
    """

    def __init__(self, folder: Path, renderer: TemplateRenderer) -> None:
        self.folder = Path(folder)
        self.renderer = renderer

    def list(self) -> list[str]:
        """Template names (file stems), sorted case-insensitively; unreadable names are skipped."""
        if not self.folder.is_dir():
            return []
        names = {p.stem for p in self.folder.iterdir()
                 if p.suffix in TEMPLATE_SUFFIXES and p.is_file() and _is_valid_name(p.stem)}
        return sorted(names, key=lambda n: (n.lower(), n))

    def exists(self, name: str) -> bool:
        """Whether a template called `name` is stored (refuses unsafe names like the others)."""
        return bool(self._existing(name))

    def load(self, name: str) -> str:
        """The Jinja2 source of template `name`.

        Raises UnsafePathError for a name that is not a plain file name, TemplateNotFoundError
        when there is no such template, InvalidRequestError when the file is not valid YAML,
        lacks `instruction_template`, or is in ooba's pre-Jinja `turn_template` format.
        """
        found = self._existing(name)
        if not found:
            raise TemplateNotFoundError(f"there is no instruction template called {name!r} in {self.folder.name}/",
                                        PARAM)
        path = found[0]
        try:
            check_size(path.stat().st_size, f"{self.folder.name}/{path.name}", PARAM)
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequestError(f"{self.folder.name}/{path.name} cannot be read: {exc}", PARAM) from exc
        if path.suffix == ".jinja":
            return text
        return _source_from_yaml(text, f"{self.folder.name}/{path.name}")

    def save(self, name: str, source: str) -> Path:
        """Store `source` as template `name` and return its path; it must compile first.

        An existing `.jinja` template stays a `.jinja` file; anything else is written as
        ooba-style YAML. The write is atomic: a crash leaves the old file or the new one.
        """
        self.renderer.compile(source)
        found = self._existing(name)
        path = found[0] if found else safe_join(self.folder, f"{name}.yaml", what="instruction template")
        atomic_write_text(path, source if path.suffix == ".jinja" else _yaml_from_source(source))
        return path

    def delete(self, name: str) -> None:
        """Remove template `name` (every file of that name); TemplateNotFoundError when there is none."""
        found = self._existing(name)
        if not found:
            raise TemplateNotFoundError(f"there is no instruction template called {name!r} in {self.folder.name}/",
                                        PARAM)
        for path in found:
            path.unlink(missing_ok=True)

    def _existing(self, name: str) -> list[Path]:
        # The bare name is checked first: "trailing." is refused, though "trailing..yaml" would pass.
        check_name(name, "instruction template")
        paths = (safe_join(self.folder, name + suffix, what="instruction template") for suffix in TEMPLATE_SUFFIXES)
        return [p for p in paths if p.is_file()]


def _is_valid_name(name: str) -> bool:
    try:
        check_name(name)
    except InvalidRequestError:
        return False
    return not name.startswith(".")


def _source_from_yaml(text: str, label: str) -> str:
    """The `instruction_template` string of an ooba-style YAML file, or a clear error."""
    try:
        data = load_yaml(text, label, PARAM)
    except yaml.YAMLError as exc:
        raise InvalidRequestError(f"{label} is not valid YAML: {exc}", PARAM) from exc
    if isinstance(data, dict) and isinstance(data.get("instruction_template"), str):
        return data["instruction_template"]
    if isinstance(data, dict) and "turn_template" in data:
        raise InvalidRequestError(
            f"{label} is in ooba's old turn_template format; write it as Jinja2 under `instruction_template: |-`",
            PARAM)
    raise InvalidRequestError(f"{label} must hold the template's Jinja2 source under `instruction_template:`", PARAM)


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings as `|` blocks, the way ooba's template files look."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # PyYAML falls back to a quoted style by itself when a block cannot hold the text
    # exactly (trailing spaces on a line, control characters).
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _represent_str)


def _yaml_from_source(source: str) -> str:
    text = yaml.dump({"instruction_template": source}, Dumper=_BlockDumper, allow_unicode=True, sort_keys=False,
                     width=10_000)
    if yaml.safe_load(text)["instruction_template"] != source:  # never store a template that would come back altered
        raise InvalidRequestError("the instruction template cannot be stored as YAML without changing it", PARAM)
    return text


# ----------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class TemplatePattern:
    """One models/config.yaml rule: a model whose name matches `pattern` gets `template`."""

    pattern: re.Pattern[str]
    template: str


@dataclass(frozen=True)
class TemplateChoice:
    """The template a model gets, its source, and why (shown in the UI and the --verbose log)."""

    name: str
    source: str
    reason: str
    origin: str = "fallback"
    """Which rule chose it: "user", "model", "pattern" or "fallback"."""


def load_model_patterns(path: Path) -> list[TemplatePattern]:
    """The rules of a models/config.yaml, in file order; [] when the file does not exist.

    Layout (a list, so the order of the rules is the order they are tried in):
        instruction_templates:
          - pattern: 'llama-?3'     # Python regex, searched case-insensitively in the model name
            template: Llama-3       # a name in instruction-templates/
    Raises InvalidRequestError naming the file and the entry when the YAML, a regex or a
    template name is malformed.
    """
    path = Path(path)
    if not path.is_file():
        return []
    label = f"{path.parent.name}/{path.name}"
    try:
        data = load_yaml_file(path, label, PARAM)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"{label} is not valid YAML: {exc}", PARAM) from exc
    if data is None:
        return []
    rules = data.get("instruction_templates") if isinstance(data, dict) else None
    if not isinstance(rules, list):
        raise InvalidRequestError(f"{label} must hold a list under `instruction_templates:`", PARAM)
    return [_parse_rule(rule, f"{label}, rule {number}") for number, rule in enumerate(rules, 1)]


def _parse_rule(rule: object, label: str) -> TemplatePattern:
    if not (isinstance(rule, dict) and isinstance(rule.get("pattern"), str) and isinstance(rule.get("template"), str)):
        raise InvalidRequestError(f"{label} must be a mapping with a `pattern` and a `template`, not {rule!r}", PARAM)
    try:
        compiled = re.compile(rule["pattern"], re.IGNORECASE)
    except re.error as exc:
        raise InvalidRequestError(f"{label}: {rule['pattern']!r} is not a valid regular expression: {exc}",
                                  PARAM) from exc
    check_name(rule["template"], f"template name in {label}")
    return TemplatePattern(pattern=compiled, template=rule["template"])


def match_pattern(model_name: str, patterns: Sequence[TemplatePattern]) -> TemplatePattern | None:
    """The first rule whose regex is found anywhere in `model_name`, or None."""
    return next((rule for rule in patterns if rule.pattern.search(model_name)), None)


def choose_template(model_name: str, model_template: str | None, user_choice: str | None,
                    store: TemplateStore, patterns: Sequence[TemplatePattern]) -> TemplateChoice:
    """The template for a model: user choice > the model's own > models/config.yaml > ChatML.

    `user_choice` None, "" or MODEL_TEMPLATE_NAME means "automatic". A chosen name that is
    not stored raises TemplateNotFoundError, as does a config rule naming a missing
    template (a typo there should be seen, not silently turned into ChatML).
    """
    if user_choice and user_choice != MODEL_TEMPLATE_NAME:
        return TemplateChoice(user_choice, store.load(user_choice), f"{user_choice}, chosen by the user", "user")
    if model_template and model_template.strip():
        return TemplateChoice(MODEL_TEMPLATE_NAME, model_template,
                              "the model's own chat template (it ships one, so it wins over name patterns)", "model")
    rule = match_pattern(model_name, patterns)
    if rule is not None:
        if not store.exists(rule.template):
            raise TemplateNotFoundError(
                f"models/config.yaml gives {model_name!r} the template {rule.template!r} (pattern "
                f"{rule.pattern.pattern!r}), but there is no such file in {store.folder.name}/", PARAM)
        return TemplateChoice(rule.template, store.load(rule.template),
                              f"{rule.template}: the model has no chat template and its name matches "
                              f"{rule.pattern.pattern!r} in models/config.yaml", "pattern")
    source = store.load(FALLBACK_TEMPLATE) if store.exists(FALLBACK_TEMPLATE) else CHATML_SOURCE
    return TemplateChoice(FALLBACK_TEMPLATE, source,
                          f"{FALLBACK_TEMPLATE} as a guess: the model has no chat template and no pattern in "
                          f"models/config.yaml matches {model_name!r}; choose a template if replies look wrong",
                          "fallback")
