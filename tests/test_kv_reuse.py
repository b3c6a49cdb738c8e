"""The pure planning of KV-cache reuse: prefix reuse and context shift, on plain lists."""

from __future__ import annotations

import random

from loaders.kv_reuse import ReusePlan, longest_run, plan_reuse


def apply(cached: list[int], plan: ReusePlan) -> list[int]:
    """What a cache holding `cached` holds after `plan` (the seq_rm / seq_add it stands for)."""
    if plan.shift_len:
        return cached[: plan.keep] + cached[plan.shift_from : plan.shift_from + plan.shift_len]
    return cached[: plan.keep]


def test_the_next_turn_keeps_the_whole_previous_chat():
    cached = list(range(100))
    prompt = cached + [500, 501, 502]
    plan = plan_reuse(cached, prompt)
    assert plan == ReusePlan(100)
    assert apply(cached, plan) == prompt[:100]


def test_the_last_prompt_token_is_always_evaluated():
    cached = list(range(50))
    assert plan_reuse(cached, cached).reused == 49
    assert plan_reuse(cached, cached[:10]).reused == 9
    assert plan_reuse([], [7]).reused == 0


def test_a_different_prompt_keeps_only_the_shared_start():
    assert plan_reuse([1, 2, 3, 4], [1, 2, 9, 9, 9]) == ReusePlan(2)
    assert plan_reuse([5, 6], [1, 2]) == ReusePlan(0)


def test_dropped_turns_are_shifted_out_and_the_pinned_start_stays():
    pinned = list(range(1000, 1020))
    turns = [list(range(2000 + 100 * t, 2000 + 100 * t + 40)) for t in range(5)]
    cached = pinned + sum(turns, [])
    new = [7, 8, 9]
    prompt = pinned + sum(turns[2:], []) + new  # the two oldest turns were dropped to fit
    plan = plan_reuse(cached, prompt)
    assert plan.keep == len(pinned)
    assert plan.shift_from == len(pinned) + 80 and plan.shift_len == 120
    assert apply(cached, plan) == prompt[: plan.reused]
    assert prompt[plan.reused :] == new


def test_a_shift_is_planned_only_when_it_saves_enough_or_is_possible():
    cached = [1] + list(range(100, 160))
    prompt = [1] + list(range(150, 160)) + [5]  # only 10 tokens would be saved
    assert plan_reuse(cached, prompt) == ReusePlan(1)
    assert plan_reuse(cached, prompt, min_shift=4).shift_len == 10
    long_prompt = [1] + list(range(110, 160)) + [5]
    assert plan_reuse(cached, long_prompt).shift_len == 50
    assert plan_reuse(cached, long_prompt, can_shift=False) == ReusePlan(1)


def test_the_shift_never_covers_the_last_prompt_token():
    cached = [1] + list(range(100, 200))
    prompt = [1] + list(range(120, 200))  # the whole rest is in the cache
    plan = plan_reuse(cached, prompt)
    assert plan.reused == len(prompt) - 1
    assert apply(cached, plan) == prompt[:-1]


def test_longest_run_ignores_matches_across_token_boundaries():
    # Byte patterns of tokens 0x0100 and 0x0001 overlap misaligned; only aligned matches count.
    cached = [0, 256, 1, 5, 6, 7, 8]
    assert longest_run(cached, [0, 5, 6, 7, 8, 9], 1, 5) == (3, 4)


def test_random_plans_always_describe_the_prompt():
    rng = random.Random(0)
    for _ in range(300):
        cached = [rng.randrange(6) for _ in range(rng.randrange(0, 80))]
        if rng.random() < 0.5 and len(cached) > 10:
            cut = rng.randrange(1, len(cached) - 5)
            start = rng.randrange(cut, len(cached))
            prompt = cached[:cut] + cached[start:] + [rng.randrange(6) for _ in range(rng.randrange(1, 5))]
        else:
            prompt = [rng.randrange(6) for _ in range(rng.randrange(1, 60))]
        for can_shift in (True, False):
            plan = plan_reuse(cached, prompt, can_shift=can_shift, min_shift=2)
            assert plan.reused <= len(prompt) - 1
            assert apply(cached, plan) == prompt[: plan.reused]
            if not can_shift:
                assert plan.shift_len == 0
