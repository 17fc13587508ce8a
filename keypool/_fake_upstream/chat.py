"""The answer to a chat completion, whole or streamed, in the OpenAI, DeepSeek or Perplexity shape.

The answer echoes the last user message so tests can assert it; DeepSeek's ``deepseek-reasoner``
adds ``reasoning_content`` and Perplexity adds ``citations`` and ``search_results``, as the real
services do, and a stream's chunks carry exactly the whole answer's text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Final

from .aliases import JSON, Flavor
from .answers import Answer, count_tokens, pieces, text_of
from .errors import HTTPError
from .validation import model_of

_CITATIONS: Final = (
    ("Example source one", "https://example.com/source-1"),
    ("Example source two", "https://example.org/source-2"),
)


def chat_answer(payload: JSON, flavor: Flavor, ids: Iterator[int]) -> Answer:
    """The answer to ``POST /chat/completions``: it echoes the last user message."""
    model = model_of(payload)
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise HTTPError(
            400,
            "'messages' must be a non-empty list of message objects.",
            "invalid_request_error",
            "invalid_request_error",
        )
    user = [m for m in messages if m.get("role") == "user"]
    text = text_of(user[-1].get("content")) if user else ""
    prefilled = messages[-1].get("role") == "assistant"
    if prefilled:
        last = messages[-1]
        if flavor == "deepseek" and not (last.get("prefix") is True and payload.get("__beta__")):
            raise HTTPError(
                400,
                "A trailing assistant message needs prefix=true on the beta API (/beta).",
                "invalid_request_error",
                "invalid_request_error",
            )
        prefix = text_of(last.get("content"))
        text = text[len(prefix) :] if text.startswith(prefix) else text
    reasoning = f"The user wrote: {text}" if flavor == "deepseek" and model == "deepseek-reasoner" else None
    prompt_tokens = sum(count_tokens(text_of(m.get("content"))) for m in messages)
    completion_tokens = count_tokens(text) + (count_tokens(reasoning) if reasoning else 0)
    usage: JSON = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": count_tokens(reasoning)}
    extra: JSON = {}
    if flavor == "perplexity":
        extra = {
            "citations": [url for _, url in _CITATIONS],
            "search_results": [{"title": t, "url": u, "date": "2024-01-01"} for t, u in _CITATIONS],
        }
    base: JSON = {
        "id": f"chatcmpl-fake-{next(ids)}",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
    }
    if not payload.get("stream"):
        message: JSON = {"role": "assistant", "content": text}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return Answer(
            prefilled=prefilled,
            body={
                **base,
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
                "usage": usage,
                **extra,
            },
        )

    def chunk(delta: JSON, finish: str | None = None, **more: Any) -> bytes:
        obj = {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
            **more,
        }
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    first: JSON = {"role": "assistant", "content": ""}
    if reasoning is not None:
        first = {"role": "assistant", "content": None, "reasoning_content": ""}
    events = [chunk(first)]
    events += [chunk({"content": None, "reasoning_content": p}) for p in pieces(reasoning or "")]
    events += [chunk({"content": p}) for p in pieces(text)]
    options = payload.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    if flavor == "deepseek":
        events.append(chunk({}, "stop", usage=usage))
    else:
        events.append(chunk({}, "stop"))
        if include_usage:
            obj = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage, **extra}
            events.append(b"data: " + json.dumps(obj).encode() + b"\n\n")
    return Answer({}, events, b"data: [DONE]\n\n", prefilled=prefilled)
