"""Checks of a request's content, made before any fault: a bad request answers 400 whatever the key.

That is what a real provider does, and why a 400 must never count against a key.
"""

from __future__ import annotations

import json
from typing import Final

from .aliases import JSON
from .errors import HTTPError

POISON_MODEL: Final = "poison"
"""A request naming this model is a caller error: HTTP 400 whatever the key."""


def parse(body: bytes) -> JSON:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HTTPError(
            400, "We could not parse the JSON body of your request.", "invalid_request_error", "invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise HTTPError(
            400, "The request body must be a JSON object.", "invalid_request_error", "invalid_json"
        )
    return payload


def model_of(payload: JSON) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise HTTPError(400, "'model' is required.", "invalid_request_error", "invalid_request_error")
    if model == POISON_MODEL:
        raise HTTPError(
            400,
            f"The model '{POISON_MODEL}' is rejected on purpose.",
            "invalid_request_error",
            "invalid_model",
        )
    return model
