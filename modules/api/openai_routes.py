"""OpenAI-compatible routes: models, completions, chat completions, embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from modules.api.completions import ChatCompletionJob, CompletionJob
from modules.api.embeddings import embed
from modules.api.responses import (
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionResponse,
    CompletionStreamResponse,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    error_responses,
    sse_responses,
)
from modules.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingsRequest
from modules.api.state import caller_of, get_state, on_model
from modules.api.streaming import drain, sse_response
from modules.api.unknown_fields import LoggingRoute
from modules.core.errors import ModelNotFoundError

router = APIRouter(tags=["OpenAI"], route_class=LoggingRoute, responses=error_responses(400, 401, 403, "4XX"))
_GENERATION_ERRORS = error_responses(413, 415, 429, 500)
_STREAM = ("With `stream`: Server-Sent Events, `data: {chunk}` each (an ErrorResponse if the generation "
           "fails midway), then `data: [DONE]`")


@router.get("/v1/models", response_model=ModelList)
def list_models(request: Request) -> ModelList:
    """Every model a request may name: the loaded one first (SillyTavern shows data[0].id; one
    unloaded while idle counts as loaded), then the others in models/."""
    models = get_state(request).app.models
    first = models.status().name
    names = [n for n in [first] if n] + [n for n in models.list_models() if n != first]
    return ModelList(data=[ModelCard(id=n) for n in names])


@router.get("/v1/models/{name:path}", response_model=ModelCard, responses=error_responses(404))
def get_model(name: str, request: Request) -> ModelCard:
    models = get_state(request).app.models
    if name != models.status().name and name not in models.list_models():
        raise ModelNotFoundError(f"no model named {name!r}", "model")
    return ModelCard(id=name)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**sse_responses(CompletionStreamResponse, _STREAM), **_GENERATION_ERRORS})
async def completions(body: CompletionRequest, request: Request) -> Response | CompletionResponse:
    """Runs on the model `model` names (loaded first if need be: the request waits), else the loaded one."""
    state, caller = get_state(request), caller_of(request)
    job, end = await on_model(request, body.model, lambda: CompletionJob(state, body, caller))
    if body.stream:
        return sse_response(request, job.events(), end)
    return await drain(request, job.response, end)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**sse_responses(ChatCompletionStreamResponse, _STREAM), **_GENERATION_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
    """Runs on the model `model` names (loaded first if need be: the request waits), else the loaded one."""
    # Building the prompt tokenizes it (fitting to the context): off the event loop, on_model does so.
    state, caller = get_state(request), caller_of(request)
    job, end = await on_model(request, body.model, lambda: ChatCompletionJob(state, body, caller))
    if body.stream:
        return sse_response(request, job.events(), end)
    return await drain(request, job.response, end)


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=error_responses(413, 415))
def embeddings(body: EmbeddingsRequest, request: Request) -> EmbeddingResponse:
    """Sentence embeddings from the offline all-MiniLM-L6-v2 package (loaded on first use)."""
    return EmbeddingResponse.model_validate(embed(get_state(request).app.embedder, body))
