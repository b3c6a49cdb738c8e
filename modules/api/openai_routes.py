"""OpenAI-compatible routes: models, completions, chat completions, embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

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
from modules.api.state import caller_of, get_state
from modules.api.streaming import drain, sse_response
from modules.api.unknown_fields import LoggingRoute
from modules.core.errors import ModelNotFoundError

router = APIRouter(tags=["OpenAI"], route_class=LoggingRoute, responses=error_responses(400, 401, 403, "4XX"))
_GENERATION_ERRORS = error_responses(413, 415, 429, 500)
_STREAM = ("With `stream`: Server-Sent Events, `data: {chunk}` each (an ErrorResponse if the generation "
           "fails midway), then `data: [DONE]`")


@router.get("/v1/models", response_model=ModelList)
def list_models(request: Request) -> ModelList:
    """The loaded model first (SillyTavern shows data[0].id), then the others in models/."""
    models = get_state(request).app.models
    names = [n for n in [models.name] if n] + [n for n in models.list_models() if n != models.name]
    return ModelList(data=[ModelCard(id=n) for n in names])


@router.get("/v1/models/{name:path}", response_model=ModelCard, responses=error_responses(404))
def get_model(name: str, request: Request) -> ModelCard:
    models = get_state(request).app.models
    if name != models.name and name not in models.list_models():
        raise ModelNotFoundError(f"no model named {name!r}", "model")
    return ModelCard(id=name)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**sse_responses(CompletionStreamResponse, _STREAM), **_GENERATION_ERRORS})
async def completions(body: CompletionRequest, request: Request) -> Response | CompletionResponse:
    job = CompletionJob(get_state(request), body, caller_of(request))
    if body.stream:
        return sse_response(request, job.events(), job.cancel)
    return await drain(request, job.response, job.cancel)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**sse_responses(ChatCompletionStreamResponse, _STREAM), **_GENERATION_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
    # Building the prompt tokenizes it (fitting to the context): off the event loop.
    job = await run_in_threadpool(ChatCompletionJob, get_state(request), body, caller_of(request))
    if body.stream:
        return sse_response(request, job.events(), job.cancel)
    return await drain(request, job.response, job.cancel)


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=error_responses(413, 415))
def embeddings(body: EmbeddingsRequest, request: Request) -> EmbeddingResponse:
    """Sentence embeddings from the offline all-MiniLM-L6-v2 package (loaded on first use)."""
    return EmbeddingResponse.model_validate(embed(get_state(request).app.embedder, body))
