"""OpenAI-compatible routes: models, completions, chat completions, embeddings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from modules.api.completions import ChatCompletionJob, CompletionJob
from modules.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingsRequest
from modules.api.state import caller_of, get_state
from modules.api.streaming import drain, sse_response
from modules.errors import ModelNotFoundError

router = APIRouter(tags=["OpenAI"])


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "user"}


@router.get("/v1/models")
def list_models(request: Request) -> dict[str, Any]:
    """The loaded model first (SillyTavern shows data[0].id), then the others in models/."""
    models = get_state(request).app.models
    names = [n for n in [models.name] if n] + [n for n in models.list_models() if n != models.name]
    return {"object": "list", "data": [_model_card(n) for n in names]}


@router.get("/v1/models/{name:path}")
def get_model(name: str, request: Request) -> dict[str, Any]:
    models = get_state(request).app.models
    if name != models.name and name not in models.list_models():
        raise ModelNotFoundError(f"no model named {name!r}", "model")
    return _model_card(name)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response | dict[str, Any]:
    job = CompletionJob(get_state(request), body, caller_of(request))
    if body.stream:
        return sse_response(request, job.events(), job.cancel)
    return await drain(request, job.response, job.cancel)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response | dict[str, Any]:
    # Building the prompt tokenizes it (fitting to the context): off the event loop.
    job = await run_in_threadpool(ChatCompletionJob, get_state(request), body, caller_of(request))
    if body.stream:
        return sse_response(request, job.events(), job.cancel)
    return await drain(request, job.response, job.cancel)


@router.post("/v1/embeddings")
def embeddings(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
    """Sentence embeddings from the offline all-MiniLM-L6-v2 package (loaded on first use)."""
    return get_state(request).embedder.embed(body)
