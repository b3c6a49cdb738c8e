"""Decode speed of our generator, in-process and through the API, against raw llama_cpp.Llama.

    python bench/decode.py MODEL.gguf [--tokens 128] [--runs 3] [--threads N] [--ctx-size 1024]

Three sides decode the same GGUF file with the same load settings (n_ctx, n_batch,
threads, KV cache type: the raw side gets exactly the `Llama(...)` arguments our loader
builds) and the same sampling (llama.cpp's Llama.generate defaults: temperature 0.8,
top_k 40, top_p 0.95, min_p 0.05; a fixed seed; EOS banned so every run has the same
length):

- raw: `llama_cpp.Llama.generate` in this process;
- ours: our Generator in this process (queue, detokeniser, stop matcher and all);
- api: `server.py --api` as a subprocess, streaming /v1/completions (SSE) to this process;
- with --chat, two more API sides: chat (streaming /v1/chat/completions, the chat path with its
  reasoning/tool-call reader) and schema (the same with a response_format json_schema).

Runs are interleaved (raw, ours, api, raw, ...) and strictly one at a time: two llama.cpp
contexts decoding at once on a small CPU would ruin both. The server keeps its model
loaded but idle while the other two run; raw and ours load the model for each run and
free it afterwards. Decode speed is measured from the first generated token to the last,
so prompt processing is left out (the API side from the first streamed chunk to the last
event). Prints tokens/s per run, the medians, their ratios and the goal (api >= 0.97 x raw).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from modules.core.sampling import SamplingParams  # noqa: E402
from modules.core.settings import Settings  # noqa: E402
from modules.engine.generation import Generator  # noqa: E402
from modules.engine.model_manager import ModelManager  # noqa: E402

PROMPT = "The old lighthouse keeper climbed the stairs one last time and"
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
API_GOAL = 0.97


def raw_run(llm, n_tokens: int) -> float:
    """Tokens/s of llama_cpp.Llama.generate from the first token to the n-th."""
    llm.reset()
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True)
    first = None
    count = 0
    for _ in llm.generate(tokens, temp=SAMPLING["temperature"], top_k=SAMPLING["top_k"],
                          top_p=SAMPLING["top_p"], min_p=SAMPLING["min_p"], reset=True):
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count == n_tokens:
            break
    return (count - 1) / (time.perf_counter() - first)


def our_run(generator: Generator, n_tokens: int, seed: int) -> float:
    """Tokens/s of our generator (queue, detokeniser, stop matcher and all)."""
    params = SamplingParams(max_new_tokens=n_tokens, ban_eos_token=True, seed=seed, **SAMPLING)
    first_time = first_count = None
    last = None
    for chunk in generator.submit(PROMPT, params):
        if first_time is None and chunk.completion_tokens:
            first_time, first_count = time.perf_counter(), chunk.completion_tokens
        last = chunk
    assert last is not None and first_time is not None and last.completion_tokens == n_tokens
    return (last.completion_tokens - first_count) / (time.perf_counter() - first_time)


def api_run(client, server: common.ApiServer, n_tokens: int, seed: int) -> float:
    """Tokens/s of one streamed /v1/completions, first streamed chunk to the last event."""
    payload = {"prompt": PROMPT, "max_tokens": n_tokens, "seed": seed, "ban_eos_token": True, **SAMPLING}
    result = common.stream_completion(client, server.url, payload)
    if result.completion_tokens != n_tokens:
        raise RuntimeError(f"the API generated {result.completion_tokens} tokens, not {n_tokens}")
    return result.decode_rate()


STORY_SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
                "required": ["title", "story"]}
"""The --chat side's json_schema: open strings, so the bench model writes until max_tokens."""


def chat_run(client, server: common.ApiServer, n_tokens: int, seed: int, schema: bool) -> float:
    """Tokens/s of one streamed /v1/chat/completions (plain, or constrained to STORY_SCHEMA)."""
    payload = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": n_tokens, "seed": seed,
               **SAMPLING}
    if schema:
        payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": STORY_SCHEMA}}
    else:
        payload["ban_eos_token"] = True
    result = common.stream_chat(client, server.url, payload)
    return result.decode_rate()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_server_args(parser, ctx_size=1024)
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs of each side")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--cache-type", default="f16", choices=("f16", "q8_0", "q4_0", "f32"))
    parser.add_argument("--no-api", action="store_true", help="leave out the API side (no server started)")
    parser.add_argument("--chat", action="store_true",
                        help="add two API sides: plain /v1/chat/completions and one with a json_schema")
    return parser.parse_args()


def main() -> int:
    args = parse_args()

    import llama_cpp

    from loaders.llama_cpp import LlamaCppOptions, llama_kwargs, read_gguf_metadata

    model = args.model.resolve()
    threads = args.threads or common.default_threads()
    opts = LlamaCppOptions(ctx_size=args.ctx_size, threads=threads, threads_batch=threads,
                           batch_size=args.batch_size, cache_type=args.cache_type)
    raw_kwargs = llama_kwargs(model, opts, read_gguf_metadata(model))  # what our loader passes
    # Our loader leaves flash attention to llama.cpp ("auto": on where supported, as on a
    # CPU); Llama() takes only on or off, so the raw side gets it on too.
    raw_kwargs["flash_attn"] = True
    settings = Settings(models_dir=str(model.parent), ctx_size=args.ctx_size, threads=threads,
                        threads_batch=threads, batch_size=args.batch_size, cache_type=args.cache_type)
    models = ModelManager(settings, model.parent)
    generator = Generator(models)
    server = None
    if not args.no_api:
        server = common.ApiServer(model, threads, args.ctx_size,
                           ["--batch-size", str(args.batch_size), "--cache-type", args.cache_type,
                                   *args.server_args])
    client = common.http_client()

    # Only one model decodes at a time; raw and ours hold theirs only for their own run
    # (an idle llama.cpp context's threads keep spinning a while and would slow the others).
    def measure_raw(n_tokens: int, seed: int) -> float:
        raw = llama_cpp.Llama(**raw_kwargs, seed=seed)
        try:
            return raw_run(raw, n_tokens)
        finally:
            raw.close()
            common.settle()

    def measure_ours(n_tokens: int, seed: int) -> float:
        models.load(model.name, loader="llama.cpp")
        try:
            return our_run(generator, n_tokens, seed)
        finally:
            models.unload()
            common.settle()

    def measure_api(n_tokens: int, seed: int) -> float:
        try:
            return api_run(client, server, n_tokens, seed)
        finally:
            common.settle()

    def measure_chat(schema: bool) -> Callable[[int, int], float]:
        def measure(n_tokens: int, seed: int) -> float:
            try:
                return chat_run(client, server, n_tokens, seed, schema)
            finally:
                common.settle()
        return measure

    sides = {"raw": measure_raw, "ours": measure_ours}
    if server is not None:
        sides["api"] = measure_api
        if args.chat:
            sides["chat"], sides["schema"] = measure_chat(False), measure_chat(True)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    try:
        print(common.machine_line(threads), flush=True)
        for measure in sides.values():  # warm the page cache and every code path
            measure(8, 0)
        for run in range(args.runs):
            for name, measure in sides.items():
                rates[name].append(measure(args.tokens, run + 1))
            print(f"run {run + 1}: " + "   ".join(f"{n} {r[-1]:7.2f} tok/s" for n, r in rates.items()), flush=True)
    finally:
        client.close()
        generator.close()
        if server is not None:
            server.close()
    med = {name: common.median(values) for name, values in rates.items()}
    print(f"model {model.name}, {args.tokens} tokens, {threads} threads, ctx {args.ctx_size}, "
          f"batch {args.batch_size}, KV {args.cache_type}, {args.runs} runs")
    print("median decode: " + ", ".join(f"{name} {value:.2f} tok/s" for name, value in med.items()))
    print(f"ratio ours / raw {med['ours'] / med['raw']:.3f}")
    if "api" in med:
        print(f"ratio api / raw {med['api'] / med['raw']:.3f}")
        print(common.goal_line("api / raw decode", med["api"] / med["raw"], API_GOAL))
    if "chat" in med:
        print(f"ratio chat / api {med['chat'] / med['api']:.3f} (the chat path's reply reader vs completions)")
        print(f"ratio schema / chat {med['schema'] / med['chat']:.3f} (the cost of a json_schema grammar)")
    print(common.machine_line(threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
