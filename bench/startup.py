"""Cold start to a ready UI, and idle memory, with no model.

    python bench/startup.py [--runs 5] [--idle 3] [--api] [--nowebui] [--env NAME=VALUE] [--compare DIR]

Each run spawns `server.py` (this Python, a fresh empty models folder, a settings file that
does not exist, free loopback ports) and measures, from the spawn:
- page: until GET / on the UI answers 200 (what a browser gets first); best is the
  fastest run of a variant (the least disturbed one);
- config: until GET /config answers 200 after that (the Gradio app is built and serves its
  components: the page is really usable);
- api: with --api, until GET /v1/models on the API answers 200;
- with --nowebui, a variant that serves the API alone: its page and config are when GET /health on
  the API answers 200 (what llama.cpp users poll), then GET /v1/models; the summary prints its ratio
  to the UI start (goal: <= 1.5 s, <= 0.6 x the UI, idle RSS <= 120 MB);
- cpu: the CPU seconds (user + system) the server had used when the page answered; on a
  busy shared machine wall time stretches, this much less (start-up is one thread);
then, after `--idle` seconds of no requests, the resident memory (RSS, and USS: memory only
this process tree holds) of the server and all its children, and whether any backend
library (torch, llama.cpp, transformers' native parts) is mapped into it.

Variants run interleaved (plain, --api, the --env ones, the --compare checkouts, plain, ...)
so drift on a shared machine hits all alike; `--compare DIR` runs DIR/server.py (e.g. an
older commit unpacked with `git archive`) with the same Python, for a before/after table.
The first run of all is also shown on its own: it pays for a cold disk cache (and .pyc
compilation after an install); medians are over all runs. Goals (issue 9): page <= 2.5 s
and idle RSS <= 250 MB; the peer (oobabooga's web UI) takes 3.8 s and ~260 MB on this
machine. Every process is killed at the end of its run, children included.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
GOAL_START_S, GOAL_RSS_MB = 2.5, 250.0
NOWEBUI_GOAL_S, NOWEBUI_GOAL_RATIO, NOWEBUI_GOAL_RSS_MB = 1.5, 0.6, 120.0
PEER_START_S, PEER_RSS_MB = 3.8, 260.0
HEAVY_LIBS = ("libtorch", "libllama", "libggml", "_C.cpython", "tokenizers.abi3", "safetensors_rust")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


@dataclass
class Run:
    variant: str
    page_s: float
    config_s: float
    cpu_s: float
    api_s: float | None
    rss_mb: float
    uss_mb: float
    processes: int
    heavy: list[str] = field(default_factory=list)


@dataclass
class Variant:
    name: str
    root: Path
    """The checkout whose server.py runs."""
    api: bool = False
    env: dict[str, str] = field(default_factory=dict)
    nowebui: bool = False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with OPENER.open(url, timeout=2) as response:
            response.read()
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_for(url: str, proc: subprocess.Popen, t0: float, timeout: float, poll: float, log: Path) -> float:
    """Seconds from t0 until `url` answers 200; raises if the server dies or the deadline passes."""
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server.py exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        if answers(url):
            return time.perf_counter() - t0
        time.sleep(poll)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-2000:]}")


def tree_memory(pid: int) -> tuple[float, float, int, list[str]]:
    """RSS and USS in MB of the process and its children, their count, and heavy libraries mapped."""
    parent = psutil.Process(pid)
    rss = uss = 0
    heavy: set[str] = set()
    procs = [parent, *parent.children(recursive=True)]
    for proc in procs:
        try:
            info = proc.memory_full_info()
            rss, uss = rss + info.rss, uss + info.uss
            heavy.update(Path(m.path).name for m in proc.memory_maps() if any(h in m.path for h in HEAVY_LIBS))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss / 2**20, uss / 2**20, len(procs), sorted(heavy)


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process and its children have used so far."""
    parent = psutil.Process(pid)
    total = 0.0
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group and any child that left it, then SIGKILL what remains."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        child.kill()


def one_run(variant: Variant, args: argparse.Namespace) -> Run:
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "models").mkdir()
        ui_port, api_port = free_port(), free_port()
        cmd = [args.python, str(variant.root / "server.py"), "--models-dir", str(tmp_path / "models"),
               "--settings", str(tmp_path / "settings.yaml"), "--listen-port", str(ui_port)]
        if variant.api or variant.nowebui:
            cmd += ["--api", "--api-port", str(api_port)]
        if variant.nowebui:
            cmd += ["--nowebui"]
        log = tmp_path / "server.log"
        with log.open("wb") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=variant.root, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env={**os.environ, **variant.env}, start_new_session=True)
        try:
            ready = f"http://127.0.0.1:{api_port}/health" if variant.nowebui else f"http://127.0.0.1:{ui_port}/"
            page = wait_for(ready, proc, t0, args.timeout, args.poll, log)
            cpu = tree_cpu(proc.pid)
            config = page if variant.nowebui else wait_for(f"http://127.0.0.1:{ui_port}/config", proc, t0,
                                                           args.timeout, args.poll, log)
            api_s = (wait_for(f"http://127.0.0.1:{api_port}/v1/models", proc, t0, args.timeout, args.poll, log)
                     if variant.api or variant.nowebui else None)
            time.sleep(args.idle)
            rss, uss, count, heavy = tree_memory(proc.pid)
        finally:
            kill_tree(proc)
    return Run(variant.name, page, config, cpu, api_s, rss, uss, count, heavy)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each variant (default 5)")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds idle before reading memory (default 3)")
    parser.add_argument("--api", action="store_true", help="also run a variant with --api, interleaved")
    parser.add_argument("--nowebui", action="store_true", help="also run a variant with --nowebui (API only)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="also run a variant with this environment variable set (repeatable)")
    parser.add_argument("--compare", action="append", default=[], type=Path, metavar="DIR",
                        help="also run DIR/server.py, another checkout (repeatable)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one start may take (default 60)")
    parser.add_argument("--poll", type=float, default=0.02, help="seconds between HTTP polls (default 0.02)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to run server.py with")
    args = parser.parse_args()
    if not 1 <= args.runs <= 50:
        parser.error("--runs must be between 1 and 50")
    return args


def print_summary(runs: list[Run], variants: list[str]) -> None:
    first = runs[0]
    print(f"\nfirst run ({first.variant}, cold disk cache): page {first.page_s:.2f} s, config {first.config_s:.2f} s, "
          f"RSS {first.rss_mb:.0f} MB")
    print(f"\nmedians over {len(runs) // len(variants)} runs each:")
    print(f"{'variant':<28} {'page s':>7} {'best s':>7} {'config s':>8} {'api s':>6} {'cpu s':>6} {'RSS MB':>7} {'USS MB':>7}  "
          f"{'page/goal':>9} {'RSS/goal':>8} {'page/peer':>9} {'RSS/peer':>8}")
    for name in variants:
        mine = [r for r in runs if r.variant == name]
        page = statistics.median(r.page_s for r in mine)
        config = statistics.median(r.config_s for r in mine)
        api = [r.api_s for r in mine if r.api_s is not None]
        api_text = f"{statistics.median(api):.2f}" if api else "-"
        cpu = statistics.median(r.cpu_s for r in mine)
        rss = statistics.median(r.rss_mb for r in mine)
        uss = statistics.median(r.uss_mb for r in mine)
        best = min(r.page_s for r in mine)
        print(f"{name:<28} {page:>7.2f} {best:>7.2f} {config:>8.2f} {api_text:>6} {cpu:>6.2f} {rss:>7.0f} {uss:>7.0f}  "
              f"{page / GOAL_START_S:>9.2f} {rss / GOAL_RSS_MB:>8.2f} {page / PEER_START_S:>9.2f} "
              f"{rss / PEER_RSS_MB:>8.2f}")
    print(f"goal: page <= {GOAL_START_S} s, RSS <= {GOAL_RSS_MB:.0f} MB (ratio <= 1.00 meets it); "
          f"peer: {PEER_START_S} s, {PEER_RSS_MB:.0f} MB")
    headless = [r for r in runs if r.variant == "nowebui"]
    if headless:
        ready = statistics.median(r.page_s for r in headless)
        rss = statistics.median(r.rss_mb for r in headless)
        ui = statistics.median(r.page_s for r in runs if r.variant == "ui")
        print(f"nowebui: ready (/health 200) {ready:.2f} s (goal <= {NOWEBUI_GOAL_S} s), {ready / ui:.2f} x the UI "
              f"start (goal <= {NOWEBUI_GOAL_RATIO}), idle RSS {rss:.0f} MB (goal <= {NOWEBUI_GOAL_RSS_MB:.0f} MB)")


def main() -> int:
    args = parse_args()
    variants = [Variant("ui", ROOT)]
    if args.api:
        variants.append(Variant("ui+api", ROOT, api=True))
    if args.nowebui:
        variants.append(Variant("nowebui", ROOT, nowebui=True))
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env wants NAME=VALUE, got {item!r}")
        variants.append(Variant(item, ROOT, env={name: value}))
    for other in args.compare:
        if not (other / "server.py").is_file():
            raise SystemExit(f"--compare: no server.py in {other}")
        variants.append(Variant(f"ui {other.name}", other.resolve()))
        if args.api:
            variants.append(Variant(f"ui+api {other.name}", other.resolve(), api=True))
    print(f"server.py with no model, {args.runs} interleaved runs of {', '.join(v.name for v in variants)}; "
          f"python {args.python}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("page: spawn -> GET / 200; config: -> GET /config 200; api: -> GET /v1/models 200; cpu: server CPU s at page; "
          f"memory: process tree after {args.idle:g} s idle")
    runs: list[Run] = []
    for index in range(args.runs):
        for variant in variants:
            run = one_run(variant, args)
            runs.append(run)
            api_text = f" api {run.api_s:.2f} s" if run.api_s is not None else ""
            print(f"run {index + 1} {variant.name:<24} page {run.page_s:.2f} s  config {run.config_s:.2f} s{api_text}  "
                  f"cpu {run.cpu_s:.2f} s  "
                  f"RSS {run.rss_mb:.0f} MB  USS {run.uss_mb:.0f} MB  ({run.processes} processes; heavy libraries "
                  f"mapped: {', '.join(run.heavy) or 'none'}; load {os.getloadavg()[0]:.1f})", flush=True)
    print_summary(runs, [v.name for v in variants])
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
