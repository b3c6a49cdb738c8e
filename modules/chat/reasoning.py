"""Reasoning blocks: where a model's thinking starts and ends in its reply.

Pure string work shared by the tool-call parsers (modules/chat/tool_families.py): a think
block opens at the very start of the reply (after whitespace) or, when the prompt's
generation prompt already opened it (`thinking_opened`), before the first character; it
closes at its end tag. A block that never closes (a reply cut off while thinking) is all
reasoning. Each reader takes `final`: False while streaming, when the text may still grow,
so a tail that could be the start of a tag is held back rather than shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from modules.chat.tool_json import WHITESPACE

OPEN_THINK_TAGS = ("<think>", "[THINK]", "<|channel|>analysis<|message|>", "<|channel>thought")
"""Tags that, left open at the end of a rendered prompt, mean the model starts inside its thinking."""
_CLOSE_FOR = {"<think>": "</think>", "[THINK]": "[/THINK]", "<|channel|>analysis<|message|>": "<|end|>",
              "<|channel>thought": "<channel|>"}


def thinking_opened(prompt: str) -> bool:
    """True when `prompt` ends inside a think block its generation prompt opened.

    Qwen3's and DeepSeek-R1's templates end the generation prompt with `<think>\\n`; the
    model's reply then starts with thoughts and has no opening tag of its own. A prompt
    ending `<think>\\n\\n</think>\\n\\n` (thinking switched off) is closed, so False.
    """
    if not isinstance(prompt, str):
        return False
    tail = prompt.rstrip(WHITESPACE)
    return any(tail.endswith(tag) for tag in OPEN_THINK_TAGS)


def held_prefix(text: str, start: int, markers: tuple[str, ...]) -> int:
    """Index from which `text` ends with the beginning of one of `markers` (len(text) if none).

    The tail from there may still become a marker, so a stream must not show it yet.
    """
    n = len(text)
    longest = max((len(m) for m in markers), default=0)
    for cut in range(max(start, n - longest + 1), n):
        tail = text[cut:]
        if any(m.startswith(tail) for m in markers):
            return cut
    return n


@dataclass
class ThinkSplit:
    """A think block read from the start of a reply.

    `reasoning`: the text inside (None when the reply has no block); `end`: where the
    reply continues after the block; `pending`: streaming only, the text so far cannot
    be decided yet (it may still become the opening tag), so nothing after `end` is shown.
    """

    reasoning: str | None
    end: int
    pending: bool = False


def split_think(text: str, pos: int, open_tag: str, close_tag: str, *, opened: bool, final: bool) -> ThinkSplit:
    """The think block at `text[pos:]`: opened by the prompt (`opened`), or by `open_tag` first thing."""
    start = pos
    if not opened:
        body = pos
        while body < len(text) and text[body] in WHITESPACE:
            body += 1
        rest = text[body:]
        if not rest.startswith(open_tag):
            if not final and open_tag.startswith(rest):
                return ThinkSplit(None, pos, pending=True)
            return ThinkSplit(None, pos)
        start = body + len(open_tag)
    close = text.find(close_tag, start)
    if close >= 0:
        return ThinkSplit(text[start:close], close + len(close_tag))
    if final:
        return ThinkSplit(text[start:], len(text))
    cut = held_prefix(text, start, (close_tag,))
    return ThinkSplit(text[start:cut], len(text), pending=True)
