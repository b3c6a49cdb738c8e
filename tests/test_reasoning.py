"""Reasoning split from the answer: `<think>` blocks, prompts that open them, harmony and Gemma 4 channels."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from modules.chat.reasoning import held_prefix, thinking_opened
from modules.chat.templates import TemplateRenderer
from modules.chat.tool_calls import TOOL_FAMILIES, ReplyStream, parse_reply

TEMPLATES = Path(__file__).parent / "fixtures" / "chat-templates"
HI = [{"role": "user", "content": "hi"}]


def split(text: str, family: str, *, thinking: bool = False, tools: bool = False) -> tuple[str, str]:
    reply = parse_reply(text, TOOL_FAMILIES[family], tools=tools, thinking=thinking)
    return reply.reasoning, reply.content


def streamed(text: str, family: str, *, thinking: bool = False, seed: int = 0) -> tuple[str, str]:
    stream = ReplyStream(TOOL_FAMILIES[family], tools=True, thinking=thinking)
    rng = random.Random(seed)
    deltas = []
    i = 0
    while i < len(text):
        j = i + rng.randint(1, 5)
        deltas += stream.feed(text[i:j])
        i = j
    deltas += stream.finish()
    return ("".join(d.text for d in deltas if d.kind == "reasoning"),
            "".join(d.text for d in deltas if d.kind == "content"))


def prompt_of(name: str, **extra: object) -> str:
    return TemplateRenderer().render((TEMPLATES / name).read_text(encoding="utf-8"), HI, add_generation_prompt=True,
                                     **extra)


@pytest.mark.parametrize(("name", "extra", "opened"), [
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", {"enable_thinking": True}, True),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", {}, False),  # this template closes it unless asked
    ("Qwen-Qwen3-0.6B.jinja", {}, False),  # the model writes <think> itself
    ("Qwen-Qwen3-0.6B.jinja", {"enable_thinking": False}, False),  # <think>\n\n</think> is closed
    ("openai-gpt-oss-120b.jinja", {"reasoning_effort": "high"}, False),
    ("google-gemma-4-31B-it.jinja", {}, False),
])
def test_thinking_opened_reads_the_real_generation_prompts(name: str, extra: dict[str, object], opened: bool) -> None:
    assert thinking_opened(prompt_of(name, **extra)) is opened


def test_reasoning_effort_reaches_the_gpt_oss_template() -> None:
    assert "Reasoning: high" in prompt_of("openai-gpt-oss-120b.jinja", reasoning_effort="high")


@pytest.mark.parametrize(("text", "thinking", "want"), [
    ("<think>\nPlan it.\n</think>\n\nHello!", False, ("Plan it.", "Hello!")),
    ("Plan it.\n</think>\n\nHello!", True, ("Plan it.", "Hello!")),
    ("  <think>a</think>b", False, ("a", "b")),
    ("<think>\ncut off mid thou", False, ("cut off mid thou", "")),
    ("still thinking", True, ("still thinking", "")),
    ("Just an answer with <think> inside", False, ("", "Just an answer with <think> inside")),
    ("", True, ("", "")),
])
def test_think_blocks(text: str, thinking: bool, want: tuple[str, str]) -> None:
    assert split(text, "hermes", thinking=thinking) == want
    for seed in range(6):
        assert streamed(text, "hermes", thinking=thinking, seed=seed) == want


def test_reasoning_then_a_call() -> None:
    text = '<think>\nNeed the weather.\n</think>\n\n<tool_call>\n{"name": "w", "arguments": {}}\n</tool_call>'
    reply = parse_reply(text, TOOL_FAMILIES["hermes"], tools=True, thinking=False)
    assert (reply.reasoning, reply.content, [c.name for c in reply.tool_calls]) == ("Need the weather.", "", ["w"])


def test_the_think_tag_is_never_shown_while_it_streams_in() -> None:
    stream = ReplyStream(TOOL_FAMILIES["hermes"], tools=True, thinking=False)
    shown = [d for piece in ["<", "th", "ink>", "x", "</th", "ink>", "y"] for d in stream.feed(piece)]
    shown += stream.finish()
    assert [(d.kind, d.text) for d in shown] == [("reasoning", "x"), ("content", "y")]


def test_mistral_think_tags() -> None:
    assert split("[THINK]hmm[/THINK]Answer", "mistral_args") == ("hmm", "Answer")


def test_harmony_analysis_is_reasoning_and_final_is_content() -> None:
    text = ("<|channel|>analysis<|message|>User says hi.<|end|><|start|>assistant<|channel|>final<|message|>"
            "Hello there!<|return|>")
    assert split(text, "harmony") == ("User says hi.", "Hello there!")
    for seed in range(6):
        assert streamed(text, "harmony", seed=seed) == ("User says hi.", "Hello there!")


def test_harmony_analysis_cut_off_is_reasoning() -> None:
    assert split("<|channel|>analysis<|message|>Thinking about", "harmony") == ("Thinking about", "")


def test_harmony_without_channels_is_plain_content() -> None:
    assert split("Hello", "harmony") == ("", "Hello")


def test_gemma4_thought_channel() -> None:
    text = "<|channel>thought\nLet me think.<channel|>The answer is 4."
    assert split(text, "gemma4") == ("Let me think.", "The answer is 4.")
    assert streamed(text, "gemma4") == ("Let me think.", "The answer is 4.")
    assert split("<|channel>thought\n<channel|>Plain.", "gemma4") == ("", "Plain.")


def test_held_prefix_finds_a_tail_that_may_become_a_marker() -> None:
    assert held_prefix("abc<thi", 0, ("<think>",)) == 3
    assert held_prefix("abc<x", 0, ("<think>",)) == 5
    assert held_prefix("abc", 0, ()) == 3
