"""Will this model fit? Memory estimates from GGUF metadata or an HF config.json.

The estimate has three parts, each shown to the user:
  * weights: the GGUF file size (llama.cpp maps the file as it is), or parameters x bytes
    per parameter for a Transformers folder (dtype, or the quantization_config's bits);
  * KV cache: 2 (K and V) x layers x n_ctx x kv_heads x head_dim x bytes per cache element;
  * overhead: the backend's compute buffers and runtime, calibrated against the RSS
    increase measured when loading the test kit's models (tests/test_memory_fit.py).

Pure and cheap: no backend is imported, only file headers are read. Free memory is read
with psutil (RAM) and nvidia-smi (VRAM) so that importing torch is never needed.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders.base import auto_context
from modules.core import gguf_header

MIB = 2**20
GIB = 2**30

#: Bytes per KV cache element for llama.cpp's cache types (q8_0/q4_0 blocks of 32 + an f16 scale).
CACHE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
#: Bytes per parameter for Transformers dtypes.
DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "float8_e4m3fn": 1.0, "int8": 1.0}

# llama.cpp: the compute buffer is dominated by the logits of one micro-batch
# (n_ubatch x n_vocab x 4 bytes: 250 MiB for a 128k vocabulary, as llama.cpp itself
# reports); the rest is a few MiB of runtime state. Calibrated on the test kit: the RSS
# increase is 9.1 MiB for the f32 GGUF (1.5 MB weights, 0.5 MiB KV at n_ctx 2048).
LLAMA_CPP_BASE_BYTES = int(2.8 * MIB)
LLAMA_CPP_UBATCH = 512
# Transformers: the first load pulls in the modeling code, torch's CPU allocator pools and
# the tokenizer, ~100 MiB whatever the model size (measured: 102 MiB for the 1.5 MB kit);
# with the GPTQ extras installed transformers also imports torchao at load: 112-122 MiB.
TRANSFORMERS_BASE_BYTES = 110 * MIB
# Weights the GPU holds besides the repeated layers (embeddings, output head): counted as
# one extra layer when splitting layers over VRAM.
SWAP_MARGIN = 0.9
"""Share of free memory a model may plan to use: the OS and the app need the rest."""


@dataclass(frozen=True)
class ModelShape:
    """What the KV-cache and overhead estimates need to know about a model's architecture."""

    layers: int | None = None
    embedding: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    vocab: int | None = None
    context_train: int | None = None

    @property
    def known(self) -> bool:
        return bool(self.layers and self.kv_heads and self.head_dim)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs at a given context, split so the UI can explain the total."""

    weights: int
    kv_cache: int
    overhead: int
    n_ctx: int
    layers: int | None = None
    kv_known: bool = True
    slots: int = 1
    """Requests served at once (`--parallel`): each has its own n_ctx of KV cache."""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    def describe(self) -> str:
        per = f" for {self.slots} slots" if self.slots > 1 else ""
        kv = f"KV cache {human_bytes(self.kv_cache)} at {self.n_ctx} tokens{per}" if self.kv_known \
            else "KV cache unknown"
        return (f"~{human_bytes(self.total)} (weights {human_bytes(self.weights)}, {kv}, "
                f"overhead {human_bytes(self.overhead)})")


@dataclass(frozen=True)
class FreeMemory:
    """Free RAM and VRAM in bytes (VRAM 0 without an NVIDIA GPU)."""

    ram: int
    vram: int = 0

    @property
    def total(self) -> int:
        return self.ram + self.vram


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; used by every table that shows sizes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def kv_cache_bytes(shape: ModelShape, n_ctx: int, cache_type: str = "f16") -> int:
    """2 x layers x n_ctx x kv_heads x head_dim x bytes per element; 0 when the shape is unknown."""
    if not shape.known:
        return 0
    per = CACHE_BYTES.get(cache_type)
    if per is None:
        raise ValueError(f"cache_type must be one of {', '.join(CACHE_BYTES)}, got {cache_type!r}")
    return int(2 * shape.layers * n_ctx * shape.kv_heads * shape.head_dim * per)  # type: ignore[operator]


# --- GGUF -------------------------------------------------------------------------------------
def shape_from_gguf(header: dict[str, Any]) -> ModelShape:
    """The architecture numbers from a GGUF key/value header (see `parse_gguf_prefix`)."""
    arch = header.get("general.architecture", "llama")

    def get(key: str) -> int | None:
        value = header.get(f"{arch}.{key}")
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None

    embedding, heads = get("embedding_length"), get("attention.head_count")
    kv_heads = get("attention.head_count_kv") or heads
    head_dim = get("attention.key_length") or (embedding // heads if embedding and heads else None)
    return ModelShape(layers=get("block_count"), embedding=embedding, heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, vocab=get("vocab_size") or header.get("_vocab_count"),
                      context_train=get("context_length"))


def estimate_gguf(file_size: int, shape: ModelShape, n_ctx: int, cache_type: str = "f16",
                  slots: int = 1) -> MemoryEstimate:
    """Memory to run a GGUF of `file_size` bytes with llama.cpp at `n_ctx` tokens of context
    for each of `slots` parallel requests."""
    vocab = shape.vocab or 32000  # unknown vocabulary: assume a Llama-2-sized one
    overhead = LLAMA_CPP_BASE_BYTES + LLAMA_CPP_UBATCH * vocab * 4
    return MemoryEstimate(weights=file_size, kv_cache=slots * kv_cache_bytes(shape, n_ctx, cache_type),
                          overhead=overhead, n_ctx=n_ctx, layers=shape.layers, kv_known=shape.known, slots=slots)


def estimate_gguf_file(path: Path, n_ctx: int = 0, cache_type: str = "f16", slots: int = 1) -> MemoryEstimate:
    """`estimate_gguf` for a local file (all shards of a split GGUF counted); n_ctx 0 = what the
    loader takes (loaders.base.auto_context: trained, capped at 8192, else 2048)."""
    with path.open("rb") as f:
        header = parse_gguf_prefix(f.read(16 * MIB))
    shape = shape_from_gguf(header)
    size = sum(p.stat().st_size for p in gguf_shards(path))
    return estimate_gguf(size, shape, auto_context(n_ctx, shape.context_train), cache_type, slots)


def gguf_shards(path: Path) -> list[Path]:
    """`path` alone, or every `-0000k-of-0000n.gguf` shard next to it."""
    stem = path.name
    marker = stem.rfind("-00001-of-")
    if marker < 0:
        return [path]
    prefix = stem[:marker]
    return sorted(path.parent.glob(f"{prefix}-*-of-*.gguf")) or [path]


def parse_gguf_prefix(data: bytes) -> dict[str, Any]:
    """The key/values readable from the first bytes of a GGUF (arrays skipped; `_vocab_count`
    is the tokenizer.ggml.tokens length when that array is whole).

    Tolerant on purpose: the downloader reads only a prefix of a remote file with a Range
    request, so a header cut short returns what was read so far (architecture numbers come
    before the big tokenizer arrays). Not a GGUF: an empty dict. Never raises; counts and
    depths are bounded (see modules.core.gguf_header.read_header_prefix).
    """
    return gguf_header.read_header_prefix(data)


# --- Transformers -----------------------------------------------------------------------------
def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """The architecture numbers from an HF config.json (text_config used for multimodal configs)."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    cfg = {**config, **cfg}
    heads = cfg.get("num_attention_heads")
    embedding = cfg.get("hidden_size")
    head_dim = cfg.get("head_dim") or (embedding // heads if embedding and heads else None)
    return ModelShape(layers=cfg.get("num_hidden_layers"), embedding=embedding, heads=heads,
                      kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
                      vocab=cfg.get("vocab_size"), context_train=cfg.get("max_position_embeddings"))


def config_parameter_count(config: dict[str, Any]) -> int:
    """Parameters of a Llama-like decoder from its config (embeddings, attention, MLP, head)."""
    shape = shape_from_config(config)
    cfg = {**config, **(config.get("text_config") or {})}
    h, layers, vocab = shape.embedding or 0, shape.layers or 0, shape.vocab or 0
    ffn = cfg.get("intermediate_size") or 4 * h
    q = (shape.heads or 0) * (shape.head_dim or 0)
    kv = (shape.kv_heads or 0) * (shape.head_dim or 0)
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * ffn + 2 * h
    head = 0 if cfg.get("tie_word_embeddings") else vocab * h
    return vocab * h + layers * per_layer + h + head


def bytes_per_parameter(config: dict[str, Any], dtype: str = "auto") -> float:
    """From `quantization_config` bits, else `dtype` (auto: the config's dtype on GPU, float32 on CPU)."""
    quant = config.get("quantization_config") or {}
    bits = quant.get("bits") or (4 if quant.get("load_in_4bit") else 8 if quant.get("load_in_8bit") else None)
    if bits:
        return float(bits) / 8 * 1.06  # group scales and zeros add a few percent
    if dtype == "auto":
        dtype = "float32"  # what the Transformers loader picks on a CPU; the safe upper bound
    return DTYPE_BYTES.get(dtype, 4.0)


def estimate_hf_folder(folder: Path, n_ctx: int = 0, dtype: str = "auto", slots: int = 1) -> MemoryEstimate:
    """Memory to load an HF folder with Transformers; weights from the safetensors sizes when present."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    shape = shape_from_config(config)
    per = bytes_per_parameter(config, dtype)
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    stored_dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if stored and not config.get("quantization_config"):
        # The files hold the weights at their stored dtype: rescale to the dtype we load in.
        weights = int(stored * per / DTYPE_BYTES.get(stored_dtype, per))
    else:
        weights = stored or int(config_parameter_count(config) * per)
    ctx = auto_context(n_ctx, shape.context_train)
    kv_type = "f32" if per >= 4 else "f16"
    return MemoryEstimate(weights=weights, kv_cache=slots * kv_cache_bytes(shape, ctx, kv_type),
                          overhead=TRANSFORMERS_BASE_BYTES, n_ctx=ctx, layers=shape.layers, kv_known=shape.known,
                          slots=slots)


def estimate_model(path: Path, n_ctx: int = 0, cache_type: str = "f16", dtype: str = "auto",
                   slots: int = 1) -> MemoryEstimate | None:
    """The estimate for a model in the models folder (a .gguf or an HF folder) serving
    `slots` requests at once; None if unknown."""
    slots = max(1, slots)
    try:
        if path.is_file() and path.suffix == ".gguf":
            return estimate_gguf_file(path, n_ctx, cache_type, slots)
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return estimate_gguf_file(ggufs[0], n_ctx, cache_type, slots)
            if (path / "config.json").is_file():
                return estimate_hf_folder(path, n_ctx, dtype, slots)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    return None


# --- fitting --------------------------------------------------------------------------------
def free_memory() -> FreeMemory:
    """Available RAM (psutil) and free VRAM of all NVIDIA GPUs (nvidia-smi; 0 when absent)."""
    import psutil

    return FreeMemory(ram=int(psutil.virtual_memory().available), vram=_free_vram())


def _free_vram() -> int:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        return sum(int(line.strip()) for line in out.splitlines() if line.strip()) * MIB
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0


def fits(estimate: MemoryEstimate, free: FreeMemory) -> bool:
    """True when the model fits in free RAM + VRAM with a margin (so it will not swap)."""
    return estimate.total <= free.total * SWAP_MARGIN


def suggest_gpu_layers(estimate: MemoryEstimate, free_vram: int) -> int:
    """`n_gpu_layers` for llama.cpp: all (-1) if everything fits in VRAM, else as many layers as fit."""
    if free_vram <= 0 or not estimate.layers:
        return 0
    budget = free_vram * SWAP_MARGIN
    if estimate.total <= budget:
        return -1
    # Each offloaded layer takes its share of the weights and of the KV cache; the output
    # head and compute buffers stay on the GPU once anything is offloaded, so take them first.
    per_layer = (estimate.weights + estimate.kv_cache) / (estimate.layers + 1)
    left = budget - estimate.overhead - per_layer
    return max(0, min(estimate.layers, math.floor(left / per_layer))) if left > 0 else 0


def swap_warning(estimate: MemoryEstimate, free: FreeMemory) -> str | None:
    """A warning to show next to Load when the model would not fit in free memory, else None."""
    if fits(estimate, free):
        return None
    where = "RAM + VRAM" if free.vram else "RAM"
    return (f"This model needs {estimate.describe()}, but only {human_bytes(free.total)} of {where} is free: "
            "it will swap and run very slowly. Pick a smaller quant or a shorter context.")
