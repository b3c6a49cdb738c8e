"""Notebook prompt assembly: memory on top, author's note at a depth, fitting keeps both."""

from __future__ import annotations

import pytest

from modules.engine.notebook import build_prompt, insert_authors_note

STORY = "l1\nl2\nl3\nl4\nl5"


def test_no_memory_no_note_is_the_story_itself():
    assert build_prompt(STORY).prompt == STORY


def test_memory_goes_first_on_its_own_line():
    assert build_prompt("Once", memory="A tale of cats.\n").prompt == "A tale of cats.\nOnce"


@pytest.mark.parametrize("depth, expected", [
    (0, "l1\nl2\nl3\nl4\nl5\n[Author's note: dark]\n"),
    (1, "l1\nl2\nl3\nl4\n[Author's note: dark]\nl5"),
    (3, "l1\nl2\n[Author's note: dark]\nl3\nl4\nl5"),
    (5, "[Author's note: dark]\nl1\nl2\nl3\nl4\nl5"),
    (40, "[Author's note: dark]\nl1\nl2\nl3\nl4\nl5"),
])
def test_authors_note_depth_counts_lines_from_the_end(depth, expected):
    assert insert_authors_note(STORY, " dark ", depth) == expected


def test_story_end_is_untouched_so_generation_continues_in_place():
    prompt = build_prompt("a\nb\nThe door opened and", memory="M", authors_note="tense", depth=1).prompt
    assert prompt == "M\na\nb\n[Author's note: tense]\nThe door opened and"


def test_empty_note_and_empty_story():
    assert insert_authors_note(STORY, "  ", 2) == STORY
    assert build_prompt("", memory="M", authors_note="n").prompt == "M\n[Author's note: n]\n"


def test_custom_template():
    assert insert_authors_note("a\nb", "x", 1, template="[Style: {note}]") == "a\n[Style: x]\nb"


def test_fitting_drops_story_lines_from_the_start_and_keeps_memory_and_note():
    story = "".join(f"line {i}\n" for i in range(100)) + "end"
    calls = []

    def count(text: str) -> int:
        calls.append(text)
        return len(text)

    result = build_prompt(story, memory="MEMORY", authors_note="note", depth=2, count_tokens=count, budget=120)
    assert result.prompt.startswith("MEMORY\n") and "[Author's note: note]\n" in result.prompt
    assert result.prompt.endswith("line 99\nend") and len(result.prompt) <= 120
    assert result.dropped_lines > 80
    # keeping one more line would not fit: the fewest lines were dropped, in few tokenizer calls
    one_more = "".join(story.splitlines(keepends=True)[result.dropped_lines - 1 :])
    assert len(build_prompt(one_more, memory="MEMORY", authors_note="note", depth=2).prompt) > 120
    assert len(calls) < 12


def test_fitting_keeps_a_single_overlong_line_whole():
    result = build_prompt("x" * 500, memory="M", count_tokens=len, budget=10)
    assert result.prompt == "M\n" + "x" * 500 and result.dropped_lines == 0


def test_fitting_when_everything_fits_is_one_count():
    calls = []
    result = build_prompt(STORY, count_tokens=lambda t: calls.append(t) or 1, budget=100)
    assert result.prompt == STORY and len(calls) == 1
