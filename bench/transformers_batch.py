"""Aggregate decode speed of the Transformers loader: one request alone vs N at once, batched.

    python bench/transformers_batch.py [--clients 4] [--tokens 96] [--runs 3] [--threads 2]

Builds a random ~28M-parameter Llama (hidden 512, 8 layers, the test kit's tokenizer) as an
fp32 Hugging Face folder in a temporary directory, then loads it twice on the CPU: with
parallel=1 (the one-request path, as before batching) and with parallel=N (the batch
scheduler of loaders/transformers_batch.py). Runs are interleaved: alone (one request on
the parallel=1 model), batched (N requests started together from N threads on the
parallel=N model), alone, ... Each request is greedy and takes exactly `--tokens` tokens
after a short prompt (different prompts per client). Aggregate tokens/s = all tokens
generated / wall time from the first start to the last token, prompt processing included.
Prints each run, the medians, the ratio batched / alone, and whether every batched output
equals its request's output alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = (
    "The old lighthouse keeper climbed the stairs one last time and",
    "Once upon a time",
    "In the village by the river, the baker woke before dawn because",
    "She opened the letter",
    "The engine coughed twice, then",
    "Far beyond the mountains there was a library whose shelves",
    "He said nothing at all",
    "Rain again. The detective lit a match and",
)


def build_model(folder: Path) -> int:
    """Write the benchmark HF folder; returns its parameter count."""
    from tests.kit.gguf_export import LlamaShape
    from tests.kit.hf_model import random_llama_weights, save_hf_model
    from tests.kit.tokenizer import save_hf_tokenizer, train_tokenizer, vocab_info

    tokenizer = train_tokenizer()
    vocab = vocab_info(tokenizer)
    shape = LlamaShape(vocab_size=len(vocab.tokens), hidden=512, layers=8, heads=8, kv_heads=4, ffn=1536)
    weights = random_llama_weights(shape, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    save_hf_tokenizer(tokenizer, folder)
    save_hf_model(folder, shape, vocab, weights)
    return sum(w.size for w in weights.values())


def run_alone(model, prompt_ids: list[int], n_tokens: int) -> tuple[float, list[int]]:
    """(tokens/s, tokens) of one greedy request."""
    from modules.core.sampling import SamplingParams

    start = time.perf_counter()
    tokens = list(islice(model.generate(prompt_ids, SamplingParams(temperature=0), threading.Event()), n_tokens))
    return len(tokens) / (time.perf_counter() - start), tokens


def run_batched(model, prompts: list[list[int]], n_tokens: int) -> tuple[float, list[list[int]]]:
    """(aggregate tokens/s, each request's tokens) of len(prompts) requests started together."""
    from modules.core.sampling import SamplingParams

    outputs: list[list[int]] = [[] for _ in prompts]
    barrier = threading.Barrier(len(prompts) + 1)

    def client(i: int) -> None:
        barrier.wait()
        gen = model.generate(prompts[i], SamplingParams(temperature=0), threading.Event())
        outputs[i] = list(islice(gen, n_tokens))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return sum(map(len, outputs)) / (time.perf_counter() - start), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from loaders.transformers import TransformersLoader, TransformersOptions

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench-llama-28m"
        params = build_model(folder)
        alone_model = TransformersLoader.load(folder, TransformersOptions(cpu=True))
        batch_model = TransformersLoader.load(folder, TransformersOptions(cpu=True, parallel=args.clients))
    print(f"model: random Llama, {params / 1e6:.1f}M parameters, fp32, CPU, torch threads {args.threads}")
    prompts = [alone_model.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.clients)]
    twins = [run_alone(alone_model, p, args.tokens)[1] for p in prompts]  # also warms both paths up
    run_batched(batch_model, prompts, 4)
    alone_speeds, batch_speeds, equal = [], [], True
    for run in range(args.runs):
        speed, _ = run_alone(alone_model, prompts[run % len(prompts)], args.tokens)
        alone_speeds.append(speed)
        speed, outputs = run_batched(batch_model, prompts, args.tokens)
        batch_speeds.append(speed)
        equal = equal and outputs == twins
        print(f"run {run + 1}: alone {alone_speeds[-1]:.1f} tok/s, {args.clients} at once {speed:.1f} tok/s aggregate")
    alone, batched = statistics.median(alone_speeds), statistics.median(batch_speeds)
    print(f"median: alone {alone:.1f} tok/s; {args.clients} concurrent {batched:.1f} tok/s aggregate "
          f"({batched / args.clients:.1f} per client); ratio {batched / alone:.2f} x")
    print(f"peak rows in one decode step: {batch_model._scheduler.peak_rows}")
    print(f"greedy outputs equal to each request alone: {'yes' if equal else 'NO'}")
    alone_model.unload()
    batch_model.unload()


if __name__ == "__main__":
    main()
