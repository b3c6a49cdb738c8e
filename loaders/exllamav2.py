"""The ExLlamaV2 loader: EXL2 and 4-bit GPTQ folders (and plain FP16 ones) on NVIDIA GPUs.

Written against exllamav2 0.3.2 (pinned in requirements-cuda.txt). Loading follows its own
recipe (exllamav2/model.py, config.py, cache.py): `ExLlamaV2Config(folder)` reads config.json,
our options go onto its fields, then `ExLlamaV2(config)` is loaded one of three ways: on one
GPU or a manual `gpu_split` (`load(gpu_split)`, then the cache), automatically across GPUs
while the cache is built (`load_autosplit(cache)` with a lazy cache), or tensor-parallel
(`load_tp` + `ExLlamaV2Cache_TP`). The KV cache is `ExLlamaV2Cache` (FP16), `_8bit` (FP8),
`_Q8`, `_Q6` or `_Q4`.

Generation is our own token loop, the way exllamav2's base generator does it
(generator/base.py): the prompt goes through `model.forward(..., preprocess_only=True)`
after the longest prefix already in the cache, then one `forward` of the last token per
step, its logits sampled by `ExLlamaV2Sampler.sample` with settings mapped from the engine's
SamplingParams (loaders/exllamav2_sampler.py). The stop event aborts a long prefill between
layers (`abort_event`) and ends the loop before each step.

Token ids come from the folder's Hugging Face tokenizer (the same ids and text as the
Transformers loader, special tokens parsed); exllamav2's own tokenizer is built only because
its sampler needs it (vocabulary size, DRY and XTC token tables).

torch and exllamav2 are imported inside `load()` only. exllamav2 compiles its CUDA extension
when first imported, so it cannot even be imported without CUDA: on such a machine the
loader is listed as unavailable with the reason (see `unavailable_reason`).
"""

from __future__ import annotations

import gc
import glob
import importlib.util
import math
import os
import random
import secrets
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders import register_loader
from loaders.base import FALLBACK_CONTEXT, Capabilities, LoaderBase, ModelInfo, Step, auto_context, check_prompt_ids
from loaders.exllamav2_sampler import SamplerPlan, breaker_token_ids, sampler_settings
from loaders.grammar_mask import GrammarCompiler, GrammarMatcher
from loaders.hf_folder import HfTokenizer, HfTokens, load_tokenizer, read_config, tokenizer_info
from loaders.torch_samplers import apply_top_n_sigma, raw_logprobs, token_logprobs
from modules.core.errors import (
    BackendMissingError,
    GenerationError,
    ModelLoadError,
    ModelNotLoadedError,
    UnsupportedOptionError,
    WorkbenchError,
)
from modules.core.loader_options import ExLlamaV2Options
from modules.core.sampling import SAMPLER_NAMES, SamplingParams

INSTALL_HINT = "pip install -r requirements-cuda.txt (start_linux.sh does this when nvidia-smi finds a GPU)"
NEEDS_CUDA = (
    "the exllamav2 loader needs an NVIDIA GPU with CUDA, and none was found on this machine; "
    "load GGUF models with llama.cpp, or GPTQ models with the gptq loader, instead"
)
#: Our cache names (ooba's) -> the exllamav2 cache class.
CACHE_CLASSES = {
    "fp16": "ExLlamaV2Cache",
    "fp8": "ExLlamaV2Cache_8bit",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}
#: exllamav2's default (ExLlamaV2Config.max_input_len): tokens per forward pass at most.
MAX_INPUT_LEN = 2048
#: Quantisation methods exllamav2 0.3.2 reads (EXL2 tensors, GPTQ qweight/qzeros/scales).
SUPPORTED_QUANT = ("exl2", "gptq")


@dataclass(frozen=True)
class LoadPlan:
    """What `load()` will do, decided from the options and config.json alone (pure)."""

    mode: str
    """"single" (first GPU), "split" (manual gpu_split), "autosplit" or "tp"."""
    gpu_split: list[float] | None
    cache_class: str
    config: dict[str, Any]
    """ExLlamaV2Config attributes to set after prepare()."""


@dataclass(frozen=True)
class FolderFacts:
    """What config.json says about a model folder, read without exllamav2."""

    architecture: str
    quant_method: str | None
    quantization: str
    """Human-readable: "EXL2 4.65 bpw (head 6 bits)", "GPTQ 4-bit, group 128", "FP16"."""
    context_length: int
    num_experts: int | None


def parse_gpu_split(text: str) -> list[float] | None:
    """ "20, 7.5" -> [20.0, 7.5]; "" -> None. Raises ModelLoadError naming the bad part."""
    if not text or not text.strip():
        return None
    parts: list[float] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise ModelLoadError(
                f'gpu_split must be GB per GPU separated by commas, such as "20,7.5"; {part!r} is not a number'
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise ModelLoadError(f"gpu_split values must be positive GB, got {part!r} in {text!r}")
        parts.append(value)
    return parts


def plan_load(options: ExLlamaV2Options, facts: FolderFacts) -> LoadPlan:
    """Validate `options` against each other and the model; raise UnsupportedOptionError
    (or ModelLoadError for a malformed value) saying what to change."""
    split = parse_gpu_split(options.gpu_split)
    if options.exl2_cache not in CACHE_CLASSES:
        raise ModelLoadError(f"exl2_cache must be one of {', '.join(CACHE_CLASSES)}, got {options.exl2_cache!r}")
    if options.autosplit and split:
        raise UnsupportedOptionError("autosplit and gpu_split exclude each other: clear gpu_split or untick autosplit")
    if options.enable_tp and options.autosplit:
        raise UnsupportedOptionError("enable_tp and autosplit exclude each other: tensor parallelism splits by itself")
    if options.max_seq_len < 0:
        raise ModelLoadError(f"max_seq_len must be 0 (the model's own) or a token count, got {options.max_seq_len}")
    for name in ("alpha_value", "compress_pos_emb"):
        value = getattr(options, name)
        if not math.isfinite(value) or value < 0 or (name == "alpha_value" and value == 0):
            raise ModelLoadError(f"{name} must be a positive number, got {value!r}")
    if options.num_experts_per_token < 0:
        raise ModelLoadError(f"num_experts_per_token must be 0 or more, got {options.num_experts_per_token}")
    if options.num_experts_per_token:
        if not facts.num_experts:
            raise UnsupportedOptionError(f"num_experts_per_token applies to mixture-of-experts models; "
                                         f"{facts.architecture} is not one: set it to 0")
        if options.num_experts_per_token > facts.num_experts:
            raise UnsupportedOptionError(f"num_experts_per_token is {options.num_experts_per_token} but the "
                                         f"model has {facts.num_experts} experts")
    seq_len = auto_context(options.max_seq_len, facts.context_length)  # 0: the model's own, capped
    config: dict[str, Any] = {
        "max_seq_len": seq_len,
        "max_input_len": min(MAX_INPUT_LEN, seq_len),
        "max_attention_size": min(MAX_INPUT_LEN, seq_len) ** 2,
        "scale_alpha_value": float(options.alpha_value),
        "no_flash_attn": bool(options.no_flash_attn),
        "no_xformers": bool(options.no_xformers),
        "no_sdpa": bool(options.no_sdpa),
    }
    if options.compress_pos_emb:
        config["scale_pos_emb"] = float(options.compress_pos_emb)
    if options.num_experts_per_token:
        config["num_experts_per_token"] = int(options.num_experts_per_token)
    mode = "tp" if options.enable_tp else "autosplit" if options.autosplit else "split" if split else "single"
    return LoadPlan(mode=mode, gpu_split=split, cache_class=CACHE_CLASSES[options.exl2_cache], config=config)


def read_folder_facts(path: Path) -> FolderFacts:
    """Check a model folder for what exllamav2 needs and describe its quantisation.

    Raises ModelLoadError (no config.json, no safetensors, no tokenizer.json) and
    UnsupportedOptionError (a quantisation exllamav2 cannot run, GPTQ other than 4-bit).
    """
    config = read_config(path, "a Hugging Face model folder (exllamav2 loads folders with config.json)")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path.name} has no .safetensors weights: exllamav2 reads safetensors only")
    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{path.name} has no tokenizer.json: exllamav2 needs the Hugging Face tokenizer file")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise ModelLoadError(f"{path.name}/config.json must name exactly one architecture, got {architectures!r}")
    method, description = _describe_quantization(path.name, config.get("quantization_config"))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return FolderFacts(
        architecture=str(architectures[0]),
        quant_method=method,
        quantization=description,
        context_length=_context_length(config, text),
        num_experts=_first_int(config, ("num_local_experts", "num_experts")),
    )


def _describe_quantization(name: str, quant: Any) -> tuple[str | None, str]:
    if not isinstance(quant, dict) or not quant.get("quant_method"):
        return None, "FP16 (not quantised)"
    method = str(quant["quant_method"]).lower()
    if method not in SUPPORTED_QUANT:
        raise UnsupportedOptionError(
            f"{name} is a {method} quant, which exllamav2 cannot run: use a loader made for it "
            f"(exllamav2 runs EXL2 and 4-bit GPTQ)"
        )
    bits = quant.get("bits")
    if method == "exl2":
        head = quant.get("head_bits")
        return method, f"EXL2 {bits} bpw" + (f" (head {head} bits)" if head else "")
    if bits != 4:
        raise UnsupportedOptionError(
            f"{name} is {bits}-bit GPTQ; exllamav2 runs 4-bit GPTQ only: load it with the gptq loader"
        )
    group = quant.get("group_size")
    act_order = quant.get("desc_act")
    return method, "GPTQ 4-bit" + (f", group {group}" if group else "") + (", act-order" if act_order else "")


def _context_length(config: dict[str, Any], text: dict[str, Any]) -> int:
    """The keys exllamav2's config.py reads for max_seq_len, in its order; the one fallback
    (loaders.base.FALLBACK_CONTEXT, exllamav2's own 2048 too) without one."""
    keys = ("max_sequence_length", "model_max_length", "max_position_embeddings", "max_seq_len", "n_positions")
    return _first_int(config, keys) or _first_int(text, keys) or FALLBACK_CONTEXT


def _first_int(config: dict[str, Any], keys: Sequence[str]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def cuda_device_present(root: Path = Path("/")) -> bool:
    """True when an NVIDIA GPU is visible, checked from device files without importing torch.

    The NVIDIA driver creates /dev/nvidia0... for each GPU and /proc/driver/nvidia/gpus/ when
    it is loaded; either is enough. `root` lets tests stand in a fake filesystem.
    """
    if glob.glob(str(root / "dev" / "nvidia[0-9]*")):
        return True
    gpus = root / "proc" / "driver" / "nvidia" / "gpus"
    return gpus.is_dir() and any(gpus.iterdir())


def cuda_compiler_reason(homes: Sequence[str | None] | None = None) -> str | None:
    """Why exllamav2 could not build its CUDA extension here, or None when it can (or need not).

    The PyPI wheel of exllamav2 0.3.2 is pure Python: at first import it compiles its
    extension with torch.utils.cpp_extension, which needs nvcc (found as torch finds it:
    CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda). A prebuilt `exllamav2_ext` skips that.
    """
    if importlib.util.find_spec("exllamav2_ext") is not None:
        return None
    if homes is None:
        homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if shutil.which("nvcc") or any(h and Path(h, "bin", "nvcc").exists() for h in homes):
        return None
    return ("exllamav2 compiles its CUDA extension on first use and needs the CUDA toolkit for that: "
            "install it (nvcc, matching PyTorch's CUDA version) or set CUDA_HOME")


@register_loader
class ExLlamaV2Loader(HfTokens, LoaderBase):
    """A model loaded with exllamav2 on one or more NVIDIA GPUs; implements LoadedModel.

    One generation at a time: starting a new `generate()` ends an earlier one that is still
    suspended (it returns at its next step), so the KV cache has one owner.
    """

    name = "exllamav2"
    package = "exllamav2"
    install_hint = INSTALL_HINT
    options_class = ExLlamaV2Options
    # top_n_sigma is logits processing of ours (before exllamav2's sampler); mirostat is 2.0 only.
    # Grammars: llguidance's mask on the logits before exllamav2's sampler (loaders/grammar_mask.py).
    capabilities = Capabilities(samplers=frozenset(SAMPLER_NAMES), grammar=True, devices=("cuda",), logprobs=True)

    def __init__(self, backend: Any, parts: dict[str, Any], info: ModelInfo) -> None:
        self._torch = backend["torch"]
        self._exl = backend["exllamav2"]
        self._sampler_class = backend["sampler"]
        self._model: Any = parts["model"]
        self._cache: Any = parts["cache"]
        self._exl_tokenizer: Any = parts["exl_tokenizer"]
        self.info = info
        # Ids past both vocabularies are padding rows of the head: never valid.
        self._valid_vocab = min(int(self._exl_tokenizer.get_vocab_size()), info.vocab_size)
        self._tokens = HfTokenizer(parts["tokenizer"], name=info.name, bos_token_id=info.bos_token_id,
                                   vocab_size=self._valid_vocab)
        self._grammars = GrammarCompiler(parts["tokenizer"], eos_token_ids=info.eos_token_ids,
                                         vocab_size=info.vocab_size)
        self._cached: list[int] = []  # tokens whose keys/values are in the cache, in order
        self._epoch = 0
        self._lock = threading.Lock()
        self.parallel = 1
        """One generation at a time (see loaders.base.concurrency_of): the cache has one owner."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when a CUDA GPU, torch and exllamav2 (and a way to build its extension) are here.

        Checked from files alone: neither torch nor exllamav2 is imported (that would compile
        the extension), so the app starts fast and the Model tab can show the reason.
        """
        if not cuda_device_present():
            return NEEDS_CUDA
        missing = [n for n in ("torch", "exllamav2") if importlib.util.find_spec(n) is None]
        if missing:
            return f"the exllamav2 loader needs {' and '.join(missing)}: {INSTALL_HINT}"
        return cuda_compiler_reason()

    # --- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, options: ExLlamaV2Options) -> ExLlamaV2Loader:
        """Load the folder at `path` onto the GPU(s).

        Raises BackendMissingError (no CUDA GPU, torch/exllamav2 missing, its extension
        cannot be built), UnsupportedOptionError / ModelLoadError (options that conflict, a
        quantisation exllamav2 cannot run, a folder without what it needs, out of memory,
        or any failure inside exllamav2, with its message).
        """
        path = Path(path)
        reason = cls.unavailable_reason()
        if reason:
            raise BackendMissingError(reason)
        facts = read_folder_facts(path)
        plan = plan_load(options, facts)
        backend = _import_backend()
        torch = backend["torch"]
        if not torch.cuda.is_available():
            raise BackendMissingError(NEEDS_CUDA + f" (PyTorch {torch.__version__} sees no CUDA device)")
        try:
            parts = _load_parts(backend, path, plan)
            tokenizer = load_tokenizer(path, loader=cls.name)  # no remote code: exllamav2 needs tokenizer.json
        except WorkbenchError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelLoadError(
                f"out of GPU memory loading {path.name}: lower max_seq_len, use exl2_cache q4, or a smaller quant"
            ) from exc
        except Exception as exc:  # exllamav2 reports problems as asserts, ValueErrors, RuntimeErrors...
            raise ModelLoadError(f"exllamav2 could not load {path.name}: {type(exc).__name__}: {exc}") from exc
        parts["tokenizer"] = tokenizer
        return cls(backend, parts, _build_info(path, facts, plan, parts, backend))

    # --- generation --------------------------------------------------------------------
    def generate(
        self, prompt_ids: list[int], params: SamplingParams, stop_event: threading.Event
    ) -> Iterator[Step]:
        """Yield a Step per sampled token after evaluating `prompt_ids` (see
        LoadedModel.generate); with `params.logprobs` N > 0 each step carries its token's
        TokenLogprobs (top N, from the raw logits).

        Raises InvalidRequestError (empty prompt, prompt ids outside the vocabulary,
        Mirostat 1, bans of every token, an invalid grammar), ContextLengthExceededError,
        GenerationError (the GPU failed).
        """
        self._require(self._model)
        self._check_prompt(prompt_ids)
        plan = sampler_settings(params, self.info.eos_token_ids, self._valid_vocab)
        grammar = self._grammars.matcher(params.grammar_string, params.grammar_triggers) \
            if params.grammar_string else None
        settings = self._settings(plan)
        rng = random.Random(params.seed if params.seed is not None else secrets.randbits(64))
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
        context = self.info.context_length
        count = len(prompt_ids)
        if count >= context or not self._prefill(prompt_ids, stop_event):
            return
        torch = self._torch
        # The whole history, for the penalties and DRY: a (1, n) view of one buffer.
        history = torch.zeros((1, context), dtype=torch.long)
        history[0, :count] = torch.tensor(prompt_ids, dtype=torch.long)
        last = prompt_ids[-1]
        while not stop_event.is_set() and self._epoch == epoch:
            logits = self._step(last)
            step = self._sample(logits, settings, plan, history[:, :count], rng, params.logprobs, grammar)
            history[0, count] = step.token
            count += 1
            yield step
            if count >= context or (grammar is not None and grammar.done):
                return
            last = step.token

    def _settings(self, plan: SamplerPlan) -> Any:
        """A fresh ExLlamaV2Sampler.Settings (it holds per-generation state: Mirostat, DRY)."""
        settings = self._sampler_class.Settings(**plan.settings)
        if plan.settings["dry_multiplier"] > 0:  # an empty set means no breakers; None, exllamav2's own
            breakers = plan.dry_breakers
            settings.dry_sequence_breakers = self._tokens.dry_breakers(
                breakers, lambda _encode, texts: breaker_token_ids(breakers, texts)
            )
        return settings

    def _prefill(self, prompt_ids: list[int], stop_event: threading.Event) -> bool:
        """Put all but the last prompt token into the cache, reusing the longest cached
        prefix; False when cancelled meanwhile."""
        torch = self._torch
        reuse = min(_common_prefix(self._cached, prompt_ids), len(prompt_ids) - 1)
        self._cache.current_seq_len = reuse
        self._cached = list(prompt_ids[:reuse])
        rest = prompt_ids[reuse:-1]
        if not rest:
            return not stop_event.is_set()
        ids = torch.tensor([rest], dtype=torch.long)
        with self._failures("evaluating the prompt", "shorten it or lower max_seq_len"):
            self._model.forward(ids, self._cache, preprocess_only=True, abort_event=stop_event)
        # An abort leaves the cache holding the chunks that were finished.
        self._cached = list(prompt_ids[: self._cache.current_seq_len])
        return not stop_event.is_set()

    def _step(self, token: int) -> Any:
        """Forward one token after the cache: float32 CPU logits of shape (1, 1, vocab)."""
        with self._failures("during generation", "lower max_seq_len"):
            logits = self._model.forward(self._torch.tensor([[token]], dtype=self._torch.long), self._cache)
        self._cached.append(token)
        return logits[:, -1:, :].float().cpu()

    @contextmanager
    def _failures(self, doing: str, memory_hint: str) -> Iterator[None]:
        """GenerationError saying what failed (out of GPU memory: `memory_hint`); the cache's
        contents are then unknown, so nothing in it is reused."""
        torch = self._torch
        try:
            yield
        except torch.cuda.OutOfMemoryError as exc:
            self._cached = []
            raise GenerationError(f"out of GPU memory {doing}: {memory_hint}") from exc
        except (RuntimeError, AssertionError) as exc:
            self._cached = []
            raise GenerationError(f"exllamav2 failed {doing}: {exc}") from exc

    def _sample(
        self, logits: Any, settings: Any, plan: SamplerPlan, sequence: Any, rng: random.Random, want: int,
        grammar: GrammarMatcher | None = None,
    ) -> Step:
        """One token from (1, 1, vocab) logits with exllamav2's sampler (which edits them in
        place), with its raw logprobs (top `want`) when `want` > 0; under `grammar`, the
        logits are masked first and the grammar advances on the token."""
        valid = logits[0, 0, : self._valid_vocab]
        raw = raw_logprobs(valid, self._valid_vocab) if want else None
        forced = grammar.forced() if grammar is not None else None
        if forced is not None:
            tid = forced  # the grammar is complete and only EOS may follow
        else:
            if grammar is not None:
                grammar.mask(logits[0, 0])
            tid = self._draw(logits, settings, plan, sequence, rng)
        if grammar is not None:
            grammar.advance(tid)
        return Step(tid, token_logprobs(raw, tid, want) if raw is not None else None)

    def _draw(self, logits: Any, settings: Any, plan: SamplerPlan, sequence: Any, rng: random.Random) -> int:
        """exllamav2's sampler on the (1, 1, vocab) logits, after our top_n_sigma and the bias."""
        torch = self._torch
        valid = logits[0, 0, : self._valid_vocab]
        if plan.top_n_sigma > 0:
            apply_top_n_sigma(valid, sequence, plan.top_n_sigma)
        if plan.token_bias and getattr(settings, "token_bias", None) is None:
            settings.token_bias = _bias_tensor(torch, plan.token_bias, logits.shape[-1])
        # exllamav2's DRY indexes an empty n-gram history on a one-token sequence.
        dry = settings.dry_multiplier
        if dry and sequence.shape[1] < 2:
            settings.dry_multiplier = 0.0
        try:
            token, _, _, _, _ = self._sampler_class.sample(logits, settings, sequence, rng.random(), self._exl_tokenizer)
        except (RuntimeError, AssertionError, IndexError) as exc:
            raise GenerationError(f"exllamav2's sampler failed: {exc}") from exc
        finally:
            settings.dry_multiplier = dry
        return int(token[0, 0])

    def _check_prompt(self, prompt_ids: Sequence[int]) -> None:
        check_prompt_ids(prompt_ids, self.info.context_length, self._valid_vocab,
                         " (raise max_seq_len to load a longer one)")

    # --- lifecycle ---------------------------------------------------------------------
    def unload(self) -> None:
        """Free the weights and the cache on every GPU now."""
        model, self._model, self._cache = self._model, None, None
        self._exl_tokenizer = None
        self._tokens.close()
        self._cached = []
        if model is not None:
            model.unload()
        gc.collect()
        self._torch.cuda.empty_cache()

    def _require(self, part: Any) -> Any:
        if part is None:
            raise ModelNotLoadedError(f"{self.info.name} has been unloaded")
        return part


# --- load helpers ----------------------------------------------------------------------
def _import_backend() -> dict[str, Any]:
    """torch, exllamav2 and its sampler; BackendMissingError when missing or not buildable."""
    try:
        import torch
    except ImportError as exc:
        raise BackendMissingError(f"the exllamav2 loader needs PyTorch: {INSTALL_HINT}") from exc
    try:
        import exllamav2
        from exllamav2.generator import ExLlamaV2Sampler
    except ImportError as exc:
        if exc.name in ("exllamav2", "exllamav2.generator"):
            raise BackendMissingError(f"the exllamav2 loader needs the 'exllamav2' package: {INSTALL_HINT}") from exc
        raise BackendMissingError(f"exllamav2 could not be imported ({exc}); reinstall it: {INSTALL_HINT}") from exc
    except Exception as exc:  # the JIT build of its CUDA extension fails with RuntimeError, OSError...
        raise BackendMissingError(
            f"exllamav2 could not build or load its CUDA extension: {type(exc).__name__}: {exc}. "
            f"It needs the CUDA toolkit (nvcc) matching PyTorch's CUDA, ninja and a C++ compiler"
        ) from exc
    return {"torch": torch, "exllamav2": exllamav2, "sampler": ExLlamaV2Sampler}


def _load_parts(backend: dict[str, Any], path: Path, plan: LoadPlan) -> dict[str, Any]:
    """Config, model, cache and exllamav2's tokenizer, loaded the way `plan` says."""
    exl = backend["exllamav2"]
    config = exl.ExLlamaV2Config(str(path))  # reads config.json and maps the tensors (prepare())
    for key, value in plan.config.items():
        setattr(config, key, value)
    config.arch_compat_overrides(quiet=True)  # e.g. drops flash-attn for models it cannot run
    model = exl.ExLlamaV2(config)
    cache_class = getattr(exl, plan.cache_class)
    seq_len = plan.config["max_seq_len"]
    if plan.mode == "tp":
        model.load_tp(plan.gpu_split, expect_cache_tokens=seq_len, expect_cache_base=cache_class)
        cache = exl.ExLlamaV2Cache_TP(model, base=cache_class, max_seq_len=seq_len)
    elif plan.mode == "autosplit":
        cache = cache_class(model, max_seq_len=seq_len, lazy=True)
        model.load_autosplit(cache)
    else:
        model.load(plan.gpu_split)
        cache = cache_class(model, max_seq_len=seq_len)
    return {"config": config, "model": model, "cache": cache, "exl_tokenizer": exl.ExLlamaV2Tokenizer(config)}


def _build_info(path: Path, facts: FolderFacts, plan: LoadPlan, parts: dict[str, Any],
                backend: dict[str, Any]) -> ModelInfo:
    config, model, cache, tokenizer = parts["config"], parts["model"], parts["cache"], parts["tokenizer"]
    from exllamav2 import attn

    context = min(int(plan.config["max_seq_len"]), int(cache.max_seq_len))
    backend_name = attention_backend(
        {"flash-attn": attn.has_flash_attn, "xformers": attn.has_xformers, "sdpa": attn.has_lower_right_sdpa},
        {"flash-attn": config.no_flash_attn, "xformers": config.no_xformers, "sdpa": config.no_sdpa},
    )
    return ModelInfo(
        name=path.name,
        path=path,
        loader=ExLlamaV2Loader.name,
        context_length=context,
        vocab_size=int(config.vocab_size),
        **tokenizer_info(path, tokenizer, config.eos_token_id),
        metadata={
            "architecture": facts.architecture,
            "quantization": facts.quantization,
            "cache": plan.cache_class.removeprefix("ExLlamaV2"),
            "split": plan.mode,
            "gpu_split_gb": plan.gpu_split,
            "devices": sorted(str(d) for d in model.get_cache_devices()) if plan.mode != "tp" else ["tensor-parallel"],
            "attention": backend_name,
            "rope_alpha": config.scale_alpha_value,
            "rope_scale": config.scale_pos_emb,
            "trained_context": facts.context_length,
            "exllamav2": getattr(backend["exllamav2"], "__version__", "?"),
        },
    )


def attention_backend(available: dict[str, bool], disabled: dict[str, bool]) -> str:
    """Which attention exllamav2 uses: the first of flash-attn, xformers, SDPA that is
    installed and not switched off, else its plain matmul attention (attn.py's order)."""
    for name in ("flash-attn", "xformers", "sdpa"):
        if available.get(name) and not disabled.get(name):
            return name
    return "matmul"


def _bias_tensor(torch: Any, bias: dict[int, float], width: int) -> Any:
    """The float32 CPU tensor exllamav2 adds to the logits (as wide as the padded head)."""
    tensor = torch.zeros((width,), dtype=torch.float)
    ids = torch.tensor(list(bias), dtype=torch.long)
    tensor[ids] = torch.tensor(list(bias.values()), dtype=torch.float)
    return tensor


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
