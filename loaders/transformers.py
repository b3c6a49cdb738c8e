"""The Transformers backend: Hugging Face model folders (safetensors) on CPU or CUDA.

`TransformersLoader.load(path, options)` opens a folder with AutoModelForCausalLM and
AutoTokenizer, never touching the network (`local_files_only`). Generation is our own
token loop over the model's KV cache, with the samplers of loaders/torch_samplers.py, so
every sampler the UI offers behaves the same here as in the other loaders.

torch and transformers are imported inside functions only: the app starts, and lists this
loader as unavailable with the install command, when they are missing.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

from loaders import PICKLE_SUFFIXES, register_loader
from loaders.base import Capabilities, LoaderBase, ModelInfo, Step, auto_context, check_prompt_ids
from loaders.grammar_mask import ConstrainedChain, GrammarCompiler
from loaders.hf_folder import HfTokenizer, HfTokens, check_remote_code, load_tokenizer, read_config, tokenizer_info
from loaders.torch_samplers import SamplerChain, dry_breaker_sequences, raw_logprobs, token_logprobs
from loaders.transformers_batch import BatchRequest, BatchScheduler
from modules.core.errors import (
    BackendMissingError,
    GenerationError,
    ModelLoadError,
    ModelNotLoadedError,
    UnsupportedOptionError,
    WorkbenchError,
)
from modules.core.loader_options import DTYPES, TransformersOptions
from modules.core.sampling import SAMPLER_NAMES, SamplingParams

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -r requirements.txt"
#: Prompt tokens evaluated per forward pass: bounds the memory of a long prompt's
#: activations and lets a cancel land between chunks.
PREFILL_CHUNK = 512
#: tokenizer.model_max_length above this is transformers' "no limit" placeholder (1e30).
_SANE_MODEL_MAX_LENGTH = 10_000_000


@register_loader
class TransformersLoader(HfTokens, LoaderBase):
    """A Hugging Face causal LM in memory; implements loaders.base.LoadedModel.

    Build it with `load()`. After `unload()` every call raises ModelNotLoadedError.
    With `parallel` > 1 (the option, when the model's cache can be batched), up to that many
    generate() calls run at once, each consumed in its own thread; each step carries its own
    token's logprobs, so concurrent requests never mix them.
    """

    name = "transformers"
    package = "transformers"
    packages: ClassVar[tuple[str, ...]] = ("torch", "transformers")
    """What `load()` imports; unavailable, naming the missing ones, without any of them."""
    install_hint = INSTALL_HINT
    options_class = TransformersOptions
    # Grammars through llguidance (loaders/grammar_mask.py), masked before the samplers.
    capabilities = Capabilities(samplers=frozenset(SAMPLER_NAMES), grammar=True, devices=("cpu", "cuda"),
                                logprobs=True)

    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo) -> None:
        self._model: Any = model
        self.info = info
        self._device = model.device
        self._logits_size = info.vocab_size
        # Ids past the tokenizer's vocabulary are padding rows of the embedding: never sample them.
        self._valid_vocab = min(len(tokenizer), info.vocab_size)
        self._tokens = HfTokenizer(tokenizer, name=info.name, bos_token_id=info.bos_token_id,
                                   vocab_size=self._valid_vocab)
        self._grammars = GrammarCompiler(tokenizer, eos_token_ids=info.eos_token_ids, vocab_size=self._logits_size)
        self.parallel = 1
        """Generations served at once (see loaders.base.concurrency_of)."""
        self._scheduler: BatchScheduler | None = None
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when every package in `packages` can be imported, else what to install."""
        missing = [name for name in cls.packages if importlib.util.find_spec(name) is None]
        if missing:
            return f"the {cls.name} loader needs {' and '.join(missing)}: {cls.install_hint}"
        return None

    # --- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, options: TransformersOptions) -> TransformersLoader:
        """Load the model folder at `path`.

        Raises BackendMissingError (torch, transformers or bitsandbytes missing),
        UnsupportedOptionError (8/4-bit without CUDA, an unknown dtype, both 8 and 4 bits),
        ModelLoadError (no config or weights, pickles without allow_pickle, a model that
        needs trust_remote_code, or any failure inside Transformers, with its message).
        """
        path = Path(path)
        if not isinstance(options.parallel, int) or options.parallel < 1:
            raise UnsupportedOptionError(f"parallel must be a whole number of at least 1, got {options.parallel!r}")
        use_safetensors = _check_folder(path, options)
        torch, transformers = _import_backend()
        check_remote_code(path, options.trust_remote_code)
        device, dtype = _resolve_device_and_dtype(torch, options)
        kwargs = _model_kwargs(transformers, options, device, dtype, use_safetensors)
        model, tokenizer = cls._open(
            path, kwargs, trust_remote_code=options.trust_remote_code,
            oom_hint="try load_in_4bit, a smaller model or --cpu", failure=f"Transformers could not load {path.name}",
        )
        quantization = "8-bit (bitsandbytes)" if options.load_in_8bit else None
        quantization = "4-bit NF4 (bitsandbytes)" if options.load_in_4bit else quantization
        return cls._ready(path, model, tokenizer, parallel=options.parallel,
                          metadata={"quantization": quantization, "trust_remote_code": options.trust_remote_code})

    @classmethod
    def _open(cls, path: Path, kwargs: dict[str, Any], *, trust_remote_code: bool, oom_hint: str,
              failure: str) -> tuple[Any, Any]:
        """(model, tokenizer) of the folder, the model built with `kwargs`; ModelLoadError
        with `oom_hint` when the GPU runs out of memory, or `failure` and Transformers' reason."""
        import torch
        from transformers import AutoModelForCausalLM

        try:
            tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, loader=cls.name)
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except WorkbenchError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelLoadError(f"out of GPU memory loading {path.name}: {oom_hint}") from exc
        except Exception as exc:
            raise ModelLoadError(f"{failure}: {type(exc).__name__}: {exc}") from exc
        return model, tokenizer

    @classmethod
    def _ready(cls, path: Path, model: Any, tokenizer: Any, *, parallel: int, metadata: dict[str, Any],
               max_context: int = 0) -> Self:
        """The loaded model of this class, in eval mode, batching when `parallel` > 1;
        `metadata` is laid over the Transformers facts, `max_context` (> 0) caps the context."""
        model.eval()
        info = _model_info(path, model, tokenizer, loader=cls.name, metadata=metadata)
        if max_context:
            info.context_length = min(info.context_length, max_context)
        loaded = cls(model, tokenizer, info)
        loaded._start_batching(parallel)
        return loaded

    def _start_batching(self, parallel: int) -> None:
        """Serve `parallel` generations at once through a BatchScheduler, when the model's
        cache can be batched; otherwise stay at one (logged, and said in the metadata)."""
        self.info.metadata["parallel"] = 1
        if parallel <= 1:
            return
        why = self._unbatchable_reason()
        if why is not None:
            log.warning("%s serves one request at a time: %s", self.info.name, why)
            self.info.metadata["parallel_note"] = why
            return
        self._scheduler = BatchScheduler(
            self._forward_rows, context=self.info.context_length, valid_vocab=self._valid_vocab,
            prefill_chunk=PREFILL_CHUNK, max_rows=parallel, name=self.info.name,
        )
        self.parallel = parallel
        self.info.metadata["parallel"] = parallel

    def _unbatchable_reason(self) -> str | None:
        """None when the model's KV cache is a plain DynamicCache (rows can be padded, joined
        and dropped), else why not (sliding-window, quantised or recurrent caches)."""
        import torch
        from transformers.cache_utils import DynamicCache, DynamicLayer

        model = self._require_model()
        if "position_ids" not in inspect.signature(model.forward).parameters:
            return "its forward() takes no position_ids"
        try:
            with torch.inference_mode():
                cache = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=self._device),
                              use_cache=True).past_key_values
        except (RuntimeError, TypeError, ValueError) as exc:
            return f"a trial forward pass failed ({type(exc).__name__}: {exc})"
        if not isinstance(cache, DynamicCache):
            return f"its KV cache is a {type(cache).__name__}, which cannot be batched here"
        odd = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
        if odd:
            return f"its KV cache has {', '.join(odd)} layers, which cannot be batched here"
        return None

    # --- generation --------------------------------------------------------------------
    def generate(
        self, prompt_ids: list[int], params: SamplingParams, stop_event: threading.Event
    ) -> Iterator[Step]:
        """Yield a Step per sampled token after evaluating `prompt_ids` (see LoadedModel.generate);
        with `params.logprobs` N > 0 each step carries its token's TokenLogprobs (top N).

        Stops when `stop_event` is set (checked before each step and between prompt
        chunks) or when prompt + reply fill the context. Raises InvalidRequestError for an
        empty prompt or ids outside the vocabulary, ContextLengthExceededError for a prompt
        longer than the context, GenerationError when the backend fails. With `parallel`
        > 1 the steps run in the batch scheduler's thread, shared with the other requests;
        the errors are the same, raised in the consuming thread.
        """
        if self._scheduler is not None:
            return self._generate_batched(prompt_ids, params, stop_event)
        return self._generate_alone(prompt_ids, params, stop_event)

    def _generate_alone(
        self, prompt_ids: list[int], params: SamplingParams, stop_event: threading.Event
    ) -> Iterator[Step]:
        """The one-request token loop, in the consuming thread."""
        import torch

        model = self._require_model()
        context = self.info.context_length
        self._check_prompt(prompt_ids)
        chain = self._new_chain(params)
        history = torch.zeros(context, dtype=torch.long, device=self._device)
        count = len(prompt_ids)
        history[:count] = torch.tensor(prompt_ids, dtype=torch.long)
        if count >= context:
            return
        logits, cache = self._prefill(model, history[:count], stop_event)
        want = params.logprobs
        while logits is not None and not stop_event.is_set():
            with torch.inference_mode():
                # The raw distribution, taken before the samplers touch the logits.
                raw = raw_logprobs(logits, self._valid_vocab) if want else None
                token = chain.sample(logits, history[:count])
                numbers = token_logprobs(raw, token, want) if raw is not None else None
            history[count] = token
            count += 1
            yield Step(token, numbers)
            if count >= context or stop_event.is_set() or chain.done:
                return
            logits, cache = self._forward(model, history[count - 1 : count], cache)

    def _generate_batched(
        self, prompt_ids: list[int], params: SamplingParams, stop_event: threading.Event
    ) -> Iterator[Step]:
        """The request as a row of the batch scheduler; its tokens are yielded here."""
        import torch

        scheduler = self._scheduler
        self._require_model()
        context = self.info.context_length
        self._check_prompt(prompt_ids)
        chain = self._new_chain(params)
        if len(prompt_ids) >= context or scheduler is None:
            return
        history = torch.zeros(context, dtype=torch.long, device=self._device)
        history[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
        request = BatchRequest(history, len(prompt_ids), chain, stop_event, logprobs=params.logprobs)
        with closing(scheduler.stream(request)) as steps:  # type: ignore[type-var]
            yield from steps

    def _prefill(
        self, model: Any, prompt: torch.Tensor, stop_event: threading.Event
    ) -> tuple[torch.Tensor | None, Any]:
        """Evaluate the prompt in chunks; (last logits, cache), or (None, None) if cancelled."""
        logits, cache = None, None
        for start in range(0, prompt.numel(), PREFILL_CHUNK):
            if stop_event.is_set():
                return None, None
            logits, cache = self._forward(model, prompt[start : start + PREFILL_CHUNK], cache)
        return logits, cache

    def _forward(self, model: Any, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """One forward pass over `ids` (1-D) after `cache`: (float32 logits of the last
        position on the sampling device, the grown cache)."""
        import torch

        with torch.inference_mode():
            logits, cache = self._forward_rows(ids.unsqueeze(0), cache, None, None, model)
        return logits[0], cache

    def _forward_rows(
        self, ids: torch.Tensor, cache: Any, mask: torch.Tensor | None, positions: torch.Tensor | None,
        model: Any = None,
    ) -> tuple[torch.Tensor, Any]:
        """The batch scheduler's forward pass: `ids` [rows, tokens] after `cache`, with the
        padding `mask` [rows, cached + tokens] and `positions` [rows, tokens] when batched;
        (float32 logits of each row's last position [rows, vocab], the grown cache)."""
        import torch

        model = model if model is not None else self._require_model()
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._has_logits_to_keep else {}
        if mask is not None:
            kwargs.update(attention_mask=mask, position_ids=positions)
        try:
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)
            logits = out.logits[:, -1].to(self._device, torch.float32)
        except torch.cuda.OutOfMemoryError as exc:
            hint = "shorten the prompt or lower parallel" if self.parallel > 1 else "shorten the prompt"
            raise GenerationError(f"out of GPU memory during generation: {hint}") from exc
        except RuntimeError as exc:
            raise GenerationError(f"the model failed during generation: {exc}") from exc
        return logits, out.past_key_values

    def _check_prompt(self, prompt_ids: Sequence[int]) -> None:
        check_prompt_ids(prompt_ids, self.info.context_length, self._logits_size)

    def _new_chain(self, params: SamplingParams) -> SamplerChain | ConstrainedChain:
        """The request's samplers; under `grammar_string`, wrapped in its grammar (compiled
        here, before the first token: a bad one is an InvalidRequestError)."""
        matcher = self._grammars.matcher(params.grammar_string, params.grammar_triggers) \
            if params.grammar_string else None
        chain = SamplerChain(
            params,
            vocab_size=self._logits_size,
            device=self._device,
            eos_token_ids=self.info.eos_token_ids,
            dry_breakers=self._dry_breakers(params),
            valid_vocab=self._valid_vocab,
        )
        return chain if matcher is None else ConstrainedChain(chain, matcher)

    def _dry_breakers(self, params: SamplingParams) -> list[tuple[int, ...]]:
        """DRY's breaker strings as token sequences (worked out once per distinct list)."""
        if params.dry_multiplier <= 0 or not params.dry_sequence_breakers:
            return []
        breakers = params.dry_sequence_breakers
        return self._tokens.dry_breakers(breakers, lambda encode, texts: dry_breaker_sequences(breakers, encode, texts))

    # --- lifecycle ---------------------------------------------------------------------
    def unload(self) -> None:
        """Stop the batch scheduler (open generations get ModelNotLoadedError), then drop the
        model and tokenizer and give their memory back now (GPU included)."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()
        on_cuda = self._model is not None and self._device.type == "cuda"
        self._model = None
        self._tokens.close()
        gc.collect()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    def _require_model(self) -> Any:
        if self._model is None:
            raise ModelNotLoadedError(f"{self.info.name} has been unloaded")
        return self._model


# --- load helpers ----------------------------------------------------------------------
def _import_backend() -> tuple[Any, Any]:
    """(torch, transformers), or BackendMissingError naming the install command."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        missing = exc.name or "torch/transformers"
        raise BackendMissingError(
            f"the transformers loader needs the '{missing}' package: {INSTALL_HINT}"
        ) from exc
    return torch, transformers


def _check_folder(path: Path, options: TransformersOptions) -> bool:
    """True when the folder has safetensors weights, False when only pickles (allowed)."""
    read_config(path, "a Transformers model folder")
    files = [p for p in path.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return True
    if any(p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin" for p in files):
        if not options.allow_pickle:
            raise ModelLoadError(
                f"{path.name} has only pickled .bin weights, which can run code when opened; "
                "load it with --allow-pickle if you trust it (they are read with weights_only=True), "
                "or convert it to safetensors"
            )
        return False
    raise ModelLoadError(f"{path.name} has a config.json but no .safetensors (or .bin) weights")


def _resolve_device_and_dtype(torch: Any, options: TransformersOptions) -> tuple[str, Any]:
    """("cuda" | "cpu", torch dtype) for these options; UnsupportedOptionError when impossible."""
    if options.dtype not in DTYPES:
        raise UnsupportedOptionError(f"dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.load_in_8bit and options.load_in_4bit:
        raise UnsupportedOptionError("choose one of load_in_8bit and load_in_4bit, not both")
    device = "cuda" if torch.cuda.is_available() and not options.cpu else "cpu"
    if (options.load_in_8bit or options.load_in_4bit) and device != "cuda":
        bits = 8 if options.load_in_8bit else 4
        why = "--cpu was given" if options.cpu else "no CUDA GPU is available"
        raise UnsupportedOptionError(
            f"load_in_{bits}bit needs a CUDA GPU (bitsandbytes) but {why}; "
            "turn it off, or use a GGUF quant with the llama.cpp loader on CPU"
        )
    if options.dtype != "auto":
        return device, getattr(torch, options.dtype)
    if device == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def _model_kwargs(
    transformers: Any, options: TransformersOptions, device: str, dtype: Any, use_safetensors: bool
) -> dict[str, Any]:
    """Keyword arguments for AutoModelForCausalLM.from_pretrained."""
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": options.trust_remote_code,
        "use_safetensors": use_safetensors,
        "weights_only": True,  # a pickle may only hold tensors, never code
        "local_files_only": True,
    }
    if device == "cuda":
        kwargs["device_map"] = "auto"  # accelerate spreads layers over the GPUs (and CPU if needed)
    if options.load_in_8bit or options.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise BackendMissingError("load_in_8bit/load_in_4bit need bitsandbytes: pip install bitsandbytes")
        if options.load_in_8bit:
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
        else:
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
            )
    return kwargs


def _model_info(path: Path, model: Any, tokenizer: Any, *, loader: str, metadata: dict[str, Any]) -> ModelInfo:
    """What the engine needs to know about the loaded model; `metadata` is laid over the facts."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = getattr(text_config, "vocab_size", None) or model.get_output_embeddings().weight.shape[0]
    trained = _trained_context(text_config, tokenizer)
    generation_config = getattr(model, "generation_config", None)
    return ModelInfo(
        name=path.name,
        path=path,
        loader=loader,
        # The whole trained context, asked for as such: the cap of the auto rule is there for
        # caches allocated up front, and Transformers' cache grows with use (nor can a longer
        # one be asked for here). Only a model that does not say gets the rule's fallback.
        context_length=auto_context(trained or 0, trained),
        vocab_size=int(vocab_size),
        **tokenizer_info(
            path, tokenizer, getattr(generation_config, "eos_token_id", None), getattr(text_config, "eos_token_id", None)
        ),
        metadata={
            "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
            "model_type": getattr(config, "model_type", None),
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(model.device),
            # Where accelerate put the layers (empty on CPU): the distinct devices, not every layer.
            "devices": sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}),
            "parameters": int(model.num_parameters()),
            "quantization": None,
            "trust_remote_code": False,
            **metadata,
        },
    )


def _trained_context(text_config: Any, tokenizer: Any) -> int | None:
    """max_position_embeddings, else the tokenizer's model_max_length when believable."""
    length = getattr(text_config, "max_position_embeddings", None)
    if isinstance(length, int) and length > 0:
        return length
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < _SANE_MODEL_MAX_LENGTH:
        return length
    return None
