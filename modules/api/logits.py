"""Next-token probabilities for /v1/internal/logits, from the loader's own numbers.

One greedy step through the engine's queue with `logprobs` set: the loader reports the
raw next-token distribution (before any sampler), and we answer its top entries as
probabilities, the way ooba's route does. A loader that cannot report them is a clear 400.
"""

from __future__ import annotations

import math

from modules.api.schemas import LogitsRequest
from modules.api.state import ApiState
from modules.core.errors import InvalidRequestError
from modules.core.sampling import SamplingParams
from modules.engine.generation import TokenLogprob


def top_logprobs(state: ApiState, body: LogitsRequest) -> dict[str, float]:
    """{token text: probability} of the `top_logits` most likely next tokens after `body.prompt`."""
    if body.use_samplers:
        raise InvalidRequestError("use_samplers is not supported: the probabilities are the model's own",
                                  "use_samplers")
    params = SamplingParams(temperature=0, max_new_tokens=1, logprobs=body.top_logits, ban_eos_token=False)
    steps = _steps(state, body.prompt, params)
    if not steps:  # EOS came first: the engine ends without a token; ask again with EOS banned
        steps = _steps(state, body.prompt, params.replace(ban_eos_token=True))
    return {text: math.exp(logprob) for text, logprob in steps[0].top} if steps else {}


def _steps(state: ApiState, prompt: str, params: SamplingParams) -> list[TokenLogprob]:
    with state.app.generator.submit(prompt, params) as stream:
        return [step for chunk in stream for step in chunk.logprobs]
