"""A request body read once: its top-level ``model`` and ``stream``, and the ``model`` swapped in
place so every other byte goes upstream exactly as the caller sent it (key order, spacing,
unknown fields, numbers as written)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]

__all__ = ["BadBody", "RequestBody", "parse_body"]

_WS = " \t\n\r"
_DECODER = json.JSONDecoder()


class BadBody(ValueError):
    """The body is not what the endpoint takes; ``param`` names the field when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class RequestBody:
    text: str
    model: str
    stream: bool
    model_spans: tuple[tuple[int, int], ...]

    def with_model(self, model: str) -> bytes:
        """The body with every top-level ``model`` value replaced by ``model``."""
        if model == self.model:
            return self.text.encode()
        parts: list[str] = []
        at = 0
        for start, end in self.model_spans:
            parts += [self.text[at:start], json.dumps(model)]
            at = end
        parts.append(self.text[at:])
        return "".join(parts).encode()


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WS:
        at += 1
    return at


def parse_body(raw: bytes) -> RequestBody:
    """Check that ``raw`` is one JSON object with a string ``model``; raises :class:`BadBody`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody("The request body is not valid UTF-8.") from None
    try:
        fields, spans = _walk(text)
    except RecursionError:
        raise BadBody("The request body is nested too deeply.") from None
    except (ValueError, IndexError) as exc:
        raise BadBody(f"We could not parse the JSON body of your request ({exc}).") from None
    if "model" not in fields:
        raise BadBody("you must provide a model parameter", "model")
    model = fields["model"]
    if not isinstance(model, str) or not model:
        raise BadBody("'model' must be a non-empty string", "model")
    stream = fields.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadBody("'stream' must be a boolean", "stream")
    return RequestBody(text, model, stream, tuple(spans))


def _walk(text: str) -> tuple[dict[str, object], list[tuple[int, int]]]:
    """The top-level object's ``model``/``stream`` values and where each ``model`` value sits."""
    at = _skip(text, 0)
    if at >= len(text) or text[at] != "{":
        raise BadBody("The request body must be a JSON object.")
    fields: dict[str, object] = {}
    spans: list[tuple[int, int]] = []
    at = _skip(text, at + 1)
    if at < len(text) and text[at] == "}":
        at += 1
    else:
        while True:
            if at >= len(text) or text[at] != '"':
                raise ValueError(f"expected a property name at character {at}")
            key, at = scanstring(text, at + 1)
            at = _skip(text, at)
            if at >= len(text) or text[at] != ":":
                raise ValueError(f"expected ':' at character {at}")
            start = _skip(text, at + 1)
            value, at = _DECODER.raw_decode(text, start)
            if key in ("model", "stream"):
                fields[key] = value
                if key == "model":
                    spans.append((start, at))
            at = _skip(text, at)
            if at < len(text) and text[at] == ",":
                at = _skip(text, at + 1)
                continue
            if at < len(text) and text[at] == "}":
                at += 1
                break
            raise ValueError(f"expected ',' or '}}' at character {at}")
    if _skip(text, at) != len(text):
        raise ValueError(f"extra data after the object at character {at}")
    return fields, spans
