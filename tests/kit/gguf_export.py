"""Write a Llama model to GGUF with gguf.GGUFWriter, the way llama.cpp's converter lays it out.

We do not call llama.cpp's convert_hf_to_gguf.py: it refuses BPE tokenizers whose
pre-tokenizer hash it does not know, and ours is trained here. Writing the file ourselves
needs two details the converter normally takes care of:
  * q/k projection rows are permuted from the HF rotary layout (first half / second half
    of each head) to GGML's interleaved pairs (`permute_qk`, a copy of LlamaModel.permute);
  * tensors are written one at a time after the header, so a 0.5B benchmark model never
    has to sit in memory all at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.kit.tokenizer import CHAT_TEMPLATE, VocabInfo

# Our quant names -> (GGML tensor type, llama.cpp file type) are looked up lazily in
# `_quant_types` so importing this module does not import gguf.
QUANT_NAMES = ("f32", "f16", "q8_0", "q4_0", "q4_k")


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters that decide a Llama's tensor shapes (HF LlamaConfig names in comments)."""

    vocab_size: int
    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    ffn: int  # intermediate_size
    context: int = 2048  # max_position_embeddings
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF rotary row order -> GGML's, exactly as convert_hf_to_gguf.py's LlamaModel.permute.

    HF rotates dimension i with i + head_dim/2; GGML rotates neighbours 2i and 2i+1. For k
    (GQA) the reshape is by the number of kv heads.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def tensor_plan(shape: LlamaShape) -> list[tuple[str, str, tuple[int, ...]]]:
    """(GGUF name, HF name, numpy shape) of every tensor, in the converter's order."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    plan = [("token_embd.weight", "model.embed_tokens.weight", (shape.vocab_size, h))]
    for i in range(shape.layers):
        blk, hf = f"blk.{i}", f"model.layers.{i}"
        plan += [
            (f"{blk}.attn_norm.weight", f"{hf}.input_layernorm.weight", (h,)),
            (f"{blk}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", (h, h)),
            (f"{blk}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", (kv, h)),
            (f"{blk}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", (kv, h)),
            (f"{blk}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", (h, h)),
            (f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", (h,)),
            (f"{blk}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", (shape.ffn, h)),
            (f"{blk}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", (shape.ffn, h)),
            (f"{blk}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", (h, shape.ffn)),
        ]
    plan += [("output_norm.weight", "model.norm.weight", (h,)),
             ("output.weight", "lm_head.weight", (shape.vocab_size, h))]
    return plan


def hf_to_gguf_tensor(gguf_name: str, data: np.ndarray, shape: LlamaShape) -> np.ndarray:
    """Apply the q/k permutation to an HF tensor; everything else passes through unchanged."""
    if gguf_name.endswith("attn_q.weight"):
        return permute_qk(data, shape.heads, shape.heads)
    if gguf_name.endswith("attn_k.weight"):
        return permute_qk(data, shape.heads, shape.kv_heads)
    return data


def _quant_types(quant: str) -> tuple[object, object]:
    """(GGMLQuantizationType, LlamaFileType) for one of QUANT_NAMES."""
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    table = {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
             "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0), "q4_k": (Q.Q4_K, F.MOSTLY_Q4_K_M)}
    if quant not in table:
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_NAMES)}")
    return table[quant]


def quant_supported(quant: str) -> bool:
    """Whether gguf's Python quantizer can produce `quant` (gguf 0.19 cannot do any K-quant)."""
    from gguf.quants import quantize

    qtype, _ = _quant_types(quant)
    try:
        quantize(np.zeros((1, 256), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def _encoded_info(np_shape: tuple[int, ...], qtype: object) -> tuple[tuple[int, ...], np.dtype, int]:
    """(stored shape, stored dtype, nbytes) of a tensor once encoded as `qtype`."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    count = int(np.prod(np_shape))
    if qtype == Q.F32:
        return np_shape, np.dtype(np.float32), count * 4
    if qtype == Q.F16:
        return np_shape, np.dtype(np.float16), count * 2
    byte_shape = quant_shape_to_byte_shape(np_shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _add_metadata(writer: object, shape: LlamaShape, vocab: VocabInfo, file_type: object, name: str) -> None:
    """Hyper-parameters and tokenizer keys, the ones convert_hf_to_gguf.py writes for a gpt2-BPE Llama."""
    from gguf import GGML_QUANT_VERSION, TokenType

    w = writer
    w.add_name(name)
    w.add_vocab_size(shape.vocab_size)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_file_type(int(file_type))
    w.add_quantization_version(GGML_QUANT_VERSION)
    # "gpt2" = byte-level BPE; "gpt-2" selects GPT-2's split regex, the same one the
    # tokenizers ByteLevel pre-tokenizer uses, so both libraries split text alike.
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    special = set(vocab.special_ids.values())
    w.add_token_list(vocab.tokens)
    w.add_token_types([int(TokenType.CONTROL if i in special else TokenType.NORMAL)
                       for i in range(len(vocab.tokens))])
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_eot_token_id(vocab.im_end_id)
    w.add_pad_token_id(vocab.eos_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def write_llama_gguf(path: Path, shape: LlamaShape, vocab: VocabInfo, quant: str,
                     tensor_source: Callable[[str, str, tuple[int, ...]], np.ndarray], name: str) -> Path:
    """Write a Llama GGUF, asking `tensor_source(gguf_name, hf_name, shape)` for each f32 tensor.

    `tensor_source` returns data already in GGML layout (see `hf_to_gguf_tensor`). 2-D
    weights are stored as `quant`, 1-D norm weights stay f32 (as llama.cpp's converter and
    quantizer do). Tensors are encoded and written one by one to keep memory flat.
    """
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.quants import quantize

    qtype, file_type = _quant_types(quant)
    if not quant_supported(quant):
        raise NotImplementedError(f"gguf's Python quantizer cannot write {quant}; use q8_0, q4_0, f16 or f32")
    plan = [(g, hf, s, Q.F32 if len(s) == 1 else qtype) for g, hf, s in tensor_plan(shape)]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "llama")
    _add_metadata(writer, shape, vocab, file_type, name)
    for gguf_name, _, np_shape, ttype in plan:
        stored_shape, dtype, nbytes = _encoded_info(np_shape, ttype)
        raw_dtype = None if ttype in (Q.F32, Q.F16) else ttype  # float types are inferred from dtype
        writer.add_tensor_info(gguf_name, stored_shape, dtype, nbytes, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gguf_name, hf_name, np_shape, ttype in plan:
        data = np.ascontiguousarray(tensor_source(gguf_name, hf_name, np_shape), dtype=np.float32)
        if data.shape != np_shape:
            raise ValueError(f"{gguf_name}: expected shape {np_shape}, got {data.shape}")
        writer.write_tensor_data(np.ascontiguousarray(quantize(data, ttype)))
    writer.close()
    return path

