"""The answer to a Responses API request (``POST /responses``), whole or streamed.

Its stream differs from a chat stream: named events with sequence numbers, ending with
``response.completed`` and no ``[DONE]`` line.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator

from .aliases import JSON
from .answers import Answer, count_tokens, pieces, text_of
from .errors import HTTPError
from .validation import model_of


def responses_answer(payload: JSON, ids: Iterator[int]) -> Answer:
    """The answer to ``POST /responses``: it echoes the input's last user text."""
    model = model_of(payload)
    raw = payload.get("input")
    if isinstance(raw, str):
        text = raw
    elif isinstance(raw, list) and raw:
        user = [i for i in raw if isinstance(i, dict) and i.get("role", "user") == "user"]
        text = text_of(user[-1].get("content")) if user else ""
    else:
        raise HTTPError(
            400,
            "'input' must be a string or a non-empty list of items.",
            "invalid_request_error",
            "invalid_request_error",
        )
    number = next(ids)
    response_id, message_id = f"resp_fake_{number}", f"msg_fake_{number}"
    in_tokens, out_tokens = count_tokens(text), count_tokens(text)

    def response(status: str, output_text: str | None) -> JSON:
        output = (
            []
            if output_text is None
            else [
                {
                    "type": "message",
                    "id": message_id,
                    "status": "completed",
                    "role": "assistant",
                    "content": [
                        {"type": "output_text", "text": output_text, "annotations": [], "logprobs": []}
                    ],
                }
            ]
        )
        return {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "model": model,
            "output": output,
            "error": None,
            "incomplete_details": None,
            "instructions": payload.get("instructions"),
            "metadata": {},
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "text": {"format": {"type": "text"}},
            "usage": None
            if output_text is None
            else {
                "input_tokens": in_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": out_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": in_tokens + out_tokens,
            },
        }

    if not payload.get("stream"):
        return Answer(response("completed", text))
    sequence = itertools.count()

    def event(obj: JSON) -> bytes:
        obj["sequence_number"] = next(sequence)
        return f"event: {obj['type']}\ndata: {json.dumps(obj)}\n\n".encode()

    events = [event({"type": "response.created", "response": response("in_progress", None)})]
    events += [
        event(
            {
                "type": "response.output_text.delta",
                "item_id": message_id,
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
                "logprobs": [],
            }
        )
        for piece in pieces(text)
    ]
    events.append(event({"type": "response.completed", "response": response("completed", text)}))
    # The Responses API ends its stream after response.completed, without a [DONE] line.
    return Answer({}, events[:-1], events[-1])
