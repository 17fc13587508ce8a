"""Eight OS processes share one pool on a private Redis, under concurrent load, with the store's
default settings (nothing here shortens a store timeout; only breaker timeouts are short, so that
there are many half-open episodes in a few seconds).

- Trial limit: every process runs 12 tasks sending requests through ``KeyPoolTransport`` to a
  loopback upstream where four of eight keys are dead (503 after 20 ms). The upstream records when
  each request to a dead key arrives; after a key's first trip every burst of arrivals is one
  half-open episode, and none may carry more than ``half_open_max_calls`` trial calls.
- kill -9 while a process is claiming trial slots, and while it shuts down: no slot stays held
  past one ``trial_lease`` (never ``probe_timeout``); a clean shutdown gives its slots back at once.
- A busy channel (seven processes changing keys as fast as they can) while one process is forced
  into degraded mode: it resynchronises (the bound: ``retry_interval``, 0.25 s, plus one merge) and
  then knows what the others changed meanwhile.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections import defaultdict
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import anyio
import pytest
import redis

from keypool.testing import FakeUpstream, Fault, LoopbackServer
from tests.process_fleet import Fleet
from tests.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.slow

PROCESSES = 8
TASKS = 12
LOAD_SECONDS = 3.0
LOAD = "load"  # the provider under traffic: 4 dead keys, 4 healthy
DEAD = [f"sk-load-dead-{i}" for i in range(4)]
HEALTHY = [f"sk-load-ok-{i}" for i in range(4)]
OPEN_SECONDS = 0.3
DEAD_DELAY = 0.02
TRIALS = "trials"  # the provider whose trial slots processes grab and die holding
TRIAL_KEYS = [f"h{i}" for i in range(40)]
CHURN = "churn"  # the provider the busy channel is made of
CHURN_KEYS = [f"c{i}" for i in range(8)]
LATE_KEY = "late"
HALF_OPEN_MAX = 3


def _config() -> dict[str, Any]:
    from keypool import BreakerConfig

    load = BreakerConfig(timeout=OPEN_SECONDS)
    trials = BreakerConfig(timeout=0.4, success_threshold=50)
    keys = [{"secret": s, "key_id": f"d{i}"} for i, s in enumerate(DEAD)]
    keys += [{"secret": s, "key_id": f"ok{i}"} for i, s in enumerate(HEALTHY)]
    return {
        "providers": [
            {"name": LOAD, "keys": keys, "breaker": load.model_dump()},
            {
                "name": TRIALS,
                "keys": [{"secret": f"sk-trial-{k}", "key_id": k} for k in TRIAL_KEYS],
                "breaker": trials.model_dump(),
            },
            {
                "name": CHURN,
                "keys": [{"secret": f"sk-churn-{k}", "key_id": k} for k in [*CHURN_KEYS, LATE_KEY]],
            },
        ]
    }


async def _load(pool: Any, base_url: str, start_at: float, seconds: float) -> dict[str, int]:
    import httpx2

    from keypool import KeyPoolTransport

    counts = {"ok": 0, "failed": 0}
    dead_ids = {secret: f"d{i}" for i, secret in enumerate(DEAD)}

    class Viewing(httpx2.AsyncHTTPTransport):
        """Says in a header what this process believed of a dead key when it sent to it."""

        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            key_id = dead_ids.get(request.headers.get("authorization", "").removeprefix("Bearer "))
            if key_id is not None:
                request.headers["x-test-view"] = pool.key_stats(key_id, LOAD)["state"]
            return await super().handle_async_request(request)

    transport = KeyPoolTransport(pool, LOAD, timeout=10.0, transport=Viewing())
    async with httpx2.AsyncClient(transport=transport, base_url=base_url) as client:
        await anyio.sleep(max(0.0, start_at - time.monotonic()))
        deadline = start_at + seconds

        async def task(n: int) -> None:
            i = 0
            while time.monotonic() < deadline:
                i += 1
                body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": f"{n}-{i}"}]}
                try:
                    response = await client.post("/chat/completions", json=body)
                    counts["ok" if response.status_code == 200 else "failed"] += 1
                except Exception:
                    counts["failed"] += 1

        async with anyio.create_task_group() as group:
            for n in range(TASKS):
                group.start_soon(task, n)
    return counts


def _worker(url: str, namespace: str, base_url: str, conn: Connection) -> None:
    """One process: a pool on Redis with a default ``RedisStore``, driven by commands."""
    from keypool import KeyPool, Lease
    from keypool.store import RedisStore

    store = RedisStore(url, namespace=namespace)
    pool = KeyPool(_config(), store=store)
    held: list[Lease] = []
    churning = threading.Event()

    def churn(keys: list[str]) -> None:
        while churning.is_set():
            for key_id in keys:
                pool.trip(CHURN, key_id)
                pool.reset(CHURN, key_id)

    conn.send(("ready", None))
    try:
        while True:
            command, arg = conn.recv()
            if command == "stop":
                break
            if command == "load":
                counts = anyio.run(_load, pool, base_url, *arg)
                conn.send(("ok", (counts, store.degradations, store.slow_claims)))
            elif command == "trip":  # trip the trial keys (they half-open 0.4 s later)
                pool.trip(TRIALS)
                conn.send(("ok", None))
            elif command == "grab":  # claim trial slots on the trial keys, one after another
                conn.send(("ok", None))
                for _ in range(50):
                    for key_id in TRIAL_KEYS:
                        lease = pool.try_acquire_key(TRIALS, key_id)
                        if lease is not None:
                            held.append(lease)
                conn.send(("ok", len(held)))
            elif command == "shutdown":  # report one outcome (queued), then close at once
                if held:
                    held.pop().failure("503")
                conn.send(("ok", len(held)))
                store.close()
                conn.send(("ok", None))
            elif command == "churn":
                churning.set()
                threading.Thread(target=churn, args=(CHURN_KEYS,), daemon=True).start()
                conn.send(("ok", None))
            elif command == "calm":
                churning.clear()
                conn.send(("ok", None))
            elif command == "degrade":  # as after a write that went unanswered and a failed ping
                store._loop.call_soon_threadsafe(store._degrade, TimeoutError())
                conn.send(("ok", None))
            elif command == "degraded":
                conn.send(("ok", store.degraded))
            elif command == "trip-late":
                pool.trip(CHURN, LATE_KEY)
                conn.send(("ok", None))
            elif command == "state":
                conn.send(("ok", pool.key_stats(arg[1], arg[0])["state"]))
            else:
                conn.send(("error", f"unknown command {command!r}"))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        store.close()


class _Counting:
    """ASGI middleware before the fake upstream: when each request to a dead key arrives, and
    what its sender believed of the key (a trial is sent on a key it saw half-open, or that
    re-opened between the lease and the send; one it saw closed had not heard of the trip yet)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.arrivals: defaultdict[str, list[float]] = defaultdict(list)
        self.trials: defaultdict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            secret = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
            if secret in DEAD:
                with self.lock:
                    self.arrivals[secret].append(time.monotonic())
                    if headers.get(b"x-test-view", b"closed") != b"closed":
                        self.trials[secret].append(time.monotonic())
                await anyio.sleep(DEAD_DELAY)
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from running_redis()


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[_Counting, str]]:
    fake = FakeUpstream([*DEAD, *HEALTHY], flavor="deepseek")
    for secret in DEAD:
        fake.set_fault(secret, Fault.status(503))
    counting = _Counting(fake)
    with LoopbackServer(counting, shutdown_timeout=0.2) as server:
        yield counting, server.base_url


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer, upstream: tuple[_Counting, str]) -> Iterator[Fleet]:
    namespace = f"load{uuid.uuid4().hex[:8]}"
    group = Fleet(PROCESSES, _worker, lambda _: (redis_server.url, namespace, upstream[1]), namespace)
    try:
        yield group
    finally:
        group.close()


def episodes(arrivals: list[float], gap: float = OPEN_SECONDS / 2) -> list[int]:
    """How many requests each burst of arrivals holds (bursts are ``gap`` or more apart)."""
    sizes: list[int] = []
    last = None
    for at in sorted(arrivals):
        if last is None or at - last > gap:
            sizes.append(0)
        sizes[-1] += 1
        last = at
    return sizes


def slots(server: RedisServer, namespace: str) -> list[tuple[int, float]]:
    """Every trial slot held in Redis: (expires at, store ms) with Redis's own ``now``."""
    client = redis.Redis.from_url(server.url)
    try:
        seconds, micros = client.time()
        now = seconds * 1000 + micros // 1000
        held = []
        for key_id in TRIAL_KEYS:
            name = f"{namespace}:b:{TRIALS}:{key_id}:trials"
            for _, expires in client.zrange(name, 0, -1, withscores=True):
                if expires > now:
                    held.append((now, expires))
        return held
    finally:
        client.close()


def test_the_trial_limit_holds_over_many_half_open_episodes_with_eight_processes(
    fleet: Fleet, upstream: tuple[_Counting, str], capsys: pytest.CaptureFixture[str]
) -> None:
    counting, _ = upstream
    start_at = time.monotonic() + 1.0
    results = fleet.ask_all("load", (start_at, LOAD_SECONDS))
    served = sum(counts["ok"] for counts, _, _ in results)
    failed = sum(counts["failed"] for counts, _, _ in results)
    degradations = sum(d for _, d, _ in results)
    slow = sum(s for _, _, s in results)
    half_open = []
    for secret in DEAD:
        # Calls sent on a key their process saw closed are the closed phase (with retries spaced
        # by the client's backoff, and under load, it can outlast the open timeout elsewhere): not
        # trials. Every other call to a dead key is one; each burst of them is an episode.
        half_open += episodes(counting.trials[secret])
    over = [n for n in half_open if n > HALF_OPEN_MAX]
    with capsys.disabled():
        print(
            f"\n{PROCESSES} processes x {TASKS} tasks, {LOAD_SECONDS:.0f} s: {served} requests served, "
            f"{failed} failed; {len(half_open)} half-open episodes, trial calls per episode max "
            f"{max(half_open, default=0)}, over the limit: {len(over)}; slow claims refused: {slow}; "
            f"degradations: {degradations}"
        )
    assert len(half_open) >= 12, f"too few half-open episodes to judge: {half_open}"
    assert over == [], f"episodes over half_open_max_calls={HALF_OPEN_MAX}: {over}"
    assert max(half_open) >= 1
    assert degradations == 0  # a loaded Redis is slow, not gone: no process fell back to local state
    assert failed == 0  # the healthy keys carried the load
    assert served > 0


def test_kill_9_while_claiming_trial_slots_holds_no_slot_past_one_lease(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    from keypool.store import RedisStore

    fleet.ask(0, "trip")
    time.sleep(0.5)  # the trial keys half-open
    victim = PROCESSES - 1
    fleet.ask(victim, "grab")  # answers as it starts claiming, key after key
    time.sleep(0.05)
    fleet.kill(victim)
    held = slots(redis_server, fleet.namespace)
    assert held, "the process died before it claimed anything: nothing to check"
    lease_ms = RedisStore.__init__.__kwdefaults__["trial_lease"] * 1000
    # Every slot it held expires within one lease of now, not after probe_timeout (120 s).
    assert all(expires <= now + lease_ms + 50 for now, expires in held), held
    deadline = time.monotonic() + lease_ms / 1000 + 5
    while slots(redis_server, fleet.namespace):
        assert time.monotonic() < deadline, "a dead process's slot outlived its lease"
        time.sleep(0.05)


def test_a_shutdown_gives_its_slots_back_and_kill_9_during_one_holds_none_past_a_lease(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    fleet.ask(0, "trip")
    time.sleep(0.5)
    leaving, killed = PROCESSES - 2, PROCESSES - 3
    fleet.ask(leaving, "grab")
    assert fleet.receive(leaving) > 0  # it holds trial slots
    assert slots(redis_server, fleet.namespace)
    fleet.ask(leaving, "shutdown")  # one outcome still queued when close() starts
    fleet.receive(leaving)  # close() returned
    assert slots(redis_server, fleet.namespace) == []  # every slot given back at once

    fleet.ask(killed, "grab")
    assert fleet.receive(killed) > 0
    fleet.send(killed, "shutdown")
    fleet.receive(killed)
    fleet.kill(killed)  # somewhere inside close()
    deadline = time.monotonic() + 8
    while slots(redis_server, fleet.namespace):
        assert time.monotonic() < deadline, "a slot outlived the lease of a process killed in shutdown"
        time.sleep(0.05)


def test_a_degraded_process_resynchronises_promptly_on_a_busy_channel(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    alive = [i for i in range(PROCESSES - 3)]  # the others died in the tests above
    lagging, busy = alive[0], alive[1:]
    fleet.ask_all("churn", who=busy)
    try:
        time.sleep(0.3)  # the channel is busy
        fleet.ask(lagging, "degrade")
        started = time.monotonic()
        fleet.ask(busy[0], "trip-late")  # a change the lagging process misses while degraded
        while fleet.ask(lagging, "degraded"):
            assert time.monotonic() - started < 10, "still degraded on a busy channel"
            time.sleep(0.005)
        took = time.monotonic() - started
        while fleet.ask(lagging, "state", (CHURN, LATE_KEY)) != "open":
            assert time.monotonic() - started < 10, "resynchronised without the change it missed"
            time.sleep(0.005)
    finally:
        fleet.ask_all("calm", who=busy)
    with capsys.disabled():
        print(f"\nresynchronised with {len(busy)} processes churning the channel after {took * 1000:.0f} ms")
