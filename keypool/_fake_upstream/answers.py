"""What a successful answer is, the pieces every endpoint builds it from, and the small answers.

An :class:`Answer` is a JSON body or a list of stream events; the faults decide later how much of
it is sent, so the endpoints never know about faults.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .aliases import JSON, Flavor
from .errors import HTTPError
from .validation import model_of


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful answer: a JSON body, or stream events followed by a terminator."""

    body: JSON
    events: list[bytes] | None = None
    terminator: bytes = b""
    prefilled: bool = False  # a chat request ending with an assistant message


DEFAULT_MODELS: Final[Mapping[Flavor, tuple[str, ...]]] = {
    "openai": ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small"),
    "deepseek": ("deepseek-chat", "deepseek-reasoner"),
    "perplexity": ("sonar", "sonar-pro", "sonar-reasoning"),
}

_PIECES: Final = re.compile(r"\S+\s*|\s+")
_EMBEDDING_DIMENSIONS: Final = 8


def pieces(text: str) -> list[str]:
    """Split text into stream deltas (one word with its trailing space each); joins back exactly."""
    return _PIECES.findall(text)


def count_tokens(text: str) -> int:
    return len(text.split())


def text_of(content: Any) -> str:
    """The text of an OpenAI message content: a string or a list of ``{"type", "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector per text, rounded to float32 so base64 and floats agree."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dimensions)
    values = [(int.from_bytes(raw[i : i + 2], "big") / 65535.0) * 2 - 1 for i in range(0, len(raw), 2)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def balance_body(*, available: bool) -> JSON:
    amount = "10.00" if available else "0.00"
    return {
        "is_available": available,
        "balance_infos": [
            {
                "currency": "USD",
                "total_balance": amount,
                "granted_balance": "0.00",
                "topped_up_balance": amount,
            }
        ],
    }


def embeddings_answer(payload: JSON) -> Answer:
    """The answer to ``POST /embeddings``: a deterministic vector per input."""
    model = model_of(payload)
    raw = payload.get("input")
    items: list[Any]
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(isinstance(i, int) for i in raw)):
        items = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise HTTPError(
            400,
            "'input' must be a string or a non-empty list.",
            "invalid_request_error",
            "invalid_request_error",
        )
    dimensions = payload.get("dimensions", _EMBEDDING_DIMENSIONS)
    if not isinstance(dimensions, int) or not 1 <= dimensions <= 4096:
        raise HTTPError(
            400,
            "'dimensions' must be an integer in 1..4096.",
            "invalid_request_error",
            "invalid_request_error",
        )
    as_base64 = payload.get("encoding_format") == "base64"
    data = []
    tokens = 0
    for index, item in enumerate(items):
        text = item if isinstance(item, str) else json.dumps(item)
        tokens += count_tokens(text) if isinstance(item, str) else len(item)
        vector = embedding(text, dimensions)
        value: Any = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": value})
    return Answer(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
