"""The load options of every loader, each declared once: default, flag group, help, choices, bounds.

Layer 0, so both sides read the same declaration: each loader imports its options class
(and names it as its `options_class`), and modules.core.settings.Settings inherits these
classes, which makes every option a flag (`build_parser`), a checked value from a file, the
Model tab or the API (`check_option`) and a Model tab control (`setting_component`).
An option several loaders take (parallel, cpu, trust_remote_code, no_flash_attn) is
declared once below and copied into each class with `_again`.

Metadata keys: group (the --help section), help, choices, bounds (low, high, inclusive),
cli_only (command line and CMD_FLAGS.txt only), persist (False: never saved), cli (False:
settings.yaml only), nargs.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field
from typing import Any

GPTQ_BACKENDS: tuple[str, ...] = ("auto", "torch", "torch_int8", "triton", "exllama_v2", "marlin")
"""GPTQModel's BACKEND names offered to the user: auto lets GPTQModel choose for the device; torch
runs everywhere; torch_int8 is its fused int8 CPU kernel; the others need an NVIDIA GPU (marlin:
compute capability 8.0+)."""
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
"""Weight dtypes of the Transformers loader."""
MAX_CONTEXT = 4_194_304
"""The largest context length an option accepts."""


def opt(default: Any, group: str, help: str, **extra: Any) -> Any:
    """A settings field with its flag group and help text (and any of the metadata keys above)."""
    meta = {"group": group, "help": help, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _again(declared: Field) -> Any:
    """A field of its own for one more class, with the default and metadata of `declared`."""
    return field(default=declared.default, metadata=declared.metadata)


# --- options several loaders take ------------------------------------------------------------
PARALLEL: Field = opt(1, "llama.cpp", "Requests served at once (llama.cpp and Transformers: they share the model, "
                      "batched into one decode step); each has its own context, so the KV cache grows N times.",
                      bounds=(1, 256))
NO_FLASH_ATTN: Field = opt(False, "ExLlamaV2", "Do not use flash attention even where it is available "
                           "(ExLlamaV2, and llama.cpp, where it is on by default where supported).")
CPU: Field = opt(False, "Transformers", "Run on the CPU even when a GPU is present.")
TRUST_REMOTE_CODE: Field = opt(False, "Transformers", "Run Python code shipped with the model. Only for models "
                               "you trust (command line or CMD_FLAGS.txt only).", cli_only=True)


@dataclass
class LlamaCppOptions:
    """How to load a GGUF model with llama.cpp; the names match llama-server's flags."""

    n_gpu_layers: int = opt(0, "llama.cpp", "Layers to offload to the GPU; -1 offloads all.", bounds=(-1, 100_000))
    ctx_size: int = opt(0, "llama.cpp", "Context size in tokens; 0 uses the model's own, capped at 8192.",
                        bounds=(0, MAX_CONTEXT))
    threads: int = opt(0, "llama.cpp", "CPU threads for generation; 0 picks the number of physical cores.",
                       bounds=(0, 1024))
    threads_batch: int = opt(0, "llama.cpp", "CPU threads for prompt processing; 0 picks automatically.",
                             bounds=(0, 1024))
    # Tokens per llama_decode call while reading a prompt.
    batch_size: int = opt(512, "llama.cpp", "Prompt tokens processed per batch.", bounds=(1, 65_536))
    rope_freq_base: float = opt(0.0, "llama.cpp", "RoPE base frequency; 0 uses the model's.", bounds=(0.0, 1e9))
    rope_freq_scale: float = opt(0.0, "llama.cpp", "RoPE frequency scaling factor; 0 uses the model's.",
                                 bounds=(0.0, 1000.0))
    # A quantised KV cache needs flash attention: the loader switches it on for one anyway.
    flash_attn: bool = opt(False, "llama.cpp", "Always use flash attention (by default llama.cpp uses it where the "
                           "backend supports it).")
    # Neither flash option set is llama.cpp's "auto" (measured on a 2-core CPU: +7 % decode
    # alone, +20 % with 8 requests batched).
    no_flash_attn: bool = _again(NO_FLASH_ATTN)
    cache_type: str = opt("f16", "llama.cpp", "KV cache type; q8_0 and q4_0 halve or quarter its memory.",
                          choices=("f16", "q8_0", "q4_0", "f32"))  # f32 is exact, for tests
    tensor_split: str = opt("", "llama.cpp", "How to split the model across GPUs, e.g. 3,1.")
    no_mmap: bool = opt(False, "llama.cpp", "Read the whole file into memory instead of mapping it.")
    mlock: bool = opt(False, "llama.cpp", "Lock the model in RAM so the OS never swaps it out.")
    # Re-reading is exact, where a shift keeps what the kept turns meant beside the dropped ones.
    no_context_shift: bool = opt(False, "llama.cpp", "When a chat outgrows the context, process the kept turns "
                                 "again instead of shifting them in the KV cache (slower, exactly a fresh read).")
    parallel: int = _again(PARALLEL)


@dataclass
class TransformersOptions:
    """How to load a Transformers model folder."""

    # auto: bfloat16 on CUDA (float16 where the GPU lacks bf16), float32 on a CPU.
    dtype: str = opt("auto", "Transformers", "Weight dtype; auto is bfloat16 on a GPU and float32 on a CPU.",
                     choices=DTYPES)
    cpu: bool = _again(CPU)
    load_in_8bit: bool = opt(False, "Transformers", "Load weights in 8 bits with bitsandbytes (NVIDIA GPU only).")
    load_in_4bit: bool = opt(False, "Transformers", "Load weights in 4 bits with bitsandbytes (NVIDIA GPU only).")
    trust_remote_code: bool = _again(TRUST_REMOTE_CODE)
    allow_pickle: bool = opt(False, "Transformers", "Allow loading pickled .bin weights (with weights_only=True) "
                             "when a model has no safetensors (command line or CMD_FLAGS.txt only).", cli_only=True)
    # Above 1, concurrent requests share one batched forward per step (loaders/transformers_batch.py).
    parallel: int = _again(PARALLEL)


@dataclass
class ExLlamaV2Options:
    """How to load a model with ExLlamaV2; names as in ooba's ExLlamav2 loaders."""

    # Empty also lets autosplit or tensor parallelism decide.
    gpu_split: str = opt("", "ExLlamaV2", "VRAM in GB per GPU for the weights, comma-separated, e.g. 20,7.5; "
                         "empty puts the model on the first GPU.")
    autosplit: bool = opt(False, "ExLlamaV2", "Fill the GPUs in turn with the weights and the cache; "
                          "excludes gpu_split.")
    max_seq_len: int = opt(0, "ExLlamaV2", "Context length in tokens; 0 uses the model's own, capped at 8192.",
                           bounds=(0, MAX_CONTEXT))
    exl2_cache: str = opt("fp16", "ExLlamaV2", "KV cache type: fp16, fp8, q8, q6 or q4 (q4 takes a quarter of "
                          "fp16's memory).", choices=("fp16", "fp8", "q8", "q6", "q4"))
    alpha_value: float = opt(1.0, "ExLlamaV2", "NTK RoPE alpha: stretches the context without fine-tuning "
                             "(about 2.5 for twice the context); 1 is off.", bounds=(0.01, 1000.0))
    compress_pos_emb: float = opt(0.0, "ExLlamaV2", "Linear RoPE scaling factor (context / trained context, for "
                                  "models tuned for it); 0 keeps the model's.", bounds=(0.0, 1000.0))
    no_flash_attn: bool = _again(NO_FLASH_ATTN)
    no_xformers: bool = opt(False, "ExLlamaV2", "Do not use xformers even when it is installed.")
    no_sdpa: bool = opt(False, "ExLlamaV2", "Do not use PyTorch's scaled-dot-product attention.")
    num_experts_per_token: int = opt(0, "ExLlamaV2", "Experts per token for mixture-of-experts models; "
                                     "0 uses the model's own.", bounds=(0, 1024))
    # With gpu_split given, it caps what each GPU takes.
    enable_tp: bool = opt(False, "ExLlamaV2", "Tensor parallelism: split every layer across all GPUs.")


@dataclass
class GPTQOptions:
    """How to load a GPTQ model folder (GPTQModel's kernels under Transformers)."""

    gptq_backend: str = opt("auto", "GPTQ", "GPTQModel kernel for GPTQ models: auto picks one that runs here (torch "
                            "on a CPU; Marlin, ExLlamaV2 or Triton on an NVIDIA GPU).", choices=GPTQ_BACKENDS)
    gptq_max_seq_len: int = opt(0, "GPTQ", "Context length of a GPTQ model in tokens; 0 uses the model's own.",
                                bounds=(0, MAX_CONTEXT))
    cpu: bool = _again(CPU)  # GPTQModel's torch kernel
    trust_remote_code: bool = _again(TRUST_REMOTE_CODE)
    parallel: int = _again(PARALLEL)


LOADER_OPTIONS: tuple[type, ...] = (LlamaCppOptions, TransformersOptions, ExLlamaV2Options, GPTQOptions)
"""Every loader's options class (Settings inherits them all)."""
