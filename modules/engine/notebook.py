"""Notebook prompt assembly, the way Kobold Lite builds a story prompt.

Memory goes at the very top and is never cut; the author's note is inserted as its own
line a few lines above the end of the story (`depth`), where it steers the next words
without becoming the last thing the model reads; when the story does not fit the budget,
whole lines are dropped from the start of the story, never from memory or the note.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

AUTHORS_NOTE_TEMPLATE = "[Author's note: {note}]"
"""How the note is shown to the model (Kobold Lite's wording); `{note}` is the user's text."""
DEFAULT_DEPTH = 3
"""Lines from the end of the story at which the note goes (Kobold inserts it ~3 paragraphs up)."""
MAX_DEPTH = 50


@dataclass(frozen=True)
class NotebookPrompt:
    """The prompt sent to the model and how many story lines were left out to fit."""

    prompt: str
    dropped_lines: int = 0


def insert_authors_note(story: str, note: str, depth: int = DEFAULT_DEPTH,
                        template: str = AUTHORS_NOTE_TEMPLATE) -> str:
    """`story` with the formatted note on its own line before its last `depth` lines.

    Depth 0 puts the note after the story (strongest); a depth beyond the story's length
    puts it first. An empty note leaves the story unchanged. The story's end is never
    altered, so the model continues exactly where the text stops.
    """
    note = note.strip()
    if not note:
        return story
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    line = template.format(note=note)
    lines = story.splitlines(keepends=True)
    if depth == 0:
        sep = "" if not story or story.endswith("\n") else "\n"
        return f"{story}{sep}{line}\n"
    cut = max(0, len(lines) - depth)
    return "".join(lines[:cut]) + line + "\n" + "".join(lines[cut:])


def _with_memory(memory: str, body: str) -> str:
    memory = memory.strip("\n")
    if not memory:
        return body
    return f"{memory}\n{body}"


def build_prompt(story: str, memory: str = "", authors_note: str = "", depth: int = DEFAULT_DEPTH, *,
                 count_tokens: Callable[[str], int] | None = None, budget: int | None = None,
                 template: str = AUTHORS_NOTE_TEMPLATE) -> NotebookPrompt:
    """Memory + story with the author's note at `depth`, cut to `budget` tokens if given.

    `count_tokens` measures a whole prompt (with BOS if the model adds one). When the
    prompt is over `budget`, the fewest whole lines are dropped from the start of the story
    (found by bisection, so a long story costs few tokenizer calls); memory and the note
    stay. If even the last line alone is too long, that line is sent whole and the
    generator's own left cut applies.
    """
    depth = max(0, min(int(depth), MAX_DEPTH))

    def assemble(drop: int) -> str:
        lines = story.splitlines(keepends=True)
        return _with_memory(memory, insert_authors_note("".join(lines[drop:]), authors_note, depth, template))

    full = assemble(0)
    if count_tokens is None or budget is None or count_tokens(full) <= budget:
        return NotebookPrompt(full)
    total = len(story.splitlines(keepends=True))
    if total <= 1:
        return NotebookPrompt(full)
    low, high = 1, total - 1  # invariant: dropping `high` lines fits, or nothing does
    if count_tokens(assemble(high)) > budget:
        return NotebookPrompt(assemble(high), high)
    while low < high:
        mid = (low + high) // 2
        if count_tokens(assemble(mid)) <= budget:
            high = mid
        else:
            low = mid + 1
    return NotebookPrompt(assemble(high), high)
