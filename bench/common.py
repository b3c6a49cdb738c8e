"""What the benchmarks share: our server as a subprocess, a streaming client, statistics.

`ApiServer` starts `server.py --api` on free ports of 127.0.0.1 in its own process group,
waits until the model is loaded and the UI is up (so the start-up work is over before
anything is timed), and kills the whole group on exit. `stream_completion` and
`stream_chat` read one SSE response and time it: sent, first content, last event.

Timing on a small shared machine is noisy: the scripts interleave the things they
compare and report medians; `machine_line()` says how busy the machine was.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
READY_TIMEOUT_S = 180.0
"""How long a server may take to load the model and bring the UI up."""


# --------------------------------------------------------------------------- processes
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def kill_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


def settle(seconds: float = 1.0) -> None:
    """Let llama.cpp's worker threads of the side that just ran stop spinning before the
    other side starts (on 2 cores a spinning idle pool slows the busy one down)."""
    time.sleep(seconds)


class Spawned:
    """A subprocess in its own process group, its output in a log file; a context manager."""

    def __init__(self, argv: list[str], name: str, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.tmp = tempfile.TemporaryDirectory(prefix=f"bench-{name}-")
        self.log_path = Path(self.tmp.name) / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, **(env or {})})

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        kill_tree(self.proc)
        self._log.close()
        self.tmp.cleanup()

    def __enter__(self) -> Spawned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ApiServer(Spawned):
    """`server.py --api --model MODEL` (with the venv python running this script).

    The model is served from its own folder (`--models-dir`); `--settings` points at a
    file that does not exist, so the user's settings.yaml changes nothing (CMD_FLAGS.txt is
    still read: flags given here win over it). `extra` are more server.py flags.
    """

    def __init__(self, model: Path, threads: int, ctx_size: int, extra: Sequence[str] = ()) -> None:
        self.port, self.ui_port = free_port(), free_port()
        model = model.resolve()
        argv = [sys.executable, str(ROOT / "server.py"), "--api", "--api-port", str(self.port),
                "--listen-port", str(self.ui_port), "--models-dir", str(model.parent), "--model", model.name,
                "--threads", str(threads), "--threads-batch", str(threads), "--ctx-size", str(ctx_size),
                "--settings", str(Path(tempfile.gettempdir()) / f"bench-no-settings-{os.getpid()}.yaml"), *extra]
        super().__init__(argv, "server", env={"GRADIO_ANALYTICS_ENABLED": "False"})
        self.url = f"http://{HOST}:{self.port}"
        try:
            self._wait_ready(model.name)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, model_name: str) -> None:
        import httpx

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                info = httpx.get(f"{self.url}/v1/internal/model/info", timeout=2).json()
                if info.get("model_name") == model_name and port_open(self.ui_port):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}")


class LlamaServer(Spawned):
    """llama.cpp's own `llama-server` binary with `slots` slots of `ctx_size` tokens each."""

    def __init__(self, binary: Path, model: Path, threads: int, ctx_size: int, slots: int,
                 batch_size: int = 512) -> None:
        self.port = free_port()
        argv = [str(binary), "-m", str(model.resolve()), "--host", HOST, "--port", str(self.port),
                "-t", str(threads), "-tb", str(threads), "-c", str(ctx_size * slots), "-np", str(slots),
                "-b", str(batch_size), "-cb"]
        super().__init__(argv, "llama-server")
        self.url = f"http://{HOST}:{self.port}"
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"llama-server not ready after {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}")


# --------------------------------------------------------------------------- SSE client
@dataclass
class Streamed:
    """One streamed response: its text and when things arrived (time.perf_counter())."""

    text: str = ""
    sent: float = 0.0
    first: float | None = None
    """When the first chunk with content arrived."""
    last: float = 0.0
    """When the last event (the one with finish_reason, or usage) arrived."""
    chunks: int = 0
    """Chunks that carried content."""
    first_tokens: int = 1
    """Tokens the first content chunk carried (known when the request asked for logprobs)."""
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def ttft(self) -> float:
        """Time to first token: request sent -> first content."""
        return (self.first or self.last) - self.sent

    @property
    def latency(self) -> float:
        return self.last - self.sent

    @property
    def completion_tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or self.chunks)

    @property
    def prompt_tokens(self) -> int:
        return int(self.usage.get("prompt_tokens") or 0)

    def decode_rate(self) -> float:
        """Tokens/s from the first content to the last event (counts the first chunk as one
        token: a first token held back as half a UTF-8 character flatters this by <1/N)."""
        if self.first is None or self.completion_tokens < 2:
            raise RuntimeError(f"too little was streamed to time decoding: {self}")
        return (self.completion_tokens - 1) / (self.last - self.first)


def _stream(client: Any, url: str, payload: dict[str, Any], content_of: Any) -> Streamed:
    out = Streamed()
    parts: list[str] = []
    out.sent = time.perf_counter()
    with client.stream("POST", url, json={**payload, "stream": True}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}: {response.read().decode(errors='replace')}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            now = time.perf_counter()
            if "error" in event:
                raise RuntimeError(f"{url} streamed an error: {event['error']}")
            if event.get("usage"):
                out.usage, out.last = event["usage"], now
            for choice in event.get("choices") or ():
                text = content_of(choice)
                if text:
                    parts.append(text)
                    out.chunks += 1
                    if out.first is None:
                        out.first, out.first_tokens = now, _logprob_tokens(choice) or 1
                    out.last = now
                if choice.get("finish_reason"):
                    out.finish_reason, out.last = choice["finish_reason"], now
    out.text = "".join(parts)
    return out


def _logprob_tokens(choice: dict[str, Any]) -> int:
    """Tokens a chunk's logprobs describe (completions: "tokens"; chat: "content"); 0 without."""
    logprobs = choice.get("logprobs") or {}
    return len(logprobs.get("tokens") or logprobs.get("content") or ())


def stream_completion(client: Any, base_url: str, payload: dict[str, Any]) -> Streamed:
    """POST /v1/completions with stream (and usage) on; `client` is an httpx.Client."""
    body = {**payload, "stream_options": {"include_usage": True}}
    return _stream(client, f"{base_url}/v1/completions", body, lambda choice: choice.get("text"))


def stream_chat(client: Any, base_url: str, payload: dict[str, Any]) -> Streamed:
    """POST /v1/chat/completions with stream (and usage) on."""
    body = {**payload, "stream_options": {"include_usage": True}}
    return _stream(client, f"{base_url}/v1/chat/completions", body,
                   lambda choice: (choice.get("delta") or {}).get("content"))


def http_client(timeout_s: float = 600.0) -> Any:
    """An httpx.Client for 127.0.0.1 only (no proxies from the environment)."""
    import httpx

    return httpx.Client(timeout=timeout_s, trust_env=False)


# --------------------------------------------------------------------------- statistics
def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def percentile(values: Iterable[float], pct: float) -> float:
    """The `pct`-th percentile by linear interpolation between closest ranks (numpy's default)."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    rank = (len(data) - 1) * pct / 100
    low, high = math.floor(rank), math.ceil(rank)
    return data[low] + (data[high] - data[low]) * (rank - low)


def goal_line(name: str, value: float, goal: float, at_most: bool = False) -> str:
    """`goal: NAME 1.02 >= 0.97 met` (or `<=` with at_most)."""
    met = value <= goal if at_most else value >= goal
    return f"goal: {name} {value:.3f} {'<=' if at_most else '>='} {goal} {'met' if met else 'MISSED'}"


def machine_line(threads: int) -> str:
    """CPU model, cores, the threads used and the load average: the context of the numbers."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    averages = os.getloadavg()
    load = ", ".join(f"{x:.2f}" for x in averages)
    line = f"machine: {cpu}, {os.cpu_count()} logical CPUs, {threads} threads; load average {load}"
    if averages[0] > 0.5 * (os.cpu_count() or 1):
        # llama.cpp's threads spin-wait on each other: another busy process can cut
        # decode speed tenfold, and not evenly between the sides being compared.
        line += " (busy: other processes are running, these figures are noise)"
    return line


def default_threads() -> int:
    """The physical cores, as our loader picks them."""
    sys.path.insert(0, str(ROOT))
    from loaders.llama_cpp import physical_cores

    return physical_cores()


def add_server_args(parser: Any, ctx_size: int) -> None:
    """The flags every API benchmark takes: the model, threads and context size."""
    parser.add_argument("model", type=Path, help="a .gguf file (python -m tests.kit.bench_model models/bench-q8_0.gguf)")
    parser.add_argument("--threads", type=int, default=0, help="0 = physical cores")
    parser.add_argument("--ctx-size", type=int, default=ctx_size, help="context tokens (per slot)")
    parser.add_argument("--server-args", type=shlex.split, default=[],
                        help='more server.py flags in one string, after an = sign: --server-args="--no-context-shift"')
