"""KoboldAI / KoboldCpp routes, as SillyTavern's "KoboldAI Classic" and "KoboldCpp" types use them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from modules.api.schemas import KoboldGenerateRequest, KoboldTokenCountRequest
from modules.api.state import ApiState, Run, caller_of, get_state
from modules.api.streaming import drain, kobold_event, sse_response

router = APIRouter(tags=["KoboldAI"])

KOBOLD_API_VERSION = "1.2.5"
KOBOLDCPP_VERSION = "1.80"
"""The KoboldCpp version we answer as: recent enough for SillyTavern to use streaming,
grammar and min_p (it switches those on from the word "KoboldCpp" and this number)."""


def _context_length(state: ApiState) -> int:
    model = state.app.models.current
    return model.info.context_length if model else 0


class KoboldAbortRequest(BaseModel):
    """POST /api/extra/abort: `genkey` names the one generation to stop (KoboldCpp's multiuser mode)."""

    model_config = ConfigDict(extra="allow")
    genkey: str | None = Field(default=None, max_length=256)


def _start(request: Request, body: KoboldGenerateRequest) -> Run:
    state = get_state(request)
    genkey = (body.model_extra or {}).get("genkey")
    caller = caller_of(request, genkey if isinstance(genkey, str) and genkey else None)
    return state.run(body.to_sampling_params(state.default_params(body.max_tokens_given())), caller)


def _tokens(run: Run, prompt: str) -> Iterator[dict[str, Any]]:
    for chunk in run.chunks(prompt):
        if chunk.delta or chunk.finish_reason:
            yield {"token": chunk.delta, **({"finish_reason": chunk.finish_reason} if chunk.finish_reason else {})}


@router.get("/api/v1/model")
def model(request: Request) -> dict[str, Any]:
    return {"result": get_state(request).app.models.name or "None"}


@router.get("/api/v1/info/version")
def api_version() -> dict[str, Any]:
    return {"result": KOBOLD_API_VERSION}


@router.get("/api/extra/version")
def koboldcpp_version() -> dict[str, Any]:
    return {"result": "KoboldCpp", "version": KOBOLDCPP_VERSION}


@router.get("/api/v1/config/max_context_length")
def max_context_length(request: Request) -> dict[str, Any]:
    return {"value": _context_length(get_state(request))}


@router.get("/api/v1/config/max_length")
def max_length(request: Request) -> dict[str, Any]:
    ctx = _context_length(get_state(request))
    return {"value": min(512, ctx // 2) if ctx else 512}


@router.post("/api/v1/generate")
async def generate(body: KoboldGenerateRequest, request: Request) -> dict[str, Any]:
    run = _start(request, body)
    last = await drain(request, lambda: run.result(body.prompt), run.cancel)
    return {"results": [{"text": last.text, "finish_reason": last.finish_reason}]}


@router.post("/api/extra/generate/stream", response_model=None)
async def generate_stream(body: KoboldGenerateRequest, request: Request) -> Response:
    run = _start(request, body)
    return sse_response(request, _tokens(run, body.prompt), run.cancel, encode=kobold_event, done=None)


@router.post("/api/extra/tokencount")
def token_count(body: KoboldTokenCountRequest, request: Request) -> dict[str, Any]:
    ids = get_state(request).app.models.require().encode(body.prompt, add_bos=body.special)
    return {"value": len(ids), "ids": ids}


@router.post("/api/extra/abort")
def abort(request: Request, body: KoboldAbortRequest | None = None) -> dict[str, Any]:
    """Stop the caller's generation named by `genkey`, or all of the caller's API generations
    without one; never another caller's, nor the web UI's."""
    caller = caller_of(request)
    get_state(request).active.cancel_caller(caller.key_id, body.genkey if body else None)
    return {"success": True, "done": True}


@router.get("/api/extra/perf")
def perf(request: Request) -> dict[str, Any]:
    state = get_state(request)
    busy = len(state.active)
    return {**vars(state.perf), "queue": max(0, busy - 1), "idle": int(busy == 0)}


@router.get("/props")
def props(request: Request) -> dict[str, Any]:
    """llama.cpp server's /props, which SillyTavern's KoboldCpp type reads when present."""
    model = get_state(request).app.models.current
    template = (model.info.chat_template or "") if model else ""
    return {"chat_template": template, "default_generation_settings": {"n_ctx": _context_length(get_state(request))}}
