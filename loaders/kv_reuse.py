"""What of a sequence's KV cache a new prompt can keep: the pure planning behind prefix reuse
and context shift, with no llama.cpp in sight (so it is tested on plain lists).

A slot's cache holds the tokens of its last request (prompt + reply). The next request
usually extends them (the next chat turn): only its new tokens need evaluating. When a
chat outgrows the context, the engine drops the oldest turns but keeps the pinned start
(system prompt, character): the new prompt is then `cached[:keep] + cached[k:k+n] + new`.
Instead of re-evaluating `cached[k:k+n]`, the cache drops `cached[keep:k]` and shifts the
kept run down to position `keep` (llama.cpp's seq_rm + seq_add, koboldcpp's ContextShift).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

#: A shift is worth its cost (a RoPE re-rotation of the kept run) only for a run this long.
MIN_SHIFT_TOKENS = 32
#: Window of prompt tokens searched for in the cache when looking for a shifted run.
_PROBE = 8


@dataclass(frozen=True)
class ReusePlan:
    """How to turn a cache holding `cached` into one holding `prompt[:reused]`."""

    keep: int
    """`cached[:keep] == prompt[:keep]`: left in place."""
    shift_from: int = 0
    """Start in `cached` of the run moved down to position `keep` (when shift_len > 0)."""
    shift_len: int = 0
    """Length of that run; 0 when nothing is shifted."""

    @property
    def reused(self) -> int:
        """Prompt tokens already in the cache after the plan is applied."""
        return self.keep + self.shift_len


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plan_reuse(cached: Sequence[int], prompt: Sequence[int], *, can_shift: bool = True,
               min_shift: int = MIN_SHIFT_TOKENS) -> ReusePlan:
    """The plan that leaves the most of `prompt` in the cache.

    At least the last prompt token is always left to evaluate: its logits are what the
    first sample reads. A shift is planned only when `can_shift` (llama.cpp cannot shift
    every cache) and the run it saves is at least `min_shift` tokens.
    """
    limit = len(prompt) - 1
    keep = min(common_prefix(cached, prompt), max(limit, 0))
    if not can_shift or limit - keep < min_shift or len(cached) - keep < min_shift:
        return ReusePlan(keep)
    start, length = longest_run(cached, prompt, keep, limit)
    if length < min_shift:
        return ReusePlan(keep)
    return ReusePlan(keep, start, length)


def longest_run(cached: Sequence[int], prompt: Sequence[int], keep: int, limit: int) -> tuple[int, int]:
    """(k, n): the longest `cached[k:k+n] == prompt[keep:keep+n]` with k > keep and keep + n <= limit.

    Candidates are found with a C-level byte search for the first few prompt tokens after
    `keep`, so an 8k-token cache costs microseconds, not a Python loop per position.
    """
    probe = min(_PROBE, limit - keep)
    if probe <= 0:
        return 0, 0
    hay = array("i", cached).tobytes()
    needle = array("i", prompt[keep : keep + probe]).tobytes()
    best_start, best_len = 0, 0
    pos = (keep + 1) * 4
    while (found := hay.find(needle, pos)) >= 0:
        pos = found + 1
        if found % 4:  # matched across token boundaries
            continue
        k = found // 4
        n = common_prefix(cached[k:], prompt[keep:limit])
        if n > best_len:
            best_start, best_len = k, n
            if keep + n == limit or k + n == len(cached):
                break  # nothing longer can follow
    return best_start, best_len
