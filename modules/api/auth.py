"""API keys: `Authorization: Bearer KEY` (or `x-api-key: KEY`), compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from modules.api.errors import ApiError
from modules.api.state import get_state, presented_key


def require_key(request: Request) -> None:
    """Refuse the request with a 401 unless it carries the --api-key (when one is set)."""
    key = get_state(request).app.settings.api_key
    if not key:
        return
    given = presented_key(request)
    # compare_digest takes as long for a wrong first byte as a wrong last one (no timing oracle).
    if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), key.encode("utf-8")):
        raise ApiError("invalid API key: send it as 'Authorization: Bearer KEY'", 401, "authentication_error",
                       code="invalid_api_key")
