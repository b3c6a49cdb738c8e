"""The Jinja2 sandbox chat templates render in: a budget per render and size checks before allocation.

Chat templates are untrusted code (a GGUF from the Hub carries one, users write their own).
Jinja's ImmutableSandboxedEnvironment blocks attribute escapes and caps `range()`, but a
template can still spin (`{% for %}` inside `{% for %}`, a macro calling itself twice) or
exhaust memory in one step (`'x'.ljust(10**9)`, `'%999999999d' % 1`, `(2**4096)**4096`,
printing a list that holds itself twice fifty levels deep). `BoundedSandbox` closes these:

- a budget per render (`render_budget()`): wall time, loop iterations and bytes allocated,
  checked on every loop iteration, call, filter, operator and `~`;
- a size check before every operation that can build a big string, list or number: `*`,
  `**`, `+`, `%`, `~`, string methods, `str.format`, the filters that grow their input, and
  any int argument of a filter or string method used as a width;
- a bounded walk of any container about to be printed (`{{ }}`, `string`, `tojson`,
  `join`, `~`, `%`, `format`).

Every violation raises InvalidRequestError(param="instruction_template"). Real templates
never meet the limits: they render in milliseconds and build a few copies of the prompt.
"""

from __future__ import annotations

import contextvars
import itertools
import re
import time
import types
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, Sequence, ValuesView
from contextlib import contextmanager
from functools import update_wrapper, wraps
from typing import Any, NoReturn

import jinja2
import jinja2.nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.filters import make_attrgetter
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import generate_lorem_ipsum
from markupsafe import Markup

from modules.core.errors import InvalidRequestError

PARAM = "instruction_template"
"""The request field every template error names."""
MAX_TEXT_CHARS = 16_000_000
"""Longest prompt (or string built inside a template) accepted: ~4M tokens, far past any context."""
MAX_EXPONENT = 4096
RENDER_TIME_LIMIT_S = 1.0
"""Wall time one render may take; real templates take milliseconds even for long chats."""
MAX_LOOP_STEPS = 1_000_000
"""Loop iterations one render may run, all loops together (a 10,000-message chat uses ~100,000)."""
MAX_ITEMS = 100_000
"""Longest list a template may build (`*`, `+`, `|list`, `split`...): what Jinja's sandbox allows range()."""
MAX_WIDTH = 1_000_000
"""Largest int a filter or a string method may take as a width or a count (`center`, `ljust`, `batch`...)."""
MAX_INT_BITS = 100_000
"""Largest integer a template may compute (30,000 digits; Python prints at most 4,300 anyway)."""
MAX_RENDER_BYTES = 64 * 2**20
"""Memory one render may allocate, all its operations together: a bound on what it can hold on to."""
MAX_SLOW_CHARS = 1_000_000
"""Longest text given to the filters that work word by word in Python, which no time check can interrupt."""
MAX_WALK_NODES = 1_000_000
"""Most values visited when measuring a container before it is printed."""
MAX_FOLD_CHARS = 4096
"""Largest constant Jinja may fold at compile time, where no budget runs; bigger ones are left to the render."""
MAX_LIPSUM_WORDS = 100_000
"""Most words `lipsum()` may generate (n paragraphs of up to `max` words)."""
_MAX_DEPTH = 200
"""Deepest nesting a printed value may have (Python's own repr gives up near 1,000)."""


# ----------------------------------------------------------------------------- the render budget


class _Budget:
    """What one render may still spend: time, loop iterations, bytes allocated.

    A failure is sticky: once over, every later check fails with the first message, so an
    error swallowed somewhere inside Jinja cannot buy the template more time.
    """

    __slots__ = ("time_limit", "deadline", "max_steps", "steps_left", "bytes_left", "failure")

    def __init__(self, time_limit: float, max_steps: int) -> None:
        self.time_limit = time_limit
        self.deadline = time.monotonic() + time_limit
        self.max_steps = max_steps
        self.steps_left = max_steps
        self.bytes_left = MAX_RENDER_BYTES
        self.failure: str | None = None

    def step(self) -> None:
        """One loop iteration."""
        self.steps_left -= 1
        if self.steps_left < 0:
            self.fail(f"the instruction template ran over {self.max_steps:,} loop iterations")
        self.spend(0)

    def spend(self, nbytes: int) -> None:
        """One operation that allocated about `nbytes`."""
        self.bytes_left -= nbytes
        if self.bytes_left < 0:
            self.fail(f"the instruction template allocated over {MAX_RENDER_BYTES // 2**20} MiB")
        if time.monotonic() > self.deadline:
            self.fail(f"the instruction template took longer than {self.time_limit} s")

    def fail(self, message: str) -> NoReturn:
        self.failure = self.failure or message
        self.deadline = float("-inf")
        raise InvalidRequestError(self.failure, PARAM)


# One renderer serves many threads (and asyncio tasks) at once, so the running render's
# budget lives in a context variable, set and reset by _render_bounded.
_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("template_budget", default=None)


@contextmanager
def render_budget(time_limit: float = RENDER_TIME_LIMIT_S, max_loop_steps: int = MAX_LOOP_STEPS) -> Iterator[None]:
    """Run the block under a fresh budget; the previous one (normally none) is restored on the
    way out, error or not, so no render ever inherits what another one spent."""
    token = _BUDGET.set(_Budget(time_limit, max_loop_steps))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _refuse(message: str) -> NoReturn:
    budget = _BUDGET.get()
    if budget is not None:
        budget.fail(message)
    raise InvalidRequestError(message, PARAM)


def _char_limit() -> int:
    # No budget means Jinja is folding constants at compile time: a refusal there only
    # leaves the expression to be computed, under a budget, at render time.
    return MAX_TEXT_CHARS if _BUDGET.get() is not None else MAX_FOLD_CHARS


def _check_chars(size: int) -> None:
    limit = _char_limit()
    if size > limit:
        _refuse(f"the instruction template would build a string of {size:,} characters (the limit is {limit:,})")


def _check_items(count: int) -> None:
    limit = MAX_ITEMS if _BUDGET.get() is not None else MAX_FOLD_CHARS
    if count > limit:
        _refuse(f"the instruction template would build a list of {count:,} items (the limit is {limit:,})")


def _check_widths(args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse an int argument big enough to be a memory bomb as a width or a count."""
    for value in itertools.chain(args, kwargs.values()) if kwargs else args:
        if type(value) is int and not -MAX_WIDTH <= value <= MAX_WIDTH:
            shown = f"{value:,}" if value.bit_length() < 64 else f"a {value.bit_length():,}-bit number"
            _refuse(f"the instruction template passes {shown} as a width or a count (the limit is {MAX_WIDTH:,})")


def _spent(result: Any) -> Any:
    """`result`, once its size is checked and charged to the render (and its time checked)."""
    # Sizes are estimated rather than asked of sys.getsizeof, which costs more than the rest
    # of this function together; this runs on every operation of every render.
    if isinstance(result, str):
        if len(result) > MAX_FOLD_CHARS:
            _check_chars(len(result))
        nbytes = _str_bytes(result)
    elif isinstance(result, (list, tuple)):
        if len(result) > MAX_FOLD_CHARS:
            _check_items(len(result))
        nbytes = 56 + 56 * len(result)  # the pointers, and the fresh small objects they usually point to
    elif isinstance(result, bytes):
        if len(result) > MAX_FOLD_CHARS:
            _check_chars(len(result))
        nbytes = 33 + len(result)
    elif isinstance(result, dict):
        nbytes = 64 + 100 * len(result)
    else:
        nbytes = 28 + result.bit_length() // 8 if type(result) is int else 0
    budget = _BUDGET.get()
    if budget is not None:  # budget.spend(nbytes), inlined
        budget.bytes_left -= nbytes
        if budget.bytes_left < 0 or time.monotonic() > budget.deadline:
            budget.spend(0)
    return result


def _str_bytes(text: str) -> int:
    return 49 + len(text) if text.isascii() else 76 + 4 * len(text)  # at most 4 bytes a character


class _CountedIter:
    """A `for` loop's iterable, charging one budget step per item (sized when the source is)."""

    __slots__ = ("_iterable", "_iterator", "_budget")

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterable = iterable
        self._iterator = iter(iterable)
        self._budget = _BUDGET.get()

    def __iter__(self) -> _CountedIter:
        return self

    def __next__(self) -> Any:
        item = next(self._iterator)
        if self._budget is not None:
            self._budget.step()
        return item

    def __len__(self) -> int:
        # loop.length / loop.last use len() when it exists, instead of reading the rest into a list.
        return len(self._iterable)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- measuring before building


_SHORT = frozenset({float, bool, type(None)})
"""Types whose str() or JSON is at most 24 characters."""
_SCALARS = frozenset({str, Markup, int, float, bool, type(None)})
"""Types whose str() is never long: strings are checked where they are built, ints have 4,300 digits at most."""


class _TextSize:
    """How long str(), repr() or json.dumps() of a value would be, estimated without building it.

    Each container is measured once (memo by identity, the object kept alive so its id is
    not reused), so a list holding itself twice fifty levels deep, 2**50 items in print but
    fifty in memory, is refused in fifty steps. Strings count at their escaped worst case.
    """

    __slots__ = ("limit", "sep", "indent", "ascii_only", "memo", "nodes")

    def __init__(self, item_sep: int = 2, key_sep: int = 2, indent: int | None = None,
                 ascii_only: bool = False) -> None:
        self.limit = _char_limit()
        self.sep = item_sep + key_sep  # every child pays both: a slight overestimate for lists
        self.indent = indent
        self.ascii_only = ascii_only
        self.memo: dict[Any, tuple[Any, int]] = {}
        self.nodes = 0

    def measure(self, value: Any, depth: int = 0) -> int:
        leaf = self._leaf(value)
        if leaf >= 0:
            return leaf
        children = _children(value)
        if children is None:
            return 64
        key = id(value) if self.indent is None else (id(value), depth)
        seen = self.memo.get(key)
        if seen is not None:
            return seen[1]
        if depth > _MAX_DEPTH:
            _refuse(f"the instruction template would print a value nested over {_MAX_DEPTH} levels deep")
        self.memo[key] = (value, 5)  # a container met again inside itself prints as [...]
        pad = 0 if self.indent is None else (self.indent + 1) * (depth + 1) + 1
        total, each = 16 + pad, self.sep + pad
        for child in children:
            # Leaves (most of the values) inline: this walk runs before every tojson.
            kind = type(child)
            if kind is str:
                size = self._leaf(child)
            elif kind is int:
                size = child.bit_length() * 31 // 100 + 2
            elif kind in _SHORT:
                size = 24
            else:
                size = self.measure(child, depth + 1)
            total += size + each
            self.nodes += 1
            if total > self.limit or self.nodes > MAX_WALK_NODES:
                _refuse(f"the instruction template would print a value of over {min(total, self.limit):,} "
                        f"characters (the limit is {self.limit:,})")
        self.memo[key] = (value, total)
        return total

    def _leaf(self, value: Any) -> int:
        """The printed size of a string or a number, or -1 for anything else."""
        if isinstance(value, str):
            n = len(value)
            if value.isprintable() and (not self.ascii_only or value.isascii()):
                return 2 * n + 2  # quotes, and a backslash before each quote or backslash
            return (6 if value.isascii() else 12) * n + 2  # \u0000; \ud83d\ude00
        if type(value) in _SHORT:
            return 24
        if isinstance(value, int):
            return value.bit_length() * 31 // 100 + 2
        if isinstance(value, bytes):
            return 4 * len(value) + 3
        return -1


def _children(value: Any) -> Iterable[Any] | None:
    kind = type(value)
    if kind is list or kind is tuple:  # the common cases first: the ABC checks below are slow
        return value  # type: ignore[no-any-return]
    if kind is dict:
        return itertools.chain.from_iterable(value.items())
    if isinstance(value, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
        return value
    if isinstance(value, jinja2.utils.Namespace):  # prints as <Namespace {its attributes}>
        value = object.__getattribute__(value, "_Namespace__attrs")
    if isinstance(value, Mapping):
        return itertools.chain.from_iterable(value.items())
    return None


def _text_len(value: Any) -> int:
    """len(str(value)), estimated for containers, refused over the limit."""
    return len(value) if isinstance(value, str) else _texts_len((value,))


def _texts_len(values: Iterable[Any], extra: int = 0) -> int:
    """The length of all `values` printed one after the other (plus `extra`), refused over the limit."""
    size, walker = extra, None
    for value in values:
        if isinstance(value, str):
            size += len(value)
        elif type(value) in _SCALARS:
            size += 24 if type(value) is not int else value.bit_length() * 31 // 100 + 2
        else:  # one walker for all: a container met twice is measured once
            walker = walker or _TextSize()
            size += walker.measure(value)
    if size > MAX_FOLD_CHARS:
        _check_chars(size)
    return size


def text_of(value: Any) -> str:
    """str(value), refused before it is built when it would pass the limit."""
    return value if isinstance(value, str) else (_text_len(value), str(value))[1]


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _bounded_list(value: Any) -> list[Any]:
    """The items of `value` as a list, refusing more than MAX_ITEMS before taking them all."""
    if isinstance(value, (str, list, tuple, dict)):
        _check_items(len(value))
        return list(value)
    items = list(itertools.islice(value, MAX_ITEMS + 1))
    _check_items(len(items))
    return items


def _line_breaks(text: str) -> int:
    return sum(text.count(c) for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def _replace_size(text: str, old: Any, new: Any, count: Any) -> int:
    old, new = text_of(old), text_of(new)
    hits = text.count(old) if old else len(text) + 1
    if type(count) is int and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


_PERCENT_SPEC = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.?)", re.S)
_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?", re.S)


def _check_percent(fmt: str | bytes, values: Any) -> None:
    """Refuse `fmt % values` when widths, precisions and arguments add up past the limit."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    if "%" not in text:
        return
    if text.count("%") > MAX_ITEMS:  # each field costs a Python step here
        _refuse(f"the instruction template formats over {MAX_ITEMS:,} fields at once")
    args = values if isinstance(values, tuple) else (values,)
    mapping = values if isinstance(values, Mapping) else {}
    size, position, walker = len(text), 0, _TextSize()  # one walker: each container measured once
    for match in _PERCENT_SPEC.finditer(text):
        key, width, precision, conversion = match.groups()
        if conversion == "%":
            continue
        for part in (width, precision):
            if part == "*":  # the width is the next argument
                star = args[position] if position < len(args) else 0
                position += 1
                size += abs(star) if type(star) is int else 0
            elif part:
                size += int(part)
        if key is not None:
            value = mapping.get(key)
        else:
            value = args[position] if position < len(args) else None
            position += 1
        if conversion in ("r", "a"):
            size += walker.measure(value)
        else:  # %f of 1e300 prints 300 digits before any precision
            shown = len(value) if isinstance(value, str) else walker.measure(value)
            size += shown if conversion == "s" else max(shown, 320)
        _check_chars(size)


class _BoundedFormatter(SandboxedFormatter):
    """str.format with each field measured before it is built, and the running total checked."""

    def vformat(self, format_string: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        self._size = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:  # !r or !s prints the value before format_field sees it
            _TextSize().measure(value)
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        match = _FORMAT_SPEC.match(format_spec)  # all its parts are optional: it always matches
        width, precision = (int(part or 0) for part in match.groups())  # type: ignore[union-attr]
        self._size += width + precision + (len(value) if isinstance(value, str) else max(_text_len(value), 24))
        _check_chars(self._size)
        return _spent(super().format_field(value, format_spec))


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    """The same, for a Markup format string (its arguments are escaped)."""


# ----------------------------------------------------------------------------- guarded filters and globals


def _check_join(owner: Any, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    items = _bounded_list(value)
    separator = text_of(_arg(args, kwargs, 0, "d", ""))
    attribute = _arg(args, kwargs, 1, "attribute", None)
    shown = items if attribute is None else map(make_attrgetter(owner.environment, attribute), items)
    _texts_len(shown, len(separator) * max(len(items) - 1, 0))
    return items


def _check_sum(owner: Any, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    items = _bounded_list(value)
    start = _arg(args, kwargs, 1, "start", 0)
    if isinstance(start, (list, tuple)):  # summing sequences copies the total so far at every step
        attribute = _arg(args, kwargs, 0, "attribute", None)
        parts = items if attribute is None else map(make_attrgetter(owner, attribute), items)
        total, copied = len(start), 0
        for part in parts:
            total += len(part) if isinstance(part, (list, tuple)) else 0
            copied += total
        _check_items(total)
        if copied > MAX_TEXT_CHARS:
            _refuse(f"the instruction template's sum would copy {copied:,} items")
    return items


def _check_tojson(owner: Any, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not args and not kwargs:  # json.dumps(value, ensure_ascii=False), the common call, measured quickly
        if type(value) is not str:
            _TextSize().measure(value)
        elif 6 * len(value) + 2 > MAX_FOLD_CHARS:  # a message's text: escaped at most 6x (\u0000)
            _check_chars(6 * len(value) + 2)
        return value
    indent = _arg(args, kwargs, 1, "indent", None)
    separators = _arg(args, kwargs, 2, "separators", None)
    item_sep, key_sep = separators or ((",", ": ") if indent is not None else (", ", ": "))
    width = len(indent) if isinstance(indent, str) else indent if type(indent) is int else None
    _TextSize(len(text_of(item_sep)), len(text_of(key_sep)), width,
              bool(_arg(args, kwargs, 0, "ensure_ascii", False))).measure(value)
    return value


def _check_pprint(owner: Any, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    size = _TextSize().measure(value)
    if size > 80:  # wider than a line: one item a line, each indented by up to everything before it
        _check_chars(size * size // 2)
    return value


_Args = tuple[Any, ...]
_Kwargs = dict[str, Any]


def _indent_size(text: str, args: _Args, kwargs: _Kwargs) -> int:
    width = _arg(args, kwargs, 0, "width", 4)
    lines = _line_breaks(text) + 1
    _check_items(lines)  # indent splits the text into its lines first
    return len(text) + lines * (max(width, 0) if isinstance(width, int) else len(text_of(width)))


def _urlize_size(text: str, args: _Args, kwargs: _Kwargs) -> int:
    # Every word may become <a href="word" target="..." rel="...">word</a>.
    extra = sum(len(text_of(_arg(args, kwargs, i, key, None) or "")) for i, key in ((2, "target"), (3, "rel")))
    return 3 * len(text) + (len(text) // 2 + 1) * (64 + extra)


def _format_size(text: str, args: _Args, kwargs: _Kwargs) -> int:
    _check_percent(text, kwargs or args)
    return 0


_TEXT_SIZES: dict[str, Callable[[str, _Args, _Kwargs], int] | None] = {
    # The filters that print their input (a container is measured first), and how long
    # their result can be; None: no longer than the input (or bounded by a checked width).
    "center": None, "safe": None, "string": None, "striptags": None, "trim": None, "wordcount": None,
    **dict.fromkeys(("capitalize", "lower", "title", "upper"),  # "ﬃ".upper() == "FFI"
                    lambda text, args, kwargs: len(text) if text.isascii() else 3 * len(text)),
    **dict.fromkeys(("e", "escape", "forceescape", "xmlattr"),  # "&" becomes "&amp;"
                    lambda text, args, kwargs: len(text) + 5 * sum(text.count(c) for c in "&<>'\"")),
    "format": _format_size, "indent": _indent_size, "urlize": _urlize_size,
    "replace": lambda text, args, kwargs: _replace_size(
        text, _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", ""), _arg(args, kwargs, 2, "count", None)),
    "truncate": lambda text, args, kwargs: len(text) + len(text_of(_arg(args, kwargs, 2, "end", "..."))),
    "urlencode": lambda text, args, kwargs: len(text) * (3 if text.isascii() else 12),
    "wordwrap": lambda text, args, kwargs: len(text) + (len(text) + 1) * len(
        text_of(_arg(args, kwargs, 2, "wrapstring", None) or "\n")),
}
_SLOW_FILTERS = frozenset({"wordwrap", "urlize", "title", "wordcount", "striptags", "urlencode", "xmlattr"})


def _check_text(name: str) -> Callable[..., Any]:
    """The check of filter `name`, which prints its input: the result's size, before it is built."""
    size_of = _TEXT_SIZES[name]
    slow = name in _SLOW_FILTERS

    def check(owner: Any, value: Any, args: _Args, kwargs: _Kwargs) -> Any:
        text = value if type(value) is str else text_of(value)
        if slow and len(text) > MAX_SLOW_CHARS:  # these work word by word in Python, past any time check
            _refuse(f"the instruction template gives the {name} filter {len(text):,} characters "
                    f"(the limit is {MAX_SLOW_CHARS:,})")
        if size_of is not None:
            size = size_of(text, args, kwargs)
            if size > MAX_FOLD_CHARS:
                _check_chars(size)
        return value

    return check


_FILTER_CHECKS: dict[str, Callable[..., Any]] = {
    "join": _check_join, "sum": _check_sum, "tojson": _check_tojson, "pprint": _check_pprint,
    "list": lambda owner, value, args, kwargs: _bounded_list(value),
    **{name: _check_text(name) for name in _TEXT_SIZES},
}


def guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Filter `func`, installed as `name`, with its int arguments bounded, its result measured
    first where it can be big (the checks of Jinja's filter `name`, and of `tojson`), and charged."""
    skip = 0 if getattr(func, "jinja_pass_arg", None) is None else 1  # the context / environment argument
    check = _FILTER_CHECKS.get(name)

    @wraps(func)  # keeps jinja_pass_arg, so Jinja still passes the context
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) > skip + 1:
            _check_widths(args[skip + 1:], kwargs)
        if check is not None and len(args) > skip:
            value = args[skip]
            checked = check(args[0] if skip else None, value, args[skip + 1:], kwargs)
            if checked is not value:  # join, list, sum: the items, read once
                args = (*args[:skip], checked, *args[skip + 1:])
        return _spent(func(*args, **kwargs))

    return guarded


_STR_CASE_METHODS = frozenset({"upper", "lower", "title", "capitalize", "swapcase", "casefold"})


def _check_str_method(text: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a str method call whose result would pass the limit; returns the args to call it with."""
    _check_widths(args, kwargs)
    if name == "join" and args:
        items = _bounded_list(args[0])
        _check_chars(sum(len(i) for i in items if isinstance(i, str)) + len(text) * max(len(items) - 1, 0))
        return (items, *args[1:])
    if name in ("split", "rsplit", "splitlines", "partition", "rpartition"):
        if (budget := _BUDGET.get()) is not None:  # the pieces hold the whole text again: charge it
            budget.spend(_str_bytes(text))
        if len(text) > MAX_ITEMS and name != "partition" and name != "rpartition":
            _check_items(_pieces(text, name, args, kwargs))
    elif name == "replace" and len(args) >= 2:
        _check_chars(_replace_size(text, args[0], args[1], _arg(args, kwargs, 2, "count", -1)))
    elif name == "expandtabs":
        tab = _arg(args, kwargs, 0, "tabsize", 8)
        _check_chars(len(text) + text.count("\t") * (tab if type(tab) is int and tab > 0 else 0))
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        _check_chars(len(text) * max(longest, 1))
    elif name in _STR_CASE_METHODS and not text.isascii():
        _check_chars(3 * len(text))
    return args


_ASCII_SPACES = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_OTHER_SPACES = "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def _pieces(text: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """How many strings split, rsplit or splitlines would make, counted without making them."""
    if name == "splitlines":
        return _line_breaks(text) + 1
    sep, most = _arg(args, kwargs, 0, "sep", None), _arg(args, kwargs, 1, "maxsplit", -1)
    if isinstance(sep, str) and sep:
        pieces = text.count(sep) + 1
    else:  # at most one piece more than there are whitespace characters
        spaces = _ASCII_SPACES if text.isascii() else _ASCII_SPACES + _OTHER_SPACES
        pieces = sum(text.count(c) for c in spaces) + 1
    return min(pieces, most + 1) if type(most) is int and most >= 0 else pieces


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # Jinja's argument names
    if type(n) is int and type(max) is int and n * max > MAX_LIPSUM_WORDS:
        _refuse(f"the instruction template asks lipsum for up to {n * max:,} words (the limit is {MAX_LIPSUM_WORDS:,})")
    return str(generate_lorem_ipsum(n=n, html=html, min=min, max=max))


def _finalize(value: Any) -> Any:
    """What `{{ value }}` prints, unchanged; a container is measured first (it may be 2**50 items in print)."""
    if type(value) not in _SCALARS:
        _texts_len((value,))
    return value


class _BudgetCodeGenerator(CodeGenerator):
    """Jinja's compiler, with every loop's iterable counted and every `~` measured before it joins.

    The rest of the sandbox sees calls, filters and operators; plain iteration and `~` compile
    to bare Python and would escape any budget without this.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop_iterables: set[int] = set()  # ids of nodes of the AST, alive while it compiles

    def visit_For(self, node: jinja2.nodes.For, frame: Frame) -> None:
        # The iterable is wrapped wherever Jinja writes it (see visit), so plain, `loop`,
        # filtered (`if`) and recursive loops are all counted; a recursive loop's calls to
        # loop(children) go through BoundedSandbox.call, which wraps those iterables too.
        self._loop_iterables.add(id(node.iter))
        super().visit_For(node, frame)

    def visit(self, node: jinja2.nodes.Node, *args: Any, **kwargs: Any) -> Any:
        if id(node) not in self._loop_iterables:
            return super().visit(node, *args, **kwargs)
        self.write("environment.count_loop(")
        super().visit(node, *args, **kwargs)
        self.write(")")
        return None

    @optimizeconst
    def visit_Getitem(self, node: jinja2.nodes.Getitem, frame: Frame) -> None:
        # Jinja writes a slice as a bare Python subscript; a slice is a copy, so it is charged.
        if not isinstance(node.arg, jinja2.nodes.Slice):
            super().visit_Getitem(node, frame)
            return
        self.write("environment.spent(")
        super().visit_Getitem(node, frame)
        self.write(")")

    @optimizeconst
    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        # Jinja's own choice of join function (Markup-aware or not), passed to checked_concat.
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            join = "markup_join"
        else:
            join = "str_join"
        self.write(f"environment.checked_concat({join}, (")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")


def _checked_join(parts: Sequence[str]) -> str:
    """The join behind macro results, `{% set %}` blocks and `{% filter %}` blocks."""
    _check_chars(sum(map(len, parts)))
    return _spent("".join(parts))


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with a budget per render and size checks before big allocations.

    The sandbox itself blocks attribute escapes and caps `range()`. On top of it: every loop
    iteration, call, filter, operator and `~` checks the render's budget (time, loop steps,
    bytes allocated); `*`, `**`, `+`, `%`, `~`, string methods, `str.format` and the filters
    that can grow their input measure the result first; and whatever prints a container
    (`{{ }}`, `string`, `tojson`, `join`, `~`, `%`, `format`) measures it with a bounded walk.
    Add filters through `guard_filter`. Checks run only inside `render_budget()`; outside it
    (Jinja folding constants at compile time) the size limits are MAX_FOLD_CHARS, so anything
    bigger is left for the render.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BudgetCodeGenerator
    concat = staticmethod(_checked_join)
    count_loop = staticmethod(_CountedIter)
    spent = staticmethod(_spent)

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=_finalize, **options)
        self.filters = {name: guard_filter(name, func) for name, func in self.filters.items()}
        self.globals["lipsum"] = _lipsum

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "+" and type(left) is str and type(right) is str:
            # How templates build prompts: hundreds per render, so _spent is inlined here.
            size = len(left) + len(right)
            if size > MAX_FOLD_CHARS:
                _check_chars(size)
            result = left + right
            budget = _BUDGET.get()
            if budget is not None:
                budget.bytes_left -= _str_bytes(result)
                if budget.bytes_left < 0 or time.monotonic() > budget.deadline:
                    budget.spend(0)
            return result
        if operator == "**":
            _check_power(left, right)
        elif operator == "*":
            _check_product(left, right)
        elif operator == "+":
            if isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
                if len(left) + len(right) > MAX_FOLD_CHARS:
                    _check_chars(len(left) + len(right))
            elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
                _check_items(len(left) + len(right))
        elif isinstance(left, (str, bytes)):  # "%": printf-style formatting, not a modulo
            _check_percent(left, right)
        return _spent(super().call_binop(context, operator, left, right))

    def checked_concat(self, join: Callable[[Iterable[Any]], str], parts: tuple[Any, ...]) -> str:
        """`a ~ b ~ c`: the parts are measured (printed containers included) before they are joined."""
        _texts_len(parts)
        return _spent(join(parts))

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        kind = type(__obj)
        if kind is types.BuiltinMethodType or kind is types.MethodType:  # 'x'.ljust, or a Markup method
            owner = __obj.__self__
            if isinstance(owner, str):
                args = _check_str_method(owner, __obj.__name__, args, kwargs)
            elif isinstance(owner, bytes):
                _check_widths(args, kwargs)
        elif kind is LoopContext and args:  # loop(children) in a recursive loop: count those iterations too
            args = (_CountedIter(args[0]), *args[1:])
        # The time is checked after the call: a macro that recurses without end meets Python's
        # recursion limit, and one that recurses wide returns (and is checked) all the time.
        return _spent(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # Jinja's own wrapper, with a formatter that measures each field before building it.
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or value.__name__ not in (
                "format", "format_map") or not isinstance(value.__self__, str):
            return None
        text = value.__self__
        formatter = _BoundedEscapeFormatter(self, escape=text.escape) if isinstance(text, Markup) else \
            _BoundedFormatter(self)
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                args, kwargs = (), args[0]
            return type(text)(formatter.vformat(text, args, kwargs))

        return update_wrapper(wrapper, value)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja's sandbox answers `''.__class__` with an Undefined that prints as "": safe,
        # but a template probing for an escape should be told no, not rendered silently.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed"
        )


def _check_power(base: Any, exponent: Any) -> None:
    big_base = isinstance(base, (int, float)) and not isinstance(base, bool) and abs(base) > 1
    if isinstance(exponent, int) and exponent > MAX_EXPONENT and big_base:
        _refuse(f"the instruction template raises a number to the power {exponent}, over {MAX_EXPONENT}")
    if type(base) is int and type(exponent) is int and exponent > 0 and big_base:
        _check_bits(base.bit_length() * exponent)


def _check_product(left: Any, right: Any) -> None:
    if type(left) is int and type(right) is int:  # x = x * x doubles the digits at every step
        _check_bits(left.bit_length() + right.bit_length())
    for sequence, count in ((left, right), (right, left)):
        if isinstance(count, int) and not isinstance(count, bool):
            if isinstance(sequence, (str, bytes)):
                _check_chars(len(sequence) * max(count, 0))
            elif isinstance(sequence, (list, tuple)):
                _check_items(len(sequence) * max(count, 0))


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        _refuse(f"the instruction template would compute a number of about {bits:,} bits (the limit is {MAX_INT_BITS:,})")
