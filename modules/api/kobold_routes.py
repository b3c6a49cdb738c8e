"""KoboldAI / KoboldCpp routes, as SillyTavern's "KoboldAI Classic" and "KoboldCpp" types use them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from modules.api.responses import (
    GenerationSettings,
    KoboldAbortResponse,
    KoboldCppVersion,
    KoboldGenerateResponse,
    KoboldGeneration,
    KoboldPerf,
    KoboldResult,
    KoboldStreamToken,
    KoboldTokenCount,
    KoboldValue,
    LlamaCppProps,
    error_responses,
    sse_responses,
)
from modules.api.schemas import KoboldAbortRequest, KoboldGenerateRequest, KoboldTokenCountRequest
from modules.api.state import ApiState, Run, caller_of, get_state, on_model
from modules.api.streaming import drain, kobold_event, sse_response
from modules.api.unknown_fields import LoggingRoute

router = APIRouter(tags=["KoboldAI"], route_class=LoggingRoute, responses=error_responses(400, 401, 403, "4XX"))
_GENERATION_ERRORS = error_responses(413, 415, 429, 500)

KOBOLD_API_VERSION = "1.2.5"
KOBOLDCPP_VERSION = "1.80"
"""The KoboldCpp version we answer as: recent enough for SillyTavern to use streaming,
grammar and min_p (it switches those on from the word "KoboldCpp" and this number)."""


def _context_length(state: ApiState) -> int:
    model = state.app.models.current
    return model.info.context_length if model else 0


async def _start(request: Request, body: KoboldGenerateRequest) -> tuple[Run, Callable[[], None]]:
    """The request's Run, and the callback ending it. Kobold requests name no model: they run on
    the loaded one, or the one the requests ahead of them switch to (in turn, as the others)."""
    state = get_state(request)
    genkey = (body.model_extra or {}).get("genkey")
    caller = caller_of(request, genkey if isinstance(genkey, str) and genkey else None)
    return await on_model(request, None, lambda: state.run(
        body.to_sampling_params(state.default_params(body.max_tokens_given())), caller))


def _tokens(run: Run, prompt: str) -> Iterator[dict[str, Any]]:
    for chunk in run.chunks(prompt):
        if chunk.delta or chunk.finish_reason:
            # finish_reason only on the last token: the key is sent only when it is set.
            token = KoboldStreamToken.model_validate({"token": chunk.delta, "finish_reason": chunk.finish_reason})
            yield token.model_dump(exclude_none=True)


@router.get("/api/v1/model", response_model=KoboldResult)
def model(request: Request) -> KoboldResult:
    return KoboldResult(result=get_state(request).app.models.status().name or "None")


@router.get("/api/v1/info/version", response_model=KoboldResult)
def api_version() -> KoboldResult:
    return KoboldResult(result=KOBOLD_API_VERSION)


@router.get("/api/extra/version", response_model=KoboldCppVersion)
def koboldcpp_version() -> KoboldCppVersion:
    return KoboldCppVersion(result="KoboldCpp", version=KOBOLDCPP_VERSION)


@router.get("/api/v1/config/max_context_length", response_model=KoboldValue)
def max_context_length(request: Request) -> KoboldValue:
    return KoboldValue(value=_context_length(get_state(request)))


@router.get("/api/v1/config/max_length", response_model=KoboldValue)
def max_length(request: Request) -> KoboldValue:
    ctx = _context_length(get_state(request))
    return KoboldValue(value=min(512, ctx // 2) if ctx else 512)


@router.post("/api/v1/generate", response_model=KoboldGenerateResponse, responses=_GENERATION_ERRORS)
async def generate(body: KoboldGenerateRequest, request: Request) -> KoboldGenerateResponse:
    run, end = await _start(request, body)
    last = await drain(request, lambda: run.result(body.prompt), end)
    generation = KoboldGeneration.model_validate({"text": last.text, "finish_reason": last.finish_reason})
    return KoboldGenerateResponse(results=[generation])


@router.post("/api/extra/generate/stream", response_model=None, response_class=StreamingResponse,
             responses={**sse_responses(KoboldStreamToken, "Server-Sent Events: `event: message` then "
                                        "`data: {token}` each (an ErrorResponse if the generation fails midway)",
                                        done=False, event="message"),
                        **_GENERATION_ERRORS})
async def generate_stream(body: KoboldGenerateRequest, request: Request) -> Response:
    run, end = await _start(request, body)
    return sse_response(request, _tokens(run, body.prompt), end, encode=kobold_event, done=None)


@router.post("/api/extra/tokencount", response_model=KoboldTokenCount, responses=error_responses(413, 415))
def token_count(body: KoboldTokenCountRequest, request: Request) -> KoboldTokenCount:
    ids = get_state(request).app.models.require().encode(body.prompt, add_bos=body.special)
    return KoboldTokenCount(value=len(ids), ids=ids)


@router.post("/api/extra/abort", response_model=KoboldAbortResponse, responses=error_responses(413, 415))
def abort(request: Request, body: KoboldAbortRequest | None = None) -> KoboldAbortResponse:
    """Stop the caller's generation named by `genkey`, or all of the caller's API generations
    without one; never another caller's, nor the web UI's."""
    caller = caller_of(request)
    get_state(request).active.cancel_caller(caller.key_id, body.genkey if body else None)
    return KoboldAbortResponse(success=True, done=True)


@router.get("/api/extra/perf", response_model=KoboldPerf)
def perf(request: Request) -> KoboldPerf:
    state = get_state(request)
    busy = len(state.active)
    return KoboldPerf(**vars(state.perf), queue=max(0, busy - 1), idle=int(busy == 0))


@router.get("/props", response_model=LlamaCppProps)
def props(request: Request) -> LlamaCppProps:
    """llama.cpp server's /props, which SillyTavern's KoboldCpp type reads when present."""
    model = get_state(request).app.models.current
    template = (model.info.chat_template or "") if model else ""
    return LlamaCppProps(chat_template=template,
                         default_generation_settings=GenerationSettings(n_ctx=_context_length(get_state(request))))
