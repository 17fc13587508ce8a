"""Finishing a chat answer whose stream broke: the continuation request and the splice.

When a ``/chat/completions`` stream breaks after content reached the caller, the same
conversation is sent again with the text delivered so far as a trailing assistant message (a
*prefill*), and the new stream's chunks are rewritten into the old one (same ``id``, ``model`` and
``created``; no second ``role``), so the caller reads one answer. How a route takes a prefill is
its capability (:data:`Prefill`):

* ``"deepseek"``: DeepSeek's chat prefix completion: ``"prefix": true`` on the trailing assistant
  message, sent to the beta API (``/beta`` in place of the path's ``/v1``, on the same host);
* ``"assistant"``: a plain trailing assistant message, for OpenAI-compatible servers that continue
  one (opt-in: OpenAI itself would start a new message);
* ``None``: the route cannot continue (Perplexity, anything unknown).

A multi-route caller (one that holds several clients) uses the same three pieces the pooled
clients use:

1. :class:`~keypool._sse.EventScanner` over the broken stream's chunks: its ``text`` is what the
   caller saw, ``continuable`` whether a prefill may finish it (plain content of one choice, no
   tool call, no reasoning), ``id``/``model`` what the splice keeps;
2. :func:`continuation_body` (and :func:`continuation_path`) for the route that continues;
3. :class:`Splice` as the scanner's ``rewrite`` (``scanner.restart(Splice.of(scanner))``) while the
   continuation's chunks are fed to the same scanner, whose output goes to the caller.

A caller that holds SDK objects rather than bytes asks the route's pooled client instead:
``client.continuation(create_kwargs, delivered)`` gives the client (DeepSeek's on its beta API)
and the ``chat.completions.create`` arguments that continue the answer, and ``Splice(id, model,
created).chunk(chunk)`` rewrites each chunk object of the continuation into the original answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

import httpx2

from ._errors import ConfigError
from ._sse import EventScanner

__all__ = ["PREFILLS", "Prefill", "Splice", "continuation_body", "continuation_path", "continuation_request"]

Prefill = Literal["deepseek", "assistant"]
PREFILLS: tuple[Prefill, ...] = ("deepseek", "assistant")


def check_prefill(value: object) -> None:
    if value is not None and value not in PREFILLS:
        raise ConfigError(f"prefill: must be one of {list(PREFILLS)} or None (got {value!r})")


def continuation_body(body: Mapping[str, Any], delivered: str, prefill: Prefill) -> dict[str, Any]:
    """The chat request that continues ``delivered``: ``body``'s conversation plus the delivered
    text as the trailing assistant message, in the route's ``prefill`` style."""
    messages = body.get("messages")
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("a continuation needs the chat request's 'messages'")
    messages = list(messages)
    last = messages[-1]
    if isinstance(last, Mapping) and last.get("role") == "assistant":  # already a prefill: extend it
        delivered = f"{last.get('content') or ''}{delivered}"
        messages.pop()
    message: dict[str, Any] = {"role": "assistant", "content": delivered}
    if prefill == "deepseek":
        message["prefix"] = True
    return {**body, "messages": [*messages, message]}


def continuation_path(path: str, prefill: Prefill) -> str:
    """The URL path that takes the prefill: DeepSeek's beta API for ``"deepseek"``
    (``/chat/completions`` and ``/v1/chat/completions`` become ``/beta/chat/completions``)."""
    if prefill != "deepseek" or "/beta/" in path:
        return path
    head, sep, tail = path.rpartition("/chat/completions")
    if not sep:
        return path
    head = head.removesuffix("/v1")
    return f"{head}/beta/chat/completions{tail}"


def continuation_request(
    request: httpx2.Request, delivered: str, prefill: Prefill, extensions: Mapping[str, Any]
) -> httpx2.Request:
    """The HTTP request that continues ``request``'s answer after ``delivered`` (same headers but
    the key's and the body's length; ``extensions`` replace the original's)."""
    body = json.loads(request.content)
    content = json.dumps(continuation_body(body, delivered, prefill)).encode()
    url = request.url.copy_with(path=continuation_path(request.url.path, prefill))
    headers = [
        (name, value)
        for name, value in request.headers.multi_items()
        if name.lower() not in ("content-length", "authorization")
    ]
    return httpx2.Request(request.method, url, headers=headers, content=content, extensions=dict(extensions))


class Splice:
    """Rewrites a continuation's chunks into the answer they continue (an ``EventScanner`` rewrite).

    Keeps the original ``id``, ``model`` and ``created``, and drops the continuation's ``role``
    (the caller has had one). ``usage`` passes through: it is what the continuation billed.
    """

    __slots__ = ("created", "id", "model")

    def __init__(self, id: str | None, model: str | None, created: int | None = None) -> None:
        self.id = id
        self.model = model
        self.created = created

    @classmethod
    def of(cls, scanner: EventScanner) -> Splice:
        return cls(scanner.id, scanner.model, scanner.created)

    def chunk(self, chunk: Any) -> Any:
        """The same for an SDK chunk object (``openai``'s ``ChatCompletionChunk``), in place."""
        if self.id is not None:
            chunk.id = self.id
        if self.model is not None:
            chunk.model = self.model
        if self.created is not None:
            chunk.created = self.created
        for choice in getattr(chunk, "choices", None) or ():
            if getattr(choice.delta, "role", None) is not None:
                choice.delta.role = None
        return chunk

    def __call__(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        if self.id is not None and "id" in payload:
            payload["id"] = self.id
        if self.model is not None and "model" in payload:
            payload["model"] = self.model
        if self.created is not None and "created" in payload:
            payload["created"] = self.created
        choices = payload.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and "role" in delta:
                    del delta["role"]
        return payload
