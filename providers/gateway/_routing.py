"""The route loop: a public model's routes in order, each through its provider's pooled client.

Each provider has one ``httpx2.AsyncClient`` over a :class:`keypool.KeyPoolTransport`, which
leases a key per attempt and fails over between that provider's keys. Above it this loop moves
to the next route when a provider refuses (no key), cannot be reached, or answers with what the
transport judged the key's or the server's fault (429, 401/402/403, 5xx) after trying its keys.
A caller error (400, 404, 422 ...) is the answer: another route would refuse it too, except a
prompt over the context length, which goes to the model's ``on_context_length`` model. Nothing
reaches the caller until a route has answered, so every failover happens before the first byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx2

from keypool import Capacity, KeyPool, NoKeyAvailable, classify_status, request_budget

from ._body import RequestBody
from ._config import GatewaySettings, ModelRoutes, Route
from ._errors import GatewayError, refusal_error

__all__ = ["Answer", "Router"]

_RANK = {"healthy": 0, "degraded": 0, "critical": 1, "down": 2}
_FORWARDED = ("content-type", "accept", "x-request-id", "openai-beta")
_CONTEXT_MARKERS = (b"context_length_exceeded", b"maximum context length", b"context length")


@dataclass
class Answer:
    """An upstream response the caller will get, and who gave it."""

    response: httpx2.Response
    provider: str
    model: str
    key_id: str
    attempts: int


def _context_too_long(status: int, body: bytes) -> bool:
    lowered = body[:4096].lower()
    return status == 400 and any(marker in lowered for marker in _CONTEXT_MARKERS)


class Router:
    """Sends one request along a model's routes (see the module docstring)."""

    def __init__(
        self,
        pool: KeyPool,
        clients: Mapping[str, httpx2.AsyncClient],
        models: Mapping[str, ModelRoutes],
        settings: GatewaySettings,
    ) -> None:
        self.pool = pool
        self.clients = clients
        self.models = models
        self.settings = settings

    def ordered(self, routes: Sequence[Route], caps: Mapping[str, Capacity]) -> list[Route]:
        """A provider with a trial call due first (its recovery needs calls), then healthy and
        degraded providers, then critical, then down ones (a down provider may recover inside the
        deadline), each group in the configured order."""

        def place(route: Route) -> int:
            cap = caps[route.provider]
            return -1 if cap.trial_ready else _RANK[cap.status]

        return sorted(routes, key=place)

    async def send(
        self,
        path: str,
        body: RequestBody,
        model: ModelRoutes,
        headers: Mapping[str, str],
        routes: Sequence[Route],
        caps: Mapping[str, Capacity],
        limits: tuple[int, float | None] | None = None,
    ) -> Answer:
        """The first answer along ``routes``; ``limits`` (attempts, seconds) is what is left of a
        call's budget, for a continuation (default: a whole new call's)."""
        forwarded = {name: headers[name] for name in _FORWARDED if name in headers}
        forwarded["accept-encoding"] = "identity"  # bytes are relayed as they come
        refusals: list[NoKeyAvailable] = []
        last: httpx2.Response | None = None
        last_body = b""
        failure: BaseException | None = None
        queue = self.ordered(routes, caps)
        switched = False
        s = self.settings
        attempts, timeout = limits or (s.max_attempts, s.request_timeout)
        with request_budget(attempts=attempts, timeout=timeout) as budget:
            while queue:
                route = queue.pop(0)
                if budget.exhausted():
                    break
                budget.fallback = bool(queue)  # another route after this one: leave a failing one
                client = self.clients[route.provider]
                request = client.build_request(
                    "POST", f"{path}", content=body.with_model(route.model), headers=forwarded
                )
                try:
                    response = await client.send(request, stream=True)
                except NoKeyAvailable as refusal:
                    refusals.append(refusal)
                    continue
                except httpx2.HTTPError as exc:
                    failure = exc
                    continue
                if response.status_code < 400:
                    provider, key_id = budget.served_by or (route.provider, "")
                    return Answer(response, provider, route.model, key_id, budget.attempts_used)
                outcome = classify_status(response.status_code, response.headers)
                if outcome.kind.retry_elsewhere:
                    last_body = await _drain(response)
                    last = response
                    continue
                content = await _drain(response)
                fallback = self.models.get(model.on_context_length or "")
                if fallback is not None and not switched and _context_too_long(response.status_code, content):
                    switched = True
                    more = {r.provider: self.pool.capacity(r.provider) for r in fallback.routes}
                    queue = self.ordered(fallback.routes, more)
                    model = fallback
                    continue
                response.stream = httpx2.ByteStream(content)
                key_id = _key_of(budget.tried, route)
                return Answer(response, route.provider, route.model, key_id, budget.attempts_used)
        raise _no_answer(last, last_body, refusals, failure, budget.attempts_used)


def _key_of(tried: list[tuple[str, str]], route: Route) -> str:
    for provider, key_id in reversed(tried):
        if provider == route.provider:
            return key_id
    return ""


async def _drain(response: httpx2.Response) -> bytes:
    try:
        return await response.aread()
    except httpx2.HTTPError:
        return b""
    finally:
        await response.aclose()


def _no_answer(
    last: httpx2.Response | None,
    last_body: bytes,
    refusals: list[NoKeyAvailable],
    failure: BaseException | None,
    attempts: int,
) -> GatewayError:
    """What the caller gets when no route answered: the last upstream error as it was (a 429 or
    5xx a plain provider would have sent), a refusal, or a gateway error."""
    if last is not None and last.status_code not in (401, 402, 403):
        kept = [
            (name.encode(), value.encode())
            for name, value in last.headers.items()
            if name.lower() in ("retry-after", "retry-after-ms") or name.lower().startswith("x-ratelimit-")
        ]
        message = f"The upstream answered {last.status_code} on every route tried."
        return GatewayError(last.status_code, message, "server_error", headers=kept, raw=last_body or None)
    if refusals and (last is None or failure is None):
        return refusal_error(refusals)
    if last is not None:
        return GatewayError(
            503,
            "The upstream providers rejected every key tried (401/402/403); an operator must rotate keys.",
            "server_error",
            "upstream_keys_rejected",
        )
    if isinstance(failure, httpx2.TimeoutException):
        return GatewayError(504, "No upstream answered in time.", "server_error", "upstream_timeout")
    detail = type(failure).__name__ if failure is not None else "no route could be tried"
    return GatewayError(
        502, f"No upstream could be reached ({detail}; {attempts} attempt(s)).", "server_error", "bad_gateway"
    )
