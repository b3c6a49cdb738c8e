"""Time to first token as a chat grows, and on the turn that overflows the context.

    python bench/chat_turns.py MODEL.gguf [--ctx-size 1536] [--turns 14] [--reps 3]
                               [--reply-tokens 32] [--user-words 48] [--parallel 1]

Starts `server.py --api` with `--ctx-size` tokens of context and plays `--reps` fresh
chats through /v1/chat/completions (streaming; instruct mode, so the server renders the
model's own chat template; temperature 0, EOS banned, `--reply-tokens` per reply). Each
chat has its own system prompt (so no chat can reuse another one's cache) and user
messages of about 75 tokens cut from the test kit's corpus; the model's replies go
back into the history as they were streamed. The chat grows by about 120 tokens a turn,
so with the defaults it passes the context (1536 - 32 for the reply) around turn 12 and
the server drops its oldest turns (whole turns; the system prompt stays): from then on
each prompt no longer extends the one before, and only a context shift of the KV cache
avoids evaluating the whole prompt again.

Time to first token (TTFT) is measured by the client: request sent -> first token. The
stream shows text only once it is visible (a leading space or half a UTF-8 character is
held back), so the requests ask for logprobs, which say how many tokens the first chunk
carries; the decode time of the extra ones is taken off. Reported: the median TTFT over
the repetitions per turn, turn 10 / turn 2 (goal <= 1.2) and the first overflowing turn
/ the turn before it (goal <= 1.5). Before each turn (untimed) the script asks the
server for the prompt it will render (/v1/internal/chat-prompt) and prints whether it
extends the previous turn's prompt and how many of its tokens are past the shared prefix:
what a prefix-reusing engine has to evaluate at the least.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

EARLY, LATE = 2, 10
GROWTH_GOAL, OVERFLOW_GOAL = 1.2, 1.5
THINK_S = 0.5
"""Pause between turns (the user reading and typing), so no turn starts on a busy CPU."""


@dataclass
class Turn:
    """One turn of one chat: what the server rendered and how the reply streamed."""

    number: int
    prompt_tokens: int
    new_tokens: int
    """Tokens of this prompt past its common prefix with the previous turn's prompt."""
    extends: bool
    """This prompt starts with the previous prompt + the reply (as text)."""
    dropped_turns: int
    ttft: float


@dataclass
class Chat:
    system: str
    messages: list[dict[str, str]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)


def user_messages(count: int, words: int, rep: int) -> list[str]:
    """`count` messages of `words` words, consecutive windows of the corpus, distinct per rep."""
    corpus = (common.ROOT / "tests" / "kit" / "corpus.txt").read_text(encoding="utf-8").split()
    out = []
    for turn in range(count):
        start = (rep * 7919 + turn * words) % len(corpus)
        window = (corpus * 2)[start:start + words]
        out.append(f"Question {turn + 1}: " + " ".join(window))
    return out


def first_token_time(result: common.Streamed) -> float:
    """Request sent -> first token, the held-back tokens of the first chunk taken off."""
    extra = max(0, result.first_tokens - 1)
    later = result.completion_tokens - result.first_tokens
    if not extra or later <= 0 or result.first is None:
        return result.ttft
    per_token = (result.last - result.first) / later
    return result.ttft - extra * per_token


class ChatPlayer:
    """Plays chats against one server and records each turn."""

    def __init__(self, server: common.ApiServer, client: Any, args: argparse.Namespace) -> None:
        self.server, self.client, self.args = server, client, args

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post(f"{self.server.url}{route}", json=body)
        response.raise_for_status()
        return response.json()

    def _request(self, chat: Chat) -> dict[str, Any]:
        return {"messages": [{"role": "system", "content": chat.system}, *chat.messages], "mode": "instruct",
                "max_tokens": self.args.reply_tokens, "temperature": 0, "seed": 1, "ban_eos_token": True,
                "logprobs": True}

    def play(self, rep: int, turns: int) -> Chat:
        chat = Chat(system=f"Log {uuid.uuid4().hex[:12]}: you are the keeper of chat {rep + 1}; answer briefly.")
        previous_prompt, previous_ids, reply = "", [], ""
        for number, text in enumerate(user_messages(turns, self.args.user_words, rep), start=1):
            chat.messages.append({"role": "user", "content": text})
            body = self._request(chat)
            prompt = self._post("/v1/internal/chat-prompt", body)["prompt"]
            ids = self._post("/v1/internal/encode", {"text": prompt})["tokens"]
            shared = next((i for i, (a, b) in enumerate(zip(previous_ids, ids, strict=False)) if a != b),
                          min(len(previous_ids), len(ids)))
            present = sum(1 for m in chat.messages if m["role"] == "user" and m["content"] in prompt)
            common.settle(THINK_S)
            result = common.stream_chat(self.client, self.server.url, body)
            if result.completion_tokens != self.args.reply_tokens:
                raise RuntimeError(f"turn {number}: {result.completion_tokens} tokens, not {self.args.reply_tokens}")
            chat.turns.append(Turn(number, len(ids), len(ids) - shared,
                                   bool(previous_prompt) and prompt.startswith(previous_prompt + reply),
                                   number - present, first_token_time(result)))
            reply = result.text
            chat.messages.append({"role": "assistant", "content": reply})
            previous_prompt, previous_ids = prompt, ids
        return chat


def print_table(chats: list[Chat]) -> None:
    print("\n| turn | prompt tokens | past shared prefix | extends previous | turns dropped | TTFT median s | TTFT all s |")
    print("|---:|---:|---:|:---:|---:|---:|---|")
    for index in range(len(chats[0].turns)):
        turns = [c.turns[index] for c in chats]
        extends = "yes" if all(t.extends for t in turns) else ("no" if not any(t.extends for t in turns) else "some")
        print(f"| {index + 1} | {common.median(t.prompt_tokens for t in turns):.0f} | {common.median(t.new_tokens for t in turns):.0f} "
              f"| {extends if index else '-'} | {common.median(t.dropped_turns for t in turns):.0f} "
              f"| {common.median(t.ttft for t in turns):.3f} | {' '.join(f'{t.ttft:.2f}' for t in turns)} |")


def first_overflow(chat: Chat) -> int | None:
    """Index of the first turn whose prompt left turns out, when it has a turn before it."""
    return next((i for i, t in enumerate(chat.turns) if t.dropped_turns and i > 0), None)


def print_summary(chats: list[Chat]) -> None:
    def ttft_at(number: int) -> float:
        return common.median(c.turns[number - 1].ttft for c in chats)

    if len(chats[0].turns) >= LATE:
        early, late = ttft_at(EARLY), ttft_at(LATE)
        print(f"TTFT turn {EARLY} {early:.3f} s, turn {LATE} {late:.3f} s "
              f"(prompts of {common.median(c.turns[EARLY - 1].prompt_tokens for c in chats):.0f} and "
              f"{common.median(c.turns[LATE - 1].prompt_tokens for c in chats):.0f} tokens)")
        print(common.goal_line(f"TTFT turn {LATE} / turn {EARLY}", late / early, GROWTH_GOAL, at_most=True))
    overflows = [(c, first_overflow(c)) for c in chats]
    if any(i is None for _, i in overflows):
        print("no overflow: raise --turns or lower --ctx-size to measure the overflowing turn")
        return
    over = common.median(c.turns[i].ttft for c, i in overflows)
    normal = common.median(c.turns[i - 1].ttft for c, i in overflows)
    turn_numbers = sorted({i + 1 for _, i in overflows})
    print(f"first overflowing turn {'/'.join(map(str, turn_numbers))}: TTFT {over:.3f} s, "
          f"the turn before {normal:.3f} s")
    print(common.goal_line("TTFT overflowing turn / turn before", over / normal, OVERFLOW_GOAL, at_most=True))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_server_args(parser, ctx_size=1536)
    parser.add_argument("--turns", type=int, default=14, help="user turns per chat")
    parser.add_argument("--reps", type=int, default=3, help="fresh chats played one after another")
    parser.add_argument("--reply-tokens", type=int, default=32, help="max_tokens of each reply")
    parser.add_argument("--user-words", type=int, default=48, help="words per user message (~75 tokens)")
    parser.add_argument("--parallel", type=int, default=1, help="server.py --parallel (slots)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    threads = args.threads or common.default_threads()
    print(common.machine_line(threads), flush=True)
    chats = []
    with common.ApiServer(args.model, threads, args.ctx_size, ["--parallel", str(args.parallel), *args.server_args]) as server, \
            common.http_client() as client:
        player = ChatPlayer(server, client, args)
        player.play(-1, 3)  # a short warm-up chat, not counted
        for rep in range(args.reps):
            chat = player.play(rep, args.turns)
            chats.append(chat)
            print(f"chat {rep + 1}: TTFT per turn " + " ".join(f"{t.ttft:.2f}" for t in chat.turns), flush=True)
    print(f"\nmodel {args.model.name}, {threads} threads, ctx {args.ctx_size}, --parallel {args.parallel}, "
          f"{args.reps} chats of {args.turns} turns, {args.reply_tokens}-token replies")
    print_table(chats)
    print()
    print_summary(chats)
    print(common.machine_line(threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
