"""GET /health on the API port: llama.cpp server's readiness answer (see modules/engine/health.py).

No key is asked (it tells nothing but ready or loading); the Host check applies as everywhere.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from modules.api.responses import Wire, error_responses
from modules.api.state import get_state
from modules.engine.health import LOADING, health

router = APIRouter(tags=["Health"], responses=error_responses(400, 403, "4XX"))


class HealthResponse(Wire):
    status: Literal["ok", "loading model"]


@router.get("/health", response_model=HealthResponse,
            responses={503: {"model": HealthResponse, "description": f'"{LOADING}": a model is loading'}})
def get_health(request: Request) -> JSONResponse:
    """200 `{"status": "ok"}` when ready, 503 `{"status": "loading model"}` while a model loads."""
    status, body = health(get_state(request).app)
    return JSONResponse(HealthResponse(**body).model_dump(), status_code=status, headers={"Cache-Control": "no-store"})
