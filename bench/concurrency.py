"""Many clients at once: aggregate tokens/s and latency of our API with 1, 4 and 8 clients.

    python bench/concurrency.py MODEL.gguf [--parallel 8] [--clients 1,4,8] [--requests 8]
                                [--tokens 128] [--rounds 2] [--llama-server PATH]

Starts `server.py --api --parallel 8` on the model, then for each client count C sends the
same `--requests` streaming /v1/completions requests (short distinct prompts, temperature
0, EOS banned, `--tokens` new tokens each) from C threads, each thread taking the next
request when its last one is done, so C requests are in flight at a time. The client
counts are interleaved round by round (1, 4, 8, 1, 4, 8, ...).

Per client count it prints: aggregate tokens/s (all generated tokens / wall time from the
first request sent to the last one finished; the median over rounds), its ratio to one
client, per-request latency and time to first token (p50 and p95 over every request of
every round), and how many outputs differ from their sequential twin: the same request
served alone (the first round with one client). Goal: 8 clients >= 3.3 x one client,
no output different from its twin.

With `--llama-server PATH` (llama.cpp's own server binary) the same workload runs on it
afterwards, with as many slots and the same per-slot context, for comparison.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

GOAL_CLIENTS, GOAL_RATIO = 8, 3.3
TOPICS = ("a lighthouse", "the harbour market", "a mountain pass", "the old library", "a river barge",
          "the night train", "a desert well", "the glass factory", "a winter garden", "the clock tower",
          "a fishing village", "the copper mine", "a bakery at dawn", "the observatory", "a ferry crossing",
          "the salt marsh")


def prompts(count: int) -> list[str]:
    """`count` short prompts that differ from their first words on."""
    return [f"Story {i + 1} is about {TOPICS[i % len(TOPICS)]}. Once upon a time" for i in range(count)]


@dataclass
class Level:
    """One client count's run: every request's result and the wall time of the whole run."""

    clients: int
    results: list[common.Streamed]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)

    @property
    def rate(self) -> float:
        return self.tokens / self.wall_s


def run_level(send: Callable[[object, int], common.Streamed], n_requests: int, clients: int) -> Level:
    """Send requests 0..n-1 from `clients` threads, each taking the next one when free."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(n_requests):
        todo.put(index)
    results: list[common.Streamed | None] = [None] * n_requests
    errors: list[BaseException] = []

    def client_loop() -> None:
        with common.http_client() as client:
            while not errors:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    results[index] = send(client, index)
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    errors.append(exc)

    threads = [threading.Thread(target=client_loop, name=f"client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    done = [r for r in results if r is not None]
    wall = max(r.last for r in done) - min(r.sent for r in done)
    return Level(clients, done, wall)


def run_workload(label: str, base_url: str, args: argparse.Namespace) -> dict[int, list[Level]]:
    """Every round of every client count against one server; prints a line per run."""
    texts = prompts(args.requests)

    def send(client: object, index: int) -> common.Streamed:
        # ban_eos_token is ours, ignore_eos llama-server's: each server ignores the other's.
        payload = {"prompt": texts[index], "max_tokens": args.tokens, "temperature": 0, "seed": 1,
                   "ban_eos_token": True, "ignore_eos": True}
        return common.stream_completion(client, base_url, payload)

    with common.http_client() as client:  # warm up: page cache, threads, the first compiled paths
        send(client, 0)
    common.settle()
    levels: dict[int, list[Level]] = {c: [] for c in args.clients}
    for round_no in range(args.rounds):
        for clients in args.clients:
            level = run_level(send, args.requests, clients)
            levels[clients].append(level)
            print(f"{label} round {round_no + 1}, {clients} clients: {level.tokens} tokens in {level.wall_s:6.2f} s "
                  f"= {level.rate:6.2f} tok/s", flush=True)
            common.settle()
    return levels


def twins(levels: dict[int, list[Level]]) -> list[str] | None:
    """Each request's output served alone: the first one-client round (None without one)."""
    alone = levels.get(1)
    return [r.text for r in alone[0].results] if alone else None


def report(label: str, levels: dict[int, list[Level]], reference: list[str] | None) -> tuple[dict[int, float], int]:
    """The table for one server; returns the common.median aggregate tok/s per client count and
    how many outputs differ from their sequential twins."""
    rates = {c: common.median(level.rate for level in runs) for c, runs in levels.items()}
    base = rates.get(1)
    print(f"\n{label}")
    print("| clients | aggregate tok/s | x 1 client | latency p50 / p95 s | TTFT p50 / p95 s | differ from twin |")
    print("|---:|---:|---:|---:|---:|---:|")
    total_mismatches = 0
    for clients, runs in levels.items():
        results = [r for level in runs for r in level.results]
        lat = [r.latency for r in results]
        ttft = [r.ttft for r in results]
        mismatches = 0
        if reference is not None:
            for level in runs:
                for index, result in enumerate(level.results):
                    if result.text != reference[index]:
                        mismatches += 1
                        if mismatches <= 3:
                            print(f"  mismatch: {clients} clients, request {index + 1}: "
                                  f"{_first_difference(reference[index], result.text)}")
        ratio = f"{rates[clients] / base:.2f}" if base else "-"
        print(f"| {clients} | {rates[clients]:.2f} | {ratio} | {common.percentile(lat, 50):.2f} / {common.percentile(lat, 95):.2f} "
              f"| {common.percentile(ttft, 50):.2f} / {common.percentile(ttft, 95):.2f} | {mismatches} of {len(results)} |")
        total_mismatches += mismatches
    return rates, total_mismatches


def _first_difference(expected: str, got: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got)))
    return f"from character {at}: expected {expected[at:at + 30]!r}, got {got[at:at + 30]!r}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_server_args(parser, ctx_size=1024)
    parser.add_argument("--parallel", type=int, default=8, help="server.py --parallel (slots)")
    parser.add_argument("--clients", default="1,4,8", help="client counts, comma-separated")
    parser.add_argument("--requests", type=int, default=8, help="requests per client count and round")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every client count")
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary, to compare with")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    return args


def main() -> int:
    args = parse_args()
    threads = args.threads or common.default_threads()
    print(common.machine_line(threads), flush=True)
    with common.ApiServer(args.model, threads, args.ctx_size, ["--parallel", str(args.parallel), *args.server_args]) as server:
        ours = run_workload("ours", server.url, args)
    reference = twins(ours)
    rates, mismatches = report(f"ours: server.py --parallel {args.parallel}, {args.requests} requests x {args.tokens} tokens, "
                   f"{args.rounds} rounds", ours, reference)
    if args.llama_server:
        common.settle()
        with common.LlamaServer(args.llama_server, args.model, threads, args.ctx_size, args.parallel) as other:
            theirs = run_workload("llama-server", other.url, args)
        report(f"llama-server -np {args.parallel}", theirs, twins(theirs))
    print(f"\nmodel {args.model.name}, {threads} threads, ctx {args.ctx_size} per slot")
    if 1 in rates and GOAL_CLIENTS in rates:
        print(common.goal_line(f"{GOAL_CLIENTS} clients / 1 client aggregate tok/s", rates[GOAL_CLIENTS] / rates[1],
                        GOAL_RATIO))
    if reference is not None:
        total = sum(len(level.results) for runs in ours.values() for level in runs)
        print(f"goal: every output equal to its sequential twin: {mismatches} of {total} differ "
              f"{'met' if not mismatches else 'MISSED'}")
    print(common.machine_line(threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
