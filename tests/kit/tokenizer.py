"""A byte-level BPE tokenizer trained in well under a second on the text in corpus.txt.

Byte-level BPE (GPT-2 style) is what llama.cpp calls a "gpt2" vocabulary, so the very same
vocabulary and merges can be written to GGUF and must tokenize identically there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS_PATH = Path(__file__).with_name("corpus.txt")

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Trained first so they take ids 0..3 and the vocabulary stays one contiguous id range,
# which GGUF requires (it stores tokens as a plain list indexed by id).
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START, IM_END)
VOCAB_SIZE_LIMIT = 4000

# ChatML with the bos token first. `message['content']` is assumed to be a string.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class VocabInfo:
    """What a GGUF writer needs to know about the tokenizer, in id order."""

    tokens: list[str]
    merges: list[str]
    special_ids: dict[str, int]

    @property
    def bos_id(self) -> int:
        return self.special_ids[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self.special_ids[EOS_TOKEN]

    @property
    def im_end_id(self) -> int:
        return self.special_ids[IM_END]


def train_tokenizer(corpus: Path = CORPUS_PATH) -> Any:
    """Train the BPE on `corpus` and return a `tokenizers.Tokenizer` that adds bos like Llama.

    The TemplateProcessing post-processor makes `tokenizer(text)` start with `<s>`, the
    same as llama.cpp's `add_bos_token = true`, so both sides can be compared id for id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE_LIMIT,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any UTF-8 text (unseen scripts too) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus)], trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def vocab_info(tokenizer: Any) -> VocabInfo:
    """Tokens by id, merges as "a b" strings (GGUF's form) and the special token ids."""
    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    tokens = [""] * len(vocab)
    for text, index in vocab.items():
        tokens[index] = text
    if "" in tokens:
        raise RuntimeError("the trained vocabulary has holes in its id range")
    # tokenizers >= 0.20 stores merges as pairs, older ones as "a b" strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    special_ids = {text: vocab[text] for text in SPECIAL_TOKENS}
    return VocabInfo(tokens=tokens, merges=merges, special_ids=special_ids)


def save_hf_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and special_tokens_map.json.

    transformers 5 keeps the chat template only in chat_template.jinja; it is copied into
    tokenizer_config.json as well so tools that read only that file (older transformers,
    our own metadata readers) find it too.
    """
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = CHAT_TEMPLATE
    config["add_bos_token"] = True
    config["add_eos_token"] = False
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
                   "additional_special_tokens": [IM_START, IM_END]}
    special_text = json.dumps(special_map, indent=2) + "\n"
    (folder / "special_tokens_map.json").write_text(special_text, encoding="utf-8")
