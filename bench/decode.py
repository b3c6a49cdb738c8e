"""Decode speed of our generator against raw llama_cpp.Llama on the same GGUF file.

    python bench/decode.py MODEL.gguf [--tokens 128] [--runs 3] [--threads N]

Both load the file with the same settings and sample with the same chain (llama.cpp's
Llama.generate defaults: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05). Runs are
interleaved (raw, ours, raw, ours, ...) so drift on a shared machine hits both alike.
Decode speed is measured from the first generated token to the last, so prompt
processing is left out of both. Prints tokens/s per run, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.generation import Generator  # noqa: E402
from modules.model_manager import ModelManager  # noqa: E402
from modules.sampling import SamplingParams  # noqa: E402
from modules.settings import Settings  # noqa: E402

PROMPT = "The old lighthouse keeper climbed the stairs one last time and"
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0 = physical cores")
    parser.add_argument("--ctx-size", type=int, default=1024)
    args = parser.parse_args()

    import llama_cpp
    import psutil

    from loaders.llama_cpp import LlamaCppOptions

    threads = args.threads or psutil.cpu_count(logical=False) or 1
    settings = Settings(models_dir=str(args.model.resolve().parent), ctx_size=args.ctx_size, threads=threads,
                        threads_batch=threads)
    models = ModelManager(settings, args.model.resolve().parent)
    generator = Generator(models)
    opts = LlamaCppOptions(ctx_size=args.ctx_size, threads=threads, threads_batch=threads)

    # Only one model is in memory at a time: an idle llama.cpp context's threads keep
    # spinning for a while, and on a small machine they would slow the other side down.
    def measure_raw(n_tokens: int) -> float:
        raw = llama_cpp.Llama(str(args.model), n_ctx=opts.ctx_size, n_threads=threads, n_threads_batch=threads,
                              n_batch=opts.batch_size, verbose=False)
        try:
            return raw_run(raw, n_tokens)
        finally:
            raw.close()

    def measure_ours(n_tokens: int, seed: int) -> float:
        models.load(args.model.name, loader="llama.cpp")
        try:
            return our_run(generator, n_tokens, seed)
        finally:
            models.unload()

    our_rates, raw_rates = [], []
    measure_raw(8)  # warm the page cache and both code paths
    measure_ours(8, 0)
    for run in range(args.runs):
        raw_rates.append(measure_raw(args.tokens))
        our_rates.append(measure_ours(args.tokens, run))
        print(f"run {run + 1}: raw {raw_rates[-1]:7.2f} tok/s   ours {our_rates[-1]:7.2f} tok/s", flush=True)
    raw_med, our_med = statistics.median(raw_rates), statistics.median(our_rates)
    print(f"model {args.model.name}, {args.tokens} tokens, {threads} threads, {args.runs} runs")
    print(f"median decode: raw llama_cpp.Llama {raw_med:.2f} tok/s, ours {our_med:.2f} tok/s, "
          f"ratio {our_med / raw_med:.3f}")
    generator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
