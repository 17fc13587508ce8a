"""The ASGI app :class:`FakeUpstream`: its test API, its per-key bookkeeping and its routing.

Order of checks for every request: the key (401), the route (404, 405), the request's content
(400), then the key's fault; the answers themselves are built in their own modules.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from .aliases import JSON, Flavor, Receive, Scope, Send
from .answers import DEFAULT_MODELS, Answer, balance_body, embeddings_answer
from .chat import chat_answer
from .counters import KeyCounters, Tally
from .delivery import deliver
from .errors import HTTPError, error_body
from .exchange import Exchange, read_body
from .faults import OK, Fault, Slot
from .responses_api import responses_answer
from .validation import parse


class FakeUpstream:
    """An OpenAI-compatible ASGI app with per-key faults and counters.

    Serves ``POST /chat/completions`` (streaming or not), ``GET /models`` (and ``/models/{id}``),
    ``POST /embeddings``, ``POST /responses`` (streaming or not) and ``GET /user/balance``, each
    with or without a ``/v1`` prefix. The assistant's answer echoes the last user message so tests
    can assert it. ``flavor="deepseek"`` adds ``reasoning_content`` for
    ``deepseek-reasoner``; ``flavor="perplexity"`` adds ``citations`` and ``search_results`` and,
    like the real service, has no ``/models``.

    Keys arrive as ``Authorization: Bearer <secret>`` or in ``auth_header`` (e.g. ``x-api-key``).
    All methods are thread-safe: a test may switch faults while the app serves from another thread.

    Served in-process by ``httpx2.ASGITransport``, bodies are buffered: a cut surfaces before the
    first byte (as :class:`DropConnection`, an ``httpx2.RemoteProtocolError``) and a stall or hang
    only ends when the caller cancels. Serve it with a ``LoopbackServer`` to test those over TCP.
    """

    def __init__(
        self,
        keys: Iterable[str] = (),
        *,
        accept_any_key: bool = False,
        flavor: Flavor = "openai",
        auth_header: str | None = None,
        models: Sequence[str] | None = None,
        default_fault: Fault | None = None,
    ) -> None:
        if flavor not in DEFAULT_MODELS:
            raise ValueError(f"unknown flavor {flavor!r}; expected one of {sorted(DEFAULT_MODELS)}")
        self._flavor: Flavor = flavor
        self._accept_any_key = accept_any_key
        self._auth_header = auth_header.lower() if auth_header else None
        self._models = tuple(models) if models is not None else DEFAULT_MODELS[flavor]
        self._lock = threading.Lock()
        self._keys: set[str] = {k for k in keys if k}
        self._faults: dict[str, Slot] = {}
        self._default = default_fault or OK
        self._default_slots: dict[str, Slot] = {}
        self._tallies: dict[str, Tally] = {}
        self._total = 0
        self._ids = itertools.count(1)

    # -- test API ---------------------------------------------------------------------------

    @property
    def flavor(self) -> Flavor:
        return self._flavor

    def add_key(self, secret: str) -> None:
        """Accept this key from now on."""
        if not secret:
            raise ValueError("a key secret must not be empty")
        with self._lock:
            self._keys.add(secret)

    def remove_key(self, secret: str) -> None:
        """Stop accepting this key (401 from now on, unless ``accept_any_key``)."""
        with self._lock:
            self._keys.discard(secret)

    def set_fault(self, secret: str, fault: Fault) -> None:
        """Make this key answer with ``fault`` from its next request on (restarts its state)."""
        with self._lock:
            self._faults[secret] = Slot.for_key(fault, secret)

    def clear_fault(self, secret: str) -> None:
        """Let this key follow the default fault again."""
        with self._lock:
            self._faults.pop(secret, None)

    def set_default_fault(self, fault: Fault) -> None:
        """The fault of every key without its own; stateful faults keep state per key."""
        with self._lock:
            self._default = fault
            self._default_slots.clear()

    def clear_faults(self) -> None:
        """Every key answers normally again: per-key faults and the default fault are cleared."""
        with self._lock:
            self._faults.clear()
            self._default = OK
            self._default_slots.clear()

    def fault_of(self, secret: str) -> Fault:
        """The fault configured for this key (its own, else the default)."""
        with self._lock:
            slot = self._faults.get(secret)
            return slot.fault if slot is not None else self._default

    def counters(self, secret: str | None) -> KeyCounters:
        """What this key saw; ``None`` (or ``""``) addresses requests that carried no key."""
        with self._lock:
            tally = self._tallies.get(secret or "")
            return tally.freeze() if tally is not None else KeyCounters()

    def total_requests(self) -> int:
        """Requests that reached the app, with or without a valid key."""
        with self._lock:
            return self._total

    def reset_counters(self) -> None:
        """Zero every counter (requests still in flight keep being tracked as in flight)."""
        with self._lock:
            for secret, tally in list(self._tallies.items()):
                if tally.in_flight:
                    self._tallies[secret] = Tally(in_flight=tally.in_flight)
                else:
                    del self._tallies[secret]
            self._total = 0

    def __repr__(self) -> str:
        with self._lock:
            keys = "any" if self._accept_any_key else str(len(self._keys))
            faulted = len(self._faults)
            default = self._default
        return (
            f"FakeUpstream(flavor={self._flavor!r}, keys={keys}, faulted_keys={faulted}, "
            f"default_fault={default!r})"
        )

    # -- bookkeeping (called from the serving thread) ---------------------------------------

    def _tally(self, key: str) -> Tally:
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = Tally()
        return tally

    def _arrive(self, key: str, endpoint: str) -> None:
        with self._lock:
            self._total += 1
            tally = self._tally(key)
            tally.requests += 1
            tally.in_flight += 1
            tally.by_endpoint[endpoint] += 1

    def _leave(self, key: str) -> None:
        with self._lock:
            tally = self._tally(key)
            tally.in_flight = max(0, tally.in_flight - 1)

    def _record_status(self, key: str, status: int) -> None:
        with self._lock:
            self._tally(key).by_status[status] += 1

    def _bump(self, key: str, **increments: int) -> None:
        with self._lock:
            tally = self._tally(key)
            for name, amount in increments.items():
                setattr(tally, name, getattr(tally, name) + amount)

    def _known(self, secret: str | None) -> bool:
        if not secret:
            return False
        with self._lock:
            return self._accept_any_key or secret in self._keys

    def _draw(self, secret: str) -> Fault:
        with self._lock:
            slot = self._faults.get(secret)
            if slot is None:
                if self._default.kind not in ("flaky", "sequence"):
                    return self._default
                slot = self._default_slots.get(secret)
                if slot is None:
                    slot = self._default_slots[secret] = Slot.for_key(self._default, secret)
            return slot.draw()

    def _secret(self, headers: Mapping[str, str]) -> str | None:
        if self._auth_header is not None:
            value = headers.get(self._auth_header, "").strip()
            if value.lower().startswith("bearer "):
                value = value[7:].strip()
            if value:
                return value
        scheme, _, token = headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None

    # -- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})
            return
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", [])
        }
        path = scope["path"]
        if path.startswith("/v1/") or path == "/v1":
            path = path[3:] or "/"
        beta = path.startswith("/beta/")
        if beta:
            path = path[5:]
        endpoint = "/models" if path.startswith("/models/") else path
        secret = self._secret(headers)
        tally_key = secret or ""
        self._arrive(tally_key, endpoint)
        exchange = Exchange(self, tally_key, receive, send, f"req_fake_{next(self._ids)}")
        try:
            await self._handle(exchange, scope["method"], path, secret, beta)
        finally:
            self._leave(tally_key)

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, ex: Exchange, method: str, path: str, secret: str | None, beta: bool) -> None:
        try:
            if secret is None or not self._known(secret):
                raise HTTPError(
                    401,
                    "Authentication failed: missing or unknown API key.",
                    "authentication_error",
                    "invalid_api_key",
                )
            handler = self._route(method, path)
            payload: JSON = {}
            if method == "POST":
                body = await read_body(ex.receive)
                if body is None:
                    return
                payload = parse(body)
            if beta:
                payload["__beta__"] = True
            respond = handler(path, payload)
        except HTTPError as exc:
            await ex.json(exc.status, exc.body)
            return
        fault = self._draw(secret)
        if respond.prefilled:
            ex.count(prefills=1)
            if fault.kind == "rejects_prefill":
                await ex.json(400, error_body("Prefill is not supported.", "invalid_request_error", None))
                return
        await deliver(ex, fault, path, respond)

    def _route(self, method: str, path: str) -> Callable[[str, JSON], Answer]:
        routes: dict[str, tuple[str, Callable[[str, JSON], Answer]]] = {
            "/chat/completions": ("POST", self._chat),
            "/embeddings": ("POST", self._embeddings),
            "/responses": ("POST", self._responses),
            "/user/balance": ("GET", self._balance),
        }
        if self._flavor != "perplexity":  # like the real service: no model listing
            routes["/models"] = ("GET", self._model_list)
            if path.startswith("/models/"):
                routes[path] = ("GET", self._model)
        if path not in routes:
            raise HTTPError(
                404, f"Unknown request URL: {method} {path}.", "invalid_request_error", "unknown_url"
            )
        expected, handler = routes[path]
        if method != expected:
            raise HTTPError(
                405,
                f"Method {method} is not allowed on {path}.",
                "invalid_request_error",
                "method_not_allowed",
            )
        return handler

    # -- endpoints: validate the request, return the answer to send --------------------------

    def _model_entry(self, model: str) -> JSON:
        owner = {"openai": "openai", "deepseek": "deepseek", "perplexity": "perplexity"}
        return {"id": model, "object": "model", "created": 1700000000, "owned_by": owner[self._flavor]}

    def _model_list(self, path: str, payload: JSON) -> Answer:
        return Answer({"object": "list", "data": [self._model_entry(m) for m in self._models]})

    def _model(self, path: str, payload: JSON) -> Answer:
        model = path.removeprefix("/models/")
        if model not in self._models:
            raise HTTPError(
                404, f"The model '{model}' does not exist.", "invalid_request_error", "model_not_found"
            )
        return Answer(self._model_entry(model))

    def _balance(self, path: str, payload: JSON) -> Answer:
        return Answer(balance_body(available=True))

    def _chat(self, path: str, payload: JSON) -> Answer:
        return chat_answer(payload, self._flavor, self._ids)

    def _embeddings(self, path: str, payload: JSON) -> Answer:
        return embeddings_answer(payload)

    def _responses(self, path: str, payload: JSON) -> Answer:
        return responses_answer(payload, self._ids)
