"""The llama.cpp loader: GGUF models through llama-cpp-python.

Loading goes through `llama_cpp.Llama` (it owns the model and the tokenizer); generation
bypasses `Llama.generate` and drives the low-level API directly: a context with one
sequence per slot (`--parallel N`), a per-request sampler chain built in C
(`loaders/llama_cpp_sampler.py`), and one decode loop that batches every running request
into each `llama_decode` (`loaders/llama_cpp_slots.py`), reusing and shifting each slot's
KV cache for the next request (`loaders/kv_reuse.py`).

`llama_cpp` is imported inside `load()` only: the app starts without it, and a missing
backend is a BackendMissingError naming the install command.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from loaders import gguf_main_file, register_loader
from loaders.base import Capabilities, LoaderBase, ModelInfo, Step, auto_context
from loaders.llama_cpp_sampler import ChainContext, LlamaChain, build_sampler_chain, never_utf8_tokens
from loaders.llama_cpp_slots import SlotEngine, context_params_for_slots
from modules.core import gguf_header
from modules.core.errors import (
    BackendMissingError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotLoadedError,
)
from modules.core.loader_options import LlamaCppOptions
from modules.core.sampling import SAMPLER_NAMES, SamplingParams

#: The context Llama itself is built with; generation never uses it.
SMALL_CONTEXT = 256
#: Slots one context may hold (llama.cpp's LLAMA_MAX_SEQ is 256; past this the KV cache
#: of even a small model runs to many GB).
MAX_PARALLEL = 64
#: GGML type ids of the KV cache types a user can choose.
CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}
#: llama.cpp's `general.file_type` values (enum llama_ftype) for the common quants.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}


@register_loader
class LlamaCppLoader(LoaderBase):
    """A GGUF model loaded with llama.cpp; one instance per loaded model.

    Serves `parallel` generations at once: `generate()` may be called from that many
    threads, each consuming its own iterator (more wait for a free slot). `encode` and
    `decode` may be called from any thread at any time.
    """

    name = "llama.cpp"
    package = "llama_cpp"
    install_hint = "run start_linux.sh again, or: bash scripts/install_llama_cpp.sh PYTHON cpu|cuda"
    options_class = LlamaCppOptions
    capabilities = Capabilities(samplers=frozenset(SAMPLER_NAMES), grammar=True, devices=("cpu", "cuda", "metal"),
                                logprobs=True)

    def __init__(self, lib: Any, llm: Any, info: ModelInfo, eog_ids: tuple[int, ...], engine: SlotEngine) -> None:
        self.info = info
        self._lib = lib
        self._llm: Any = llm
        self._vocab = lib.llama_model_get_vocab(llm.model)
        self._chain_context = ChainContext(self._vocab, info.vocab_size, info.context_length, eog_ids)
        self._never_utf8_known = False
        self._engine: SlotEngine | None = engine
        self.parallel = engine.n_slots
        # Guards the vocabulary and the engine's lifetime: tokenizer calls (allowed during
        # a generation), new generations and unload() never overlap.
        self._vocab_lock = threading.Lock()
        self._pieces: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})
        """Each token's text, without and with special tokens rendered (see decode)."""

    @property
    def last_reused_tokens(self) -> int:
        """Prompt tokens the last admitted request found already in its slot's KV cache."""
        return self._engine.last.reused_tokens if self._engine else 0

    @property
    def last_shifted_tokens(self) -> int:
        """Of those, the tokens that were moved down by a context shift."""
        return self._engine.last.shifted_tokens if self._engine else 0

    # --- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, options: LlamaCppOptions) -> LlamaCppLoader:
        """Load `path` (a .gguf file, or a folder holding one) with `options`.

        Raises BackendMissingError when llama-cpp-python is not installed, ModelLoadError
        for a file that is not GGUF or that llama.cpp refuses (the app keeps serving).
        """
        lib = _import_backend(cls)
        gguf_path = gguf_main_file(path)
        header = read_gguf_metadata(gguf_path)
        kwargs = llama_kwargs(gguf_path, options, header)
        n_ctx, n_batch = kwargs["n_ctx"], kwargs["n_batch"]
        with _captured_llama_log(lib) as log:
            try:
                # Llama's own context only validates the settings: the slots get their own below.
                llm = lib.Llama(**{**kwargs, "n_ctx": min(n_ctx, SMALL_CONTEXT), "n_batch": min(n_batch, SMALL_CONTEXT)})
            except Exception as exc:  # llama.cpp reports every failure as some exception
                raise ModelLoadError(_load_failure_message(gguf_path, exc, log)) from exc
            try:
                n_ctx_slot = _use_slot_context(lib, llm, options.parallel, n_ctx, n_batch,
                                               _flash_attn_type(lib, kwargs["flash_attn"], options.no_flash_attn))
            except Exception as exc:
                llm.close()
                raise ModelLoadError(_load_failure_message(gguf_path, exc, log)) from exc
        try:
            eog_ids = _eog_tokens(lib, llm)
            info = _model_info(lib, llm, path, gguf_path, header, kwargs, eog_ids, min(n_ctx, n_ctx_slot))
            engine = SlotEngine(lib, llm.ctx, n_slots=options.parallel, n_ctx_slot=info.context_length,
                                n_batch=n_batch, n_vocab=info.vocab_size, eog_ids=eog_ids,
                                context_shift=not options.no_context_shift)
        except Exception as exc:
            llm.close()
            raise ModelLoadError(f"{gguf_path.name} loaded but cannot be inspected: {exc}") from exc
        return cls(lib, llm, info, eog_ids, engine)

    # --- tokenizer -------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special-token text such as `<|im_end|>` becomes that token.

        BOS is added only when asked and the model wants one, and never twice: a prompt
        rendered from a chat template usually starts with the BOS text already, and is then
        tokenized without adding one (adding it and dropping the copy afterwards would make
        llama.cpp warn about "2 BOS tokens" on every chat message).
        """
        bos_text = self.info.bos_token
        if add_bos and bos_text and text.startswith(bos_text):
            add_bos = False
        with self._vocab_lock:
            llm = self._require_loaded()
            ids: list[int] = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        bos = self.info.bos_token_id
        if add_bos and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            del ids[0]  # defence: a start that tokenized to BOS without being its text
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`: the tokens' pieces joined; incomplete UTF-8 comes back as U+FFFD.

        Pieces, as llama-server streams them, not llama_detokenize: for vocabularies whose
        `clean_spaces` is set (GPT-2-style BPE) that one drops the space before punctuation
        (" ," -> ","), so the text of a window and of that window plus one token disagree and
        the streamed deltas lost characters (a grammar's "," vanished from JSON output). Each
        piece is read once per model (llama_token_to_piece, sized on demand, so long tokens
        are never truncated) and cached.
        """
        n_vocab = self.info.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= n_vocab):
            bad = next(t for t in ids if not 0 <= t < n_vocab)
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary (0-{n_vocab - 1})", "tokens")
        cache = self._pieces[0 if skip_special else 1]
        missing = {t for t in ids if t not in cache}
        if missing:
            with self._vocab_lock:
                self._require_loaded()
                for token in missing:
                    cache[token] = self._piece(token, not skip_special)
        return b"".join([cache[t] for t in ids]).decode("utf-8", errors="replace")

    def _piece(self, token: int, special: bool) -> bytes:
        lib = self._lib
        size = 32
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = lib.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n + 1  # a negative result is the size it needs
        raise GenerationError(f"llama.cpp could not read token {token}'s text")

    # --- generation ------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams, stop_event: threading.Event) -> Iterator[Step]:
        """Yield a Step per sampled token after evaluating `prompt_ids` (see LoadedModel.generate).

        The request goes to the free slot whose KV cache keeps most of the prompt (the next
        chat turn evaluates only its new tokens; a chat cut to fit is shifted, not rebuilt)
        and is decoded in one batch with every other running request. Raises
        InvalidRequestError for a bad grammar, ContextLengthExceededError for a prompt
        longer than the context, GenerationError when llama.cpp fails to decode.
        """
        with self._vocab_lock:
            engine = self._engine
            if engine is None:
                raise ModelNotLoadedError(f"{self.info.name} has been unloaded")
            chain = self._new_chain(params, prompt_ids)
        yield from engine.generate(prompt_ids, chain, stop_event, params.max_new_tokens, params.logprobs)

    def _new_chain(self, params: SamplingParams, prompt_ids: Sequence[int]) -> LlamaChain:
        if params.grammar_string and not self._never_utf8_known:
            # Once, on the first grammar: a walk over the vocabulary (~5 us a token).
            ids = never_utf8_tokens(self._lib, self._vocab, self.info.vocab_size)
            self._chain_context = dataclasses.replace(self._chain_context, never_utf8_ids=ids)
            self._never_utf8_known = True
        try:
            return build_sampler_chain(self._lib, self._chain_context, params, prompt_ids)
        except InvalidRequestError as exc:
            if exc.param != "grammar_string":
                raise
            detail = _grammar_error_detail(self._lib, self._vocab, params.grammar_string)
            if not detail:
                raise
            raise InvalidRequestError(f"{exc}: {detail}", exc.param) from None

    # --- lifecycle -------------------------------------------------------------------------
    def unload(self) -> None:
        """Free the model and its context now; later calls raise ModelNotLoadedError."""
        with self._vocab_lock:
            engine, self._engine = self._engine, None
            llm, self._llm = self._llm, None
        if engine is not None:
            engine.close()  # a suspended generator returns instead of touching freed memory
        if llm is not None:
            llm.close()

    def _require_loaded(self) -> Any:
        llm = self._llm
        if llm is None:
            raise ModelNotLoadedError(f"{self.info.name} has been unloaded")
        return llm


def _flash_attn_type(lib: Any, forced: bool, refused: bool) -> int:
    if forced:
        return lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
    return lib.LLAMA_FLASH_ATTN_TYPE_DISABLED if refused else lib.LLAMA_FLASH_ATTN_TYPE_AUTO


def _use_slot_context(lib: Any, llm: Any, n_slots: int, n_ctx: int, n_batch: int, flash_attn_type: int) -> int:
    """Give `llm` a context with `n_slots` sequences of `n_ctx` tokens each; the tokens one
    sequence really holds (llama.cpp pads it to a multiple of 256)."""
    from llama_cpp._internals import LlamaContext

    params = context_params_for_slots(lib, llm.context_params, n_slots=n_slots, n_ctx_slot=n_ctx, n_batch=n_batch)
    params.flash_attn_type = flash_attn_type
    ctx = LlamaContext(model=llm._model, params=params, verbose=False)
    llm._ctx.close()
    llm._ctx, llm.context_params = ctx, params
    return int(lib.llama_n_ctx_seq(ctx.ctx))


# --- load helpers ----------------------------------------------------------------------------
def _import_backend(loader: type[LoaderBase]) -> Any:
    reason = loader.unavailable_reason()
    if reason:
        raise BackendMissingError(reason)
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # OSError: the shared library itself failed to load
        raise BackendMissingError(
            f"llama-cpp-python is installed but cannot be imported ({exc}): {loader.install_hint}"
        ) from exc
    return llama_cpp


def llama_kwargs(gguf_path: Path, options: LlamaCppOptions, header: dict[str, Any]) -> dict[str, Any]:
    """The `llama_cpp.Llama(...)` arguments for `options`; ModelLoadError for bad values."""
    if options.cache_type not in CACHE_TYPES:
        raise ModelLoadError(f"cache_type must be one of {', '.join(CACHE_TYPES)}, got {options.cache_type!r}")
    for name in ("ctx_size", "threads", "threads_batch"):
        if getattr(options, name) < 0:
            raise ModelLoadError(f"{name} must be 0 (automatic) or more, got {getattr(options, name)}")
    if options.batch_size < 1:
        raise ModelLoadError(f"batch_size must be at least 1, got {options.batch_size}")
    if not 1 <= options.parallel <= MAX_PARALLEL:
        raise ModelLoadError(f"parallel must be between 1 and {MAX_PARALLEL}, got {options.parallel}")
    if options.no_flash_attn and (options.flash_attn or options.cache_type in ("q8_0", "q4_0")):
        raise ModelLoadError("no_flash_attn conflicts with flash_attn and with a quantised KV cache (which needs it)")
    threads = options.threads or physical_cores()
    cache = CACHE_TYPES[options.cache_type]
    kwargs: dict[str, Any] = dict(
        model_path=str(gguf_path),
        n_gpu_layers=options.n_gpu_layers,
        n_ctx=auto_context(options.ctx_size, trained_context(header)),
        n_threads=threads,
        n_threads_batch=options.threads_batch or threads,
        n_batch=options.batch_size,
        # llama.cpp refuses a quantised V cache without flash attention: turn it on.
        flash_attn=options.flash_attn or options.cache_type in ("q8_0", "q4_0"),
        type_k=cache,
        type_v=cache,
        tensor_split=_parse_tensor_split(options.tensor_split),
        use_mmap=not options.no_mmap,
        use_mlock=options.mlock,
        verbose=False,
    )
    if options.rope_freq_base:
        kwargs["rope_freq_base"] = options.rope_freq_base
    if options.rope_freq_scale:
        kwargs["rope_freq_scale"] = options.rope_freq_scale
    return kwargs


def _parse_tensor_split(text: str) -> list[float] | None:
    if not text.strip():
        return None
    try:
        parts = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ModelLoadError(f'tensor_split must be comma-separated numbers such as "3,1", got {text!r}') from None
    if not parts or any(p < 0 for p in parts):
        raise ModelLoadError(f"tensor_split must hold non-negative proportions, got {text!r}")
    return parts


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads slow llama.cpp down)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        physical = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                physical = value.strip()
            elif key.strip() == "core id":
                cores.add((physical, value.strip()))
    except OSError:
        pass
    if cores:
        return max(1, min(len(cores), usable))
    return max(1, usable // 2)


def trained_context(header: dict[str, Any]) -> int | None:
    """`{architecture}.context_length` from the GGUF header, when present."""
    value = header.get(f"{header.get('general.architecture', '')}.context_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def _eog_tokens(lib: Any, llm: Any) -> tuple[int, ...]:
    """Every end-of-generation token (EOS, EOT, <|im_end|>...), EOS first."""
    vocab = lib.llama_model_get_vocab(llm.model)
    is_eog = lib.llama_vocab_is_eog
    found = [t for t in range(llm.n_vocab()) if is_eog(vocab, t)]
    eos = llm.token_eos()
    if eos in found:
        found.remove(eos)
        found.insert(0, eos)
    return tuple(found)


def _model_info(
    lib: Any, llm: Any, path: Path, gguf_path: Path, header: dict[str, Any],
    kwargs: dict[str, Any], eog_ids: tuple[int, ...], context_length: int,
) -> ModelInfo:
    vocab = lib.llama_model_get_vocab(llm.model)

    def text(token: int) -> str | None:
        if token < 0:
            return None
        return lib.llama_vocab_get_text(vocab, token).decode("utf-8", errors="replace")

    bos, eos = llm.token_bos(), llm.token_eos()
    specials = {
        "bos_token": bos, "eos_token": eos,
        "eot_token": lib.llama_vocab_eot(vocab), "pad_token": lib.llama_vocab_pad(vocab),
    }
    desc = ctypes.create_string_buffer(256)
    lib.llama_model_desc(llm.model, desc, len(desc))
    file_type = header.get("general.file_type")
    template = header.get("tokenizer.chat_template") or llm.metadata.get("tokenizer.chat_template")
    return ModelInfo(
        name=path.name,
        path=path,
        loader=LlamaCppLoader.name,
        context_length=context_length,
        vocab_size=llm.n_vocab(),
        bos_token_id=bos if bos >= 0 else None,
        eos_token_ids=eog_ids,
        bos_token=text(bos),
        eos_token=text(eos),
        chat_template=template if isinstance(template, str) and template else None,
        special_tokens={k: t for k, v in specials.items() if (t := text(v)) is not None},
        metadata={
            "architecture": header.get("general.architecture", llm.metadata.get("general.architecture")),
            "file_type": FILE_TYPES.get(file_type, file_type) if isinstance(file_type, int) else file_type,
            "description": desc.value.decode("utf-8", errors="replace"),
            "parameters": lib.llama_model_n_params(llm.model),
            "size_bytes": lib.llama_model_size(llm.model),
            "gguf_file": gguf_path.name,
            "trained_context": trained_context(header),
            **{k: kwargs[k] for k in ("n_gpu_layers", "n_threads", "n_threads_batch", "n_batch")},
            "flash_attn": {1: True, 0: False}.get(llm.context_params.flash_attn_type, "auto"),
            "parallel": llm.context_params.n_seq_max,
            "cache_type": next(name for name, t in CACHE_TYPES.items() if t == kwargs["type_k"]),
            "mmap": kwargs["use_mmap"],
            "mlock": kwargs["use_mlock"],
        },
    )


# --- llama.cpp's log -------------------------------------------------------------------------
_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5  # enum ggml_log_level


@contextlib.contextmanager
def _captured_llama_log(lib: Any) -> Iterator[list[tuple[int, str]]]:
    """Collect llama.cpp's warnings and errors while the block runs, as (level, text).

    llama.cpp only logs why a load failed; the exception just says "failed". The callback
    is process-wide, so the previous one (llama-cpp-python's) is put back afterwards.
    """
    lines: list[tuple[int, str]] = []
    try:
        from llama_cpp._logger import llama_log_callback as previous
    except ImportError:  # a future llama-cpp-python moved it: do without the detail
        yield lines
        return

    @lib.llama_log_callback
    def capture(level: int, text: bytes, user_data: Any) -> None:
        if level == _LOG_CONT and lines:
            level = lines[-1][0]
            lines[-1] = (level, lines[-1][1] + text.decode("utf-8", errors="replace"))
        elif level in (_LOG_WARN, _LOG_ERROR):
            lines.append((level, text.decode("utf-8", errors="replace")))
        previous(level, text, user_data)

    lib.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        lib.llama_log_set(previous, ctypes.c_void_p(0))


def _first_error_line(lines: list[tuple[int, str]]) -> str:
    """The first error llama.cpp logged (the cause; later ones say "failed"), else its first warning."""
    errors = [text for level, text in lines if level == _LOG_ERROR] or [text for _, text in lines]
    text = errors[0].strip() if errors else ""
    line = text.splitlines()[0].strip() if text else ""
    head, sep, rest = line.partition(": ")
    return rest if sep and head.isidentifier() else line


def _grammar_error_detail(lib: Any, vocab: Any, grammar: str) -> str:
    """Why llama.cpp rejects `grammar`.

    Its GBNF parser writes the reason with fprintf(stderr) and the later checks use the
    log, so the failed parse is repeated with both captured: the log callback, and file
    descriptor 2 sent to a temporary file for that instant.
    """
    with _captured_llama_log(lib) as log, tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            sampler = lib.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
            if sampler:
                lib.llama_sampler_free(sampler)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        printed = capture.read().decode("utf-8", errors="replace")
    for line in printed.splitlines():
        if "error parsing grammar:" in line:
            return line.split("error parsing grammar:", 1)[1].strip()
    return _first_error_line(log)


def _load_failure_message(gguf_path: Path, exc: Exception, log: list[tuple[int, str]]) -> str:
    detail = _first_error_line(log) or str(exc) or type(exc).__name__
    return f"llama.cpp could not load {gguf_path.name}: {detail}"


# --- GGUF header -----------------------------------------------------------------------------
def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value header of a GGUF file: scalars and strings (arrays are skipped).

    Cheap (memory-mapped, tensors never read) and strict: a file that is not GGUF, or whose
    header is damaged, cut short or over a budget, raises ModelLoadError before llama.cpp
    ever sees it (see modules.core.gguf_header.read_header).
    """
    return gguf_header.read_header(path)
