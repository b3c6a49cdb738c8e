"""A scripted loader for engine tests: bytes are tokens, generation replays a script.

Token ids 0-255 are the bytes themselves (so a multi-byte character spans several tokens,
the hard case for streaming), 256 is BOS and 257 is EOS. Registered once as "fake".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from loaders import register_loader
from loaders.base import Capabilities, LoaderBase, ModelInfo
from modules.sampling import SAMPLER_NAMES, SamplingParams

BOS, EOS = 256, 257


@dataclass
class FakeOptions:
    ctx_size: int = 0


@register_loader
class FakeLoader(LoaderBase):
    name = "fake"
    package = "json"
    install_hint = "nothing to install"
    options_class = FakeOptions
    capabilities = Capabilities(samplers=frozenset(SAMPLER_NAMES), grammar=False)

    def __init__(self, path: Path, context_length: int) -> None:
        self.info = ModelInfo(
            name=path.name, path=path, loader=self.name, context_length=context_length,
            vocab_size=258, bos_token_id=BOS, eos_token_ids=(EOS,),
        )
        self.script: list[int] = []
        self.step_delay = 0.0
        self.seen_prompts: list[list[int]] = []
        self.seen_params: list[SamplingParams] = []
        self.steps = 0
        self.unloaded = False

    @classmethod
    def load(cls, path: Path, options: FakeOptions) -> FakeLoader:
        return cls(path, options.ctx_size or 64)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([BOS] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def generate(self, prompt_ids: list[int], params: SamplingParams, stop_event: threading.Event) -> Iterator[int]:
        self.seen_prompts.append(list(prompt_ids))
        self.seen_params.append(params)
        room = self.info.context_length - len(prompt_ids)
        for index, token in enumerate(self.script):
            if stop_event.is_set() or index >= room:
                return
            if self.step_delay:
                time.sleep(self.step_delay)
            self.steps += 1
            yield token

    def unload(self) -> None:
        self.unloaded = True


def script_text(text: str) -> list[int]:
    """The token ids of `text` in this byte tokenizer."""
    return list(text.encode("utf-8"))
