"""The GPTQ backend: GPTQ-quantised Hugging Face folders through GPTQModel, on CPU or CUDA.

A GPTQ folder is a Transformers folder whose config.json has
`quantization_config.quant_method == "gptq"` and whose linear layers are stored packed
(qweight, qzeros, scales, g_idx). `GPTQLoader.load` opens it with transformers' GPTQ
integration (AutoModelForCausalLM -> optimum's GPTQ quantizer -> GPTQModel's quantised
linear kernels) rather than with `GPTQModel.load`: that path runs any architecture
Transformers knows, where GPTQModel's own loader refuses architectures it has no model
definition for, and the model it returns is a plain Transformers model. So generation,
tokens, the chat template and unloading are the Transformers loader's own (this class
inherits them): every sampler behaves here as it does there.

GPTQModel picks the kernel (`gptq_backend` "auto"): its torch kernel on CPU, Marlin,
ExLlamaV2 or Triton kernels on an NVIDIA GPU; a named backend forces one and fails with
GPTQModel's reason when it cannot run here. torch, transformers, optimum and gptqmodel are
imported inside `load()` only.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from loaders import register_loader
from loaders.hf_folder import check_remote_code, read_config
from loaders.transformers import TransformersLoader
from modules.core.errors import BackendMissingError, ModelLoadError, UnsupportedOptionError
from modules.core.loader_options import GPTQ_BACKENDS, GPTQOptions

INSTALL_HINT = "pip install -r requirements-gptq.txt"
#: The packages the GPTQ path imports: transformers' GPTQ quantizer needs optimum, and
#: optimum's needs gptqmodel's kernels.
PACKAGES = ("torch", "transformers", "optimum", "gptqmodel")
#: Kernel names offered to the user (the gptq_backend option's choices).
BACKENDS = GPTQ_BACKENDS
#: Bit widths GPTQ checkpoints use (transformers' GPTQConfig accepts these).
GPTQ_BITS = (2, 3, 4, 8)


@register_loader
class GPTQLoader(TransformersLoader):
    """A GPTQ-quantised causal LM in memory; implements loaders.base.LoadedModel.

    Build it with `load()`; encode, decode, generate and unload are the Transformers
    loader's (the loaded model is a Transformers model with GPTQModel's quantised layers).
    After `unload()` every call raises ModelNotLoadedError.
    """

    name = "gptq"
    package = "gptqmodel"
    packages = PACKAGES
    install_hint = INSTALL_HINT
    options_class = GPTQOptions
    # The Transformers loader's token loop and torch sampler chain run on this model's logits:
    # the same samplers, logprobs, devices and grammars (llguidance's mask, loaders/grammar_mask.py).
    capabilities = TransformersLoader.capabilities

    @classmethod
    def load(cls, path: Path, options: GPTQOptions) -> GPTQLoader:  # type: ignore[override]
        """Load the GPTQ folder at `path`.

        Raises BackendMissingError (torch, transformers, optimum or gptqmodel missing),
        UnsupportedOptionError (an unknown backend, a negative context length, parallel
        below 1, a GPU kernel on CPU), ModelLoadError (not a GPTQ folder, a model that
        needs trust_remote_code, or any failure inside Transformers or GPTQModel, with its
        message).
        """
        path = Path(path)
        quant = read_gptq_config(path)
        check_options(options)
        torch, transformers = cls._import_backend()
        check_remote_code(path, options.trust_remote_code)
        device = "cuda" if torch.cuda.is_available() and not options.cpu else "cpu"
        kwargs = model_kwargs(transformers, options, device, compute_dtype(torch, device), quant)
        with warnings.catch_warnings():
            # "the model already has a quantization_config... loading attributes will be
            # overwritten": that is what a chosen backend is meant to do.
            warnings.filterwarnings("ignore", message=".*already has a `quantization_config`.*")
            model, tokenizer = cls._open(
                path, kwargs, trust_remote_code=options.trust_remote_code, oom_hint="try a smaller model or --cpu",
                failure=f"GPTQModel could not load {path.name} with backend {options.gptq_backend!r} on {device}",
            )
        return cls._ready(
            path, model, tokenizer, parallel=options.parallel, max_context=options.gptq_max_seq_len,
            metadata={
                "quantization": describe_quantization(quant),
                "trust_remote_code": options.trust_remote_code,
                "gptq_kernel": kernel_name(model),
                "gptq_backend": options.gptq_backend,
            },
        )

    @classmethod
    def _import_backend(cls) -> tuple[Any, Any]:
        """(torch, transformers) with optimum and gptqmodel importable, or BackendMissingError."""
        reason = cls.unavailable_reason()
        if reason:
            raise BackendMissingError(reason)
        # GPTQModel sizes a CPU worker pool when imported and refuses a pool of one worker, which
        # is what its default gives on a 2-core machine (FACTS.md): ask for at least two.
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))
        try:
            import gptqmodel  # noqa: F401 - fails here, with its message, rather than deep inside from_pretrained
            import torch
            import transformers
        except ImportError as exc:
            raise BackendMissingError(f"the gptq loader could not import {exc.name or 'its backend'}: {exc}; "
                                      f"{INSTALL_HINT}") from exc
        return torch, transformers


# --- load helpers ----------------------------------------------------------------------
def read_gptq_config(path: Path) -> dict[str, Any]:
    """config.json's quantization_config for a GPTQ folder; ModelLoadError saying what is wrong."""
    config = read_config(path, "a GPTQ model folder")
    quant = config.get("quantization_config")
    method = str(quant.get("quant_method", "")).lower() if isinstance(quant, dict) else ""
    if method != "gptq":
        found = f"quant_method {method!r}" if method else "no quantization_config"
        raise ModelLoadError(
            f"{path.name} is not a GPTQ model (its config.json has {found}); "
            "load it with the loader its files call for (Model tab: auto)"
        )
    if not any(p.suffix == ".safetensors" for p in path.iterdir() if p.is_file()):
        raise ModelLoadError(f"{path.name} says it is a GPTQ quant but has no .safetensors weights")
    if quant.get("bits") not in GPTQ_BITS:
        raise ModelLoadError(
            f"{path.name}/config.json gives GPTQ bits {quant.get('bits')!r}; GPTQ uses {', '.join(map(str, GPTQ_BITS))}"
        )
    return quant


def check_options(options: GPTQOptions) -> None:
    """UnsupportedOptionError naming the bad option and its valid values."""
    if options.gptq_backend not in BACKENDS:
        raise UnsupportedOptionError(
            f"gptq_backend must be one of {', '.join(BACKENDS)}, got {options.gptq_backend!r}"
        )
    if not isinstance(options.parallel, int) or options.parallel < 1:
        raise UnsupportedOptionError(f"parallel must be a whole number of at least 1, got {options.parallel!r}")
    if not isinstance(options.gptq_max_seq_len, int) or options.gptq_max_seq_len < 0:
        raise UnsupportedOptionError(
            f"gptq_max_seq_len must be 0 (the model's own) or a positive token count, got {options.gptq_max_seq_len!r}"
        )


def compute_dtype(torch: Any, device: str) -> Any:
    """The dtype of the activations and the unquantised tensors (embeddings, norms, head):
    float16 on CUDA, which the GPU kernels are built for; float32 on CPU, where the torch
    kernel dequantises into it and float16 matmuls are slow."""
    return torch.float16 if device == "cuda" else torch.float32


def model_kwargs(
    transformers: Any, options: GPTQOptions, device: str, dtype: Any, quant: dict[str, Any]
) -> dict[str, Any]:
    """Keyword arguments for AutoModelForCausalLM.from_pretrained on a GPTQ folder.

    A chosen backend travels as a GPTQConfig: transformers keeps the folder's quantisation
    settings and takes only its loading attributes (`backend`) from ours.
    """
    if device == "cpu" and options.gptq_backend in ("triton", "exllama_v2", "marlin"):
        why = "--cpu was given" if options.cpu else "no CUDA GPU is available"
        raise UnsupportedOptionError(
            f"gptq_backend {options.gptq_backend} needs an NVIDIA GPU but {why}; use auto or torch"
        )
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": options.trust_remote_code,
        "use_safetensors": True,
        "local_files_only": True,
        "device_map": "auto" if device == "cuda" else {"": "cpu"},
    }
    if options.gptq_backend != "auto":
        kwargs["quantization_config"] = transformers.GPTQConfig(bits=quant["bits"], backend=options.gptq_backend)
    return kwargs


def describe_quantization(quant: dict[str, Any]) -> str:
    """e.g. "GPTQ 4-bit, group size 128, act-order" for the Model tab."""
    group = quant.get("group_size")
    parts = [f"GPTQ {quant.get('bits')}-bit"]
    parts.append("per-channel" if group in (-1, None) else f"group size {group}")
    if quant.get("desc_act"):
        parts.append("act-order")
    if quant.get("sym") is False:
        parts.append("asymmetric")
    return ", ".join(parts)


def kernel_name(model: Any) -> str | None:
    """The class name of GPTQModel's quantised linear layer in `model` (which kernel runs):
    the first module whose class derives from one of its QuantLinear bases (some kernels,
    e.g. torch_int8, repack qweight into other buffers, so attributes cannot tell)."""
    for module in model.modules():
        bases = type(module).__mro__[1:]
        if any(base.__name__.endswith("QuantLinear") and base.__module__.startswith("gptqmodel.") for base in bases):
            return type(module).__name__
    return None
