"""loaders/hf_folder.py: the Hugging Face folder logic the Transformers, GPTQ and ExLlamaV2
loaders share (config.json, remote code, EOS ids, chat template, the locked tokenizer, DRY
breakers), on tmp_path folders, a scripted tokenizer and the kit's real one."""

from __future__ import annotations

import ast
import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from loaders.hf_folder import (
    BREAKER_CACHE_SIZE,
    HfTokenizer,
    chat_template,
    check_remote_code,
    eos_token_ids,
    load_tokenizer,
    merge_token_ids,
    read_config,
    tokenizer_info,
    vocab_texts,
)
from modules.core.errors import BackendMissingError, ModelLoadError, ModelNotLoadedError
from tests.kit import TinyKit

LOADERS = Path(__file__).resolve().parent.parent / "loaders"


# --- config.json ------------------------------------------------------------------------------
def test_read_config_returns_the_object_or_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is not a model folder"):
        read_config(tmp_path / "missing", "a GPTQ model folder")
    with pytest.raises(ModelLoadError, match="has no config.json: not a GPTQ model folder"):
        read_config(tmp_path, "a GPTQ model folder")
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="config.json cannot be read"):
        read_config(tmp_path, "x")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="does not hold a JSON object"):
        read_config(tmp_path, "x")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert read_config(tmp_path, "x") == {"model_type": "llama"}


def test_remote_code_is_refused_unless_trusted(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    config = {"model_type": "my_own_arch", "auto_map": {"AutoModelForCausalLM": "modeling.MyModel"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'my_own_arch' model.*trust_remote_code"):
        check_remote_code(tmp_path, trust_remote_code=False)
    check_remote_code(tmp_path, trust_remote_code=True)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    check_remote_code(tmp_path, trust_remote_code=False)  # known to Transformers: its own code runs


# --- EOS ids and the chat template ------------------------------------------------------------
def test_merge_token_ids_keeps_order_and_drops_duplicates_and_junk() -> None:
    assert merge_token_ids([7, 2], 2, None, (9, 7), True, -1, "3", 0) == (7, 2, 9, 0)
    assert merge_token_ids() == ()


def test_eos_ids_from_generation_config_config_and_more(tmp_path: Path) -> None:
    assert eos_token_ids(tmp_path, 2, 9) == (2, 9)  # no files: only what the caller knows
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    assert eos_token_ids(tmp_path, 2, 9) == (7, 2, 9)
    (tmp_path / "generation_config.json").write_text("not json")
    assert eos_token_ids(tmp_path, 9) == (2, 9)  # an unreadable optional file is skipped


def test_chat_template_from_the_tokenizer_the_jinja_file_or_tokenizer_config(tmp_path: Path) -> None:
    assert chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert chat_template(tmp_path) == "J"
    assert chat_template(tmp_path, tokenizer_template="HF") == "HF"
    assert chat_template(tmp_path, tokenizer_template={"rag": "R", "default": "HD"}) == "HD"
    assert chat_template(tmp_path, tokenizer_template="  ") == "J"  # blank: not a template


def test_tokenizer_info_gives_model_info_its_token_fields(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    tokenizer = SimpleNamespace(bos_token_id=1, eos_token_id=2, bos_token="<s>", eos_token="</s>",
                                chat_template="{{ x }}", special_tokens_map={"eos_token": "</s>"})
    assert tokenizer_info(tmp_path, tokenizer, 6, None) == {
        "bos_token_id": 1, "eos_token_ids": (5, 6, 2), "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{{ x }}", "special_tokens": {"eos_token": "</s>"},
    }


# --- the shared tokenizer ---------------------------------------------------------------------
class ScriptedTokenizer:
    """A Hugging Face tokenizer's calls, one character per token (ord), that fails as a fast
    tokenizer does when two threads use it at once ("Already borrowed")."""

    def __init__(self, vocab: int = 128) -> None:
        self.vocab = vocab
        self.busy = False
        self.calls = 0

    def _enter(self) -> None:
        if self.busy:
            raise RuntimeError("Already borrowed")
        self.busy = True
        self.calls += 1
        time.sleep(0.0005)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        self._enter()
        self.busy = False
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool, clean_up_tokenization_spaces: bool) -> str:
        assert clean_up_tokenization_spaces is False
        self._enter()
        self.busy = False
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 1))

    def batch_decode(self, batch: list[list[int]], clean_up_tokenization_spaces: bool) -> list[str]:
        return ["".join(chr(i) for i in ids) for ids in batch]


def test_encode_adds_bos_once_and_decode_skips_specials() -> None:
    tokens = HfTokenizer(ScriptedTokenizer(), name="m", bos_token_id=1, vocab_size=128)
    assert tokens.encode("ab") == [1, 97, 98]
    assert tokens.encode("\x01ab") == [1, 97, 98]  # already there: not doubled
    assert tokens.encode("ab", add_bos=False) == [97, 98]
    assert tokens.decode([1, 97, 98]) == "ab" and tokens.decode([1, 97], skip_special=False) == "\x01a"
    assert HfTokenizer(ScriptedTokenizer(), name="m", bos_token_id=None, vocab_size=128).encode("a") == [97]


def test_concurrent_calls_never_overlap_on_the_tokenizer() -> None:
    raw = ScriptedTokenizer()
    tokens = HfTokenizer(raw, name="m", bos_token_id=None, vocab_size=128)
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(40):
                assert tokens.decode(tokens.encode("hello")) == "hello"
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures and raw.calls == 4 * 40 * 2


def test_dry_breakers_are_built_once_per_list_with_the_vocabulary_texts() -> None:
    tokens = HfTokenizer(ScriptedTokenizer(), name="m", bos_token_id=None, vocab_size=16)
    seen: list[tuple[list[int], int]] = []

    def build(encode: Any, texts: list[str]) -> set[int]:
        seen.append((encode("\n"), len(texts)))
        return {tid for tid, text in enumerate(texts) if "\n" in text}

    assert tokens.dry_breakers(["\n"], build) == {10}
    assert tokens.dry_breakers(("\n",), build) == {10}  # the same list: cached
    assert seen == [([10], 16)]
    for n in range(BREAKER_CACHE_SIZE + 1):  # a bounded cache: cleared when full
        tokens.dry_breakers([str(n)], build)
    assert len(tokens._breakers) <= BREAKER_CACHE_SIZE


def test_close_makes_every_call_name_the_unloaded_model() -> None:
    tokens = HfTokenizer(ScriptedTokenizer(), name="tiny", bos_token_id=1, vocab_size=16)
    tokens.close()
    for call in (lambda: tokens.encode("a"), lambda: tokens.decode([97]),
                 lambda: tokens.dry_breakers(["\n"], lambda encode, texts: set())):
        with pytest.raises(ModelNotLoadedError, match="tiny has been unloaded"):
            call()


def test_vocab_texts_fall_back_to_batch_decode() -> None:
    assert vocab_texts(ScriptedTokenizer(), 3) == ["\x00", "\x01", "\x02"]


def test_the_kits_tokenizer_loads_offline_with_its_facts(request: pytest.FixtureRequest) -> None:
    pytest.importorskip("transformers")
    tiny_kit: TinyKit = request.getfixturevalue("tiny_kit")  # built only where transformers is
    tokenizer = load_tokenizer(tiny_kit.hf_dir)
    info = tokenizer_info(tiny_kit.hf_dir, tokenizer)
    tokens = HfTokenizer(tokenizer, name="kit", bos_token_id=info["bos_token_id"], vocab_size=len(tokenizer))
    ids = tokens.encode("<|im_start|>user\nhi<|im_end|>", add_bos=False)
    assert ids[-1] in info["eos_token_ids"] and info["chat_template"]
    assert tokens.decode(ids, skip_special=False) == "<|im_start|>user\nhi<|im_end|>"
    texts = vocab_texts(tokenizer, len(tokenizer))
    assert len(texts) == len(tokenizer) and texts[ids[-1]] == "<|im_end|>"


def test_a_missing_transformers_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(BackendMissingError, match="the exllamav2 loader needs transformers: pip install"):
        load_tokenizer(tmp_path, loader="exllamav2")


# --- one home ---------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["transformers", "gptq", "exllamav2"])
def test_no_loader_imports_another_loaders_private_names(module: str) -> None:
    tree = ast.parse((LOADERS / f"{module}.py").read_text(encoding="utf-8"))
    private = [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("loaders") for alias in node.names if alias.name.startswith("_")]
    assert private == []
