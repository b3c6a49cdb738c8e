"""ooba's internal routes: model info/list/load/unload, tokens, logits, chat prompt, stop.

Token and model-info calls read the loaded model directly, never through the generation
queue: SillyTavern sends about a dozen encode calls before each generation, and they must
answer while a long generation runs. They are plain `def` routes, so FastAPI runs them in
its threadpool and a slow tokenizer never blocks the event loop.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from modules.api.completions import chat_prompt
from modules.api.logits import top_logprobs
from modules.api.responses import (
    ChatPromptResponse,
    DecodeResponse,
    EncodeResponse,
    LoadModelResponse,
    LogitsResponse,
    ModelInfoResponse,
    ModelListResponse,
    StatusResponse,
    StopGenerationResponse,
    TokenCountResponse,
    error_responses,
)
from modules.api.schemas import ChatCompletionRequest, DecodeRequest, EncodeRequest, LoadModelRequest, LogitsRequest
from modules.api.state import caller_of, get_state
from modules.api.unknown_fields import LoggingRoute
from modules.core.errors import InvalidRequestError

router = APIRouter(prefix="/v1/internal", tags=["Internal (ooba)"], route_class=LoggingRoute,
                   responses=error_responses(400, 401, 403, "4XX"))


@router.get("/model/info", response_model=ModelInfoResponse)
def model_info(request: Request) -> ModelInfoResponse:
    models = get_state(request).app.models
    report = models.report
    return ModelInfoResponse(model_name=models.status().name or "None", lora_names=[],
                             loader=report.loader if report else None)


@router.get("/model/list", response_model=ModelListResponse)
def model_list(request: Request) -> ModelListResponse:
    return ModelListResponse(model_names=get_state(request).app.models.list_models())


@router.post("/model/load", response_model=LoadModelResponse, responses=error_responses(404, 413, 415))
async def model_load(body: LoadModelRequest, request: Request) -> LoadModelResponse:
    """Load a model from models/ (waits for a running generation); `args` are loader options."""
    options = dict(body.args)
    loader = options.pop("loader", None)
    if loader is not None and not isinstance(loader, str):
        raise InvalidRequestError("args.loader must be a loader name", "args.loader")
    models = get_state(request).app.models
    report = await run_in_threadpool(models.load, body.model_name, loader, options)
    return LoadModelResponse(status="OK", model_name=report.name, loader=report.loader, message=report.summary())


@router.post("/model/unload", response_model=StatusResponse)
async def model_unload(request: Request) -> StatusResponse:
    state = get_state(request)
    state.active.cancel_all()
    await run_in_threadpool(state.app.models.unload)
    return StatusResponse(status="OK")


@router.post("/encode", response_model=EncodeResponse, responses=error_responses(413, 415))
def encode(body: EncodeRequest, request: Request) -> EncodeResponse:
    ids = get_state(request).app.models.require().encode(body.text, add_bos=body.add_bos_token)
    return EncodeResponse(tokens=ids, length=len(ids))


@router.post("/decode", response_model=DecodeResponse, responses=error_responses(413, 415))
def decode(body: DecodeRequest, request: Request) -> DecodeResponse:
    model = get_state(request).app.models.require()
    return DecodeResponse(text=model.decode(body.tokens, skip_special=body.skip_special_tokens))


@router.post("/token-count", response_model=TokenCountResponse, responses=error_responses(413, 415))
def token_count(body: EncodeRequest, request: Request) -> TokenCountResponse:
    return TokenCountResponse(
        length=len(get_state(request).app.models.require().encode(body.text, add_bos=body.add_bos_token)))


@router.post("/logits", response_model=LogitsResponse, responses=error_responses(413, 415, 429, 500))
def logits(body: LogitsRequest, request: Request) -> LogitsResponse:
    """Top-N next-token probabilities after `prompt` ({token text: probability})."""
    return LogitsResponse(top_logprobs(get_state(request), body))


@router.post("/chat-prompt", response_model=ChatPromptResponse, responses=error_responses(404, 413, 415))
def chat_prompt_route(body: ChatCompletionRequest, request: Request) -> ChatPromptResponse:
    """The prompt /v1/chat/completions would send to the model for this request (the same call)."""
    return ChatPromptResponse(prompt=chat_prompt(get_state(request), body).prompt.text)


@router.post("/stop-generation", response_model=StopGenerationResponse)
def stop_generation(request: Request) -> StopGenerationResponse:
    """Stop the API generations of the caller's key (every API generation when no key is set);
    the web UI's generations are never touched."""
    return StopGenerationResponse(status="OK", stopped=get_state(request).active.cancel_caller(caller_of(request).key_id))
