"""A scripted loader for engine tests: bytes are tokens, generation replays a script.

Token ids 0-255 are the bytes themselves (so a multi-byte character spans several tokens,
the hard case for streaming), 256 is BOS and 257 is EOS. Registered once as "fake".

It keeps the loader contract (loaders/base.LoadedModel) the way a strict backend would:
it yields Steps (with scripted or made-up logprobs when asked), checks the prompt with
check_prompt_ids, skips banned tokens, and refuses bias/ban ids outside its vocabulary
(a real backend would index past its logits), so a test proves the engine dropped them.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from loaders import register_loader
from loaders.base import Capabilities, LoaderBase, ModelInfo, Step, TokenLogprobs, check_prompt_ids
from modules.core.errors import InvalidRequestError, ModelNotLoadedError
from modules.core.sampling import SAMPLER_NAMES, SamplingParams

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
    """Without logprobs: the engine refuses them, as it would for any loader lacking them.
    `report_logprobs()` gives one instance the capability."""

    def __init__(self, path: Path, context_length: int) -> None:
        self.info = ModelInfo(
            name=path.name, path=path, loader=self.name, context_length=context_length,
            vocab_size=258, bos_token_id=BOS, eos_token_ids=(EOS,),
        )
        self.script: list[int] = []
        self.script_logprobs: list[TokenLogprobs] = []
        """The numbers of the scripted tokens, index by index (missing ones are made up)."""
        self.parallel = 1
        self.step_delay = 0.0
        self.seen_prompts: list[list[int]] = []
        self.seen_params: list[SamplingParams] = []
        self.steps = 0
        self.unloaded = False

    @classmethod
    def load(cls, path: Path, options: FakeOptions) -> FakeLoader:
        return cls(path, options.ctx_size or 64)

    def report_logprobs(self, numbers: Sequence[TokenLogprobs] = ()) -> None:
        """Declare the logprobs capability on this instance; `numbers` are those of the
        scripted tokens, index by index (tokens past them get made-up ones)."""
        self.capabilities = dataclasses.replace(type(self).capabilities, logprobs=True)
        self.script_logprobs = list(numbers)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        self._require_loaded()
        return ([BOS] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        self._require_loaded()
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def generate(self, prompt_ids: list[int], params: SamplingParams, stop_event: threading.Event) -> Iterator[Step]:
        """Replay the script, skipping banned tokens (greedy decoding would pick the next best)."""
        self._require_loaded()
        self.seen_prompts.append(list(prompt_ids))
        self.seen_params.append(params)
        check_prompt_ids(prompt_ids, self.info.context_length, self.info.vocab_size)
        outside = [t for t in (*params.logit_bias, *params.custom_token_bans) if not 0 <= t < self.info.vocab_size]
        if outside:
            raise InvalidRequestError(f"the fake backend got token ids outside its vocabulary: {outside}", "logit_bias")
        banned = {*params.custom_token_bans, *(t for t, v in params.logit_bias.items() if v == -math.inf)}
        if params.ban_eos_token:
            banned.add(EOS)
        want = params.logprobs if self.capabilities.logprobs else 0
        room = self.info.context_length - len(prompt_ids)
        sent = 0
        for index, token in enumerate(self.script):
            if stop_event.is_set() or sent >= room or self.unloaded:
                return
            if token in banned:
                continue
            if self.step_delay:
                time.sleep(self.step_delay)
            self.steps += 1
            sent += 1
            yield Step(token, self._numbers(index, token, want) if want else None)

    def _numbers(self, index: int, token: int, top_n: int) -> TokenLogprobs:
        if index < len(self.script_logprobs):
            numbers = self.script_logprobs[index]
            return TokenLogprobs(numbers.logprob, numbers.top[:top_n])
        others = [t for t in range(self.info.vocab_size) if t != token][: top_n - 1]
        return TokenLogprobs(-0.25, tuple((t, -0.25 - i) for i, t in enumerate([token, *others])))

    def unload(self) -> None:
        self.unloaded = True

    def _require_loaded(self) -> None:
        if self.unloaded:
            raise ModelNotLoadedError(f"{self.info.name} has been unloaded")


def script_text(text: str) -> list[int]:
    """The token ids of `text` in this byte tokenizer."""
    return list(text.encode("utf-8"))
