"""Shared state on Redis vs in memory: throughput, per-call cost and cross-process propagation.

1. Requests/s of ``AsyncDeepSeek`` over the fake upstream on loopback (2,000 requests at
   concurrency 32, 10 keys), the pool with ``RedisStore`` vs with ``MemoryStore`` vs with no
   store, interleaved rounds in one run (target: Redis/memory >= 0.8); once with healthy keys
   (nothing to share) and once with one key failing a fifth of its calls (its failures,
   successes and trips are shared all along).
2. The cost of one lease + record (µs) with each store: healthy calls (nothing to share), and
   calls whose outcome changes shared state (a failure then a success on the same key, so every
   record is handed to the store).
3. Cross-process propagation: this process trips keys (five failures each); three other processes
   note when each trip reaches them (``time.monotonic`` is system-wide on Linux). p50/p99 over
   all (key, process) pairs (target: p99 <= 50 ms on loopback).
4. The same under load, with 8 processes: every process keeps leasing keys from two threads
   (about 1,000 calls/s each), one key of four failing a fifth of its calls (its failures and the
   successes after them are shared all along), while one of them trips keys and the other seven
   note when each trip reaches them; once on loopback and once with Redis behind a TCP proxy
   that adds 10 ms to every round trip. Then ``half_open_max_calls`` across the 8: in each round
   every process grabs trial slots of 20 half-open keys from 12 threads released together and
   holds them until all are done; the overshoot is the number of trials held at once beyond the
   limit, summed over all keys and rounds (target: 0), with the claim latency. And an operator's
   config change (``update_config``, what ``PATCH`` calls) made in one process: when the seven
   others have applied it (p50/p99 over 50 changes).

A private ``redis-server`` (Debian's ``redis-server`` package) is started on a free loopback port;
every store uses the default settings. Run: .venv/bin/python benchmarks/bench_store.py
"""

from __future__ import annotations

import multiprocessing
import random
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.redis_server, the private Redis the tests use too

from keypool import BreakerConfig, BreakerState, KeyPool, KeyStateChanged  # noqa: E402
from keypool.store import MemoryStore, RedisStore, SharedStore  # noqa: E402
from keypool.testing import FakeUpstream, Fault, LoopbackServer  # noqa: E402
from providers import AsyncDeepSeek  # noqa: E402
from tests.redis_server import RedisServer, TcpProxy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_failover import drive  # noqa: E402  (the same load as the failover benchmark)

P = "deepseek"
REQUESTS = 2_000
CONCURRENCY = 32
ROUNDS = 3
SECRETS = [f"sk-bench-{i}" for i in range(10)]
LEASES = 30_000
OBSERVERS = 3
TRIPS = 200
BREAKER = BreakerConfig(timeout=600.0, jitter=0.0)


def pool_config(keys: list[dict[str, str]]) -> dict[str, Any]:
    return {"providers": [{"name": P, "keys": keys, "breaker": BREAKER.model_dump()}]}


def bench_keys() -> list[dict[str, str]]:
    return [{"secret": s, "key_id": f"k{i}"} for i, s in enumerate(SECRETS)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---------------------------------------------------------------------- 1. requests/s


async def throughput(redis_url: str, flaky: bool) -> dict[str, float]:
    """``flaky``: one key of ten fails one call in five (503), so outcomes are shared all along."""
    upstream = FakeUpstream(SECRETS, flavor="deepseek")
    if flaky:
        upstream.set_fault(SECRETS[0], Fault.flaky(0.2, Fault.status(503), seed=7))
    stores: dict[str, SharedStore | None] = {
        "no store": None,
        "MemoryStore": MemoryStore(),
        "RedisStore": RedisStore(redis_url, namespace=f"bench-rps-{flaky}"),
    }
    rates: dict[str, list[float]] = {name: [] for name in stores}
    failures = 0
    with LoopbackServer(upstream, shutdown_timeout=0.2) as server:
        clients = {
            name: AsyncDeepSeek(
                pool=KeyPool(pool_config(bench_keys()), store=store), base_url=server.base_url
            )
            for name, store in stores.items()
        }
        for client in clients.values():  # warm up
            await drive(client, 300)
        for _ in range(ROUNDS):  # interleaved, so machine noise hits all alike
            for name, client in clients.items():
                rate, failed = await drive(client)
                rates[name].append(rate)
                failures += failed
        for client in clients.values():
            await client.close()
    for store in stores.values():
        if store is not None:
            store.close()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    what = "one key of 10 flaky (20 % 503)" if flaky else "10 healthy keys"
    label = "1b" if flaky else "1."
    print(
        f"{label} {REQUESTS} requests at concurrency {CONCURRENCY} over loopback, {what}, median of {ROUNDS}"
    )
    for name, rate in medians.items():
        print(f"   {name:<12} {rate:8.0f} req/s")
    ratio = medians["RedisStore"] / medians["MemoryStore"]
    print(f"   ratio RedisStore/MemoryStore {ratio:6.3f}   target >= 0.8")
    print(f"   ratio RedisStore/no store    {medians['RedisStore'] / medians['no store']:6.3f}")
    print(f"   failed requests              {failures:6d}")
    return medians


# ---------------------------------------------------------------------- 2. lease + record


def lease_cost(pool: KeyPool, shared: bool) -> float:
    """µs per lease + record; ``shared``: every record changes shared state."""
    acquire = pool.try_acquire
    start = time.perf_counter()
    if shared:
        for _ in range(LEASES // 2):
            lease = acquire(P)
            lease.failure("503")
            lease = pool.try_acquire_key(P, lease.key_id) or acquire(P)
            lease.success()
    else:
        for _ in range(LEASES):
            acquire(P).success()
    return (time.perf_counter() - start) / LEASES * 1e6


def lease_costs(redis_url: str) -> None:
    print(f"2. lease + record, {LEASES} calls on 10 keys, µs per call (median of {ROUNDS})")
    made: list[SharedStore] = []

    def pool_with(name: str) -> KeyPool:
        store: SharedStore | None = None
        if name == "MemoryStore":
            store = MemoryStore()
        elif name == "RedisStore":
            store = RedisStore(redis_url, namespace=f"bench-lease-{len(made)}")
        if store is not None:
            made.append(store)
        pool = KeyPool(pool_config(bench_keys()), store=store)
        for key_id in pool.key_ids(P):  # past probation: every key proven
            lease = pool.try_acquire_key(P, key_id)
            assert lease is not None
            lease.success()
        return pool

    names = ["no store", "MemoryStore", "RedisStore"]
    for shared in (False, True):
        label = "outcome shared (failure, success)" if shared else "healthy (nothing to share)"
        pools = {name: pool_with(name) for name in names}
        costs: dict[str, list[float]] = {name: [] for name in names}
        for pool in pools.values():
            lease_cost(pool, shared)  # warm up
        for _ in range(ROUNDS):
            for name, pool in pools.items():
                costs[name].append(lease_cost(pool, shared))
        line = "   ".join(f"{name} {statistics.median(costs[name]):6.2f}" for name in names)
        print(f"   {label:<35} {line}")
    for store in made:
        store.close()


# ---------------------------------------------------------------------- 3. propagation


def observer(url: str, namespace: str, keys: list[dict[str, str]], conn: Connection) -> None:
    seen: dict[str, float] = {}

    def hook(event: object) -> None:
        if isinstance(event, KeyStateChanged) and event.new is BreakerState.OPEN:
            seen.setdefault(event.key_id, time.monotonic())

    store = RedisStore(url, namespace=namespace)
    KeyPool(pool_config(keys), store=store, hooks=[hook])
    conn.send("ready")
    conn.recv()  # "report"
    conn.send(seen)
    store.close()


def propagation(redis_url: str) -> None:
    keys = [{"secret": f"sk-trip-{i}", "key_id": f"t{i}"} for i in range(TRIPS)]
    ctx = multiprocessing.get_context("spawn")
    conns, procs = [], []
    for _ in range(OBSERVERS):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=observer, args=(redis_url, "bench-prop", keys, theirs), daemon=True)
        proc.start()
        conns.append(mine)
        procs.append(proc)
    for conn in conns:
        assert conn.recv() == "ready"
    store = RedisStore(redis_url, namespace="bench-prop")
    pool = KeyPool(pool_config(keys), store=store)
    tripped: dict[str, float] = {}
    for spec in keys:
        key_id = spec["key_id"]
        for i in range(BREAKER.failure_threshold):
            lease = pool.try_acquire_key(P, key_id)
            assert lease is not None
            if i == BREAKER.failure_threshold - 1:
                tripped[key_id] = time.monotonic()
            lease.failure("503")
        time.sleep(0.005)  # one trip at a time: the delay of each, not of a queue
    time.sleep(0.5)
    delays: list[float] = []
    missing = 0
    for conn in conns:
        conn.send("report")
        seen = conn.recv()
        for key_id, at in tripped.items():
            if key_id in seen:
                delays.append((seen[key_id] - at) * 1000)
            else:
                missing += 1
    for proc in procs:
        proc.join(timeout=10)
    store.close()
    print(f"3. trip propagation to {OBSERVERS} other processes, {TRIPS} trips ({len(delays)} samples)")
    print(
        f"   p50 {statistics.median(delays):6.2f} ms   p99 {percentile(delays, 0.99):6.2f} ms"
        f"   max {max(delays):6.2f} ms   target p99 <= 50 ms   never seen: {missing}"
    )


# ---------------------------------------------------------------------- 4. under load, 8 processes

FLEET = 8
LOAD_TRIPS = 100
TRIAL_KEYS = [f"h{i}" for i in range(20)]
TRIAL_ROUNDS = 5
TRIAL_THREADS = 12
TRIAL_OPEN = 0.3
ADMIN_CHANGES = 50


def fleet_config() -> dict[str, Any]:
    trip = [{"secret": f"sk-lt-{i}", "key_id": f"t{i}"} for i in range(LOAD_TRIPS)]
    busy = [{"secret": f"sk-busy-{i}", "key_id": f"b{i}"} for i in range(4)]
    trial = [{"secret": f"sk-h-{k}", "key_id": k} for k in TRIAL_KEYS]
    trials = BreakerConfig(timeout=TRIAL_OPEN, success_threshold=50, jitter=0.0)
    return {
        "providers": [
            {"name": "trip", "keys": trip, "breaker": BREAKER.model_dump()},
            {
                "name": "busy",
                "keys": busy,
                "breaker": BreakerConfig(failure_threshold=1_000_000).model_dump(),
            },
            {"name": "trial", "keys": trial, "breaker": trials.model_dump()},
        ]
    }


def contest(pool: KeyPool, barrier: Any) -> tuple[dict[str, int], list[float]]:
    """Once the trial keys are half-open here, line up with the other processes, then grab trial
    slots of every key from 12 threads at once, and hold them until every process is done (the
    limit is on trials at once); (admitted per key, seconds per claim)."""
    from keypool import Lease

    deadline = time.monotonic() + 3
    while any(pool.key_stats(k, "trial")["state"] != "half_open" for k in TRIAL_KEYS):
        if time.monotonic() > deadline:
            break
        time.sleep(0.002)
    held: list[Lease] = []
    lock = threading.Lock()
    claims: list[float] = []
    start = threading.Barrier(TRIAL_THREADS)

    def grab(offset: int) -> None:
        start.wait()
        for j in range(len(TRIAL_KEYS)):
            key_id = TRIAL_KEYS[(j + offset) % len(TRIAL_KEYS)]
            began = time.perf_counter()
            lease = pool.try_acquire_key("trial", key_id)
            took = time.perf_counter() - began
            with lock:
                claims.append(took)
                if lease is not None:
                    held.append(lease)

    barrier.wait(timeout=30)
    threads = [threading.Thread(target=grab, args=(i,)) for i in range(TRIAL_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = {k: sum(1 for lease in held if lease.key_id == k) for k in TRIAL_KEYS}
    barrier.wait(timeout=30)  # every process holds its trials until all are done: all at once
    for lease in held:
        lease.release()
    return counts, claims


def fleet_worker(url: str, namespace: str, conn: Connection, barrier: Any) -> None:
    """One of the 8: a pool on a default RedisStore, driven by commands."""
    seen: dict[str, float] = {}

    def hook(event: object) -> None:
        if isinstance(event, KeyStateChanged) and event.new is BreakerState.OPEN and event.provider == "trip":
            seen.setdefault(event.key_id, time.monotonic())

    store = RedisStore(url, namespace=namespace)
    pool = KeyPool(fleet_config(), store=store, hooks=[hook])
    busy = threading.Event()
    applied: dict[int, float] = {}  # an operator's change (its mark) -> when it applied here
    apply_admin = pool.apply_admin

    def noting(entry: Any) -> Any:
        result = apply_admin(entry)
        mark = entry.get("changes", {}).get("max_retry_after")
        if mark is not None:
            applied.setdefault(int(mark), time.monotonic())
        return result

    pool.apply_admin = noting  # type: ignore[method-assign]

    def load() -> None:  # traffic over 4 keys, one of them failing a fifth of its calls
        rng = random.Random()
        while busy.is_set():
            lease = pool.try_acquire("busy")
            if lease.key_id == "b0" and rng.random() < 0.2:
                lease.failure("503")  # shared, and so is the success after it
            else:
                lease.success()
            time.sleep(0.001)

    conn.send("ready")
    while True:
        command, arg = conn.recv()
        if command == "stop":
            break
        if command == "load":
            busy.set()
            for _ in range(2):
                threading.Thread(target=load, daemon=True).start()
            conn.send(None)
        elif command == "calm":
            busy.clear()
            conn.send(None)
        elif command == "trip":  # one trip at a time: the delay of each, not of a queue
            at: dict[str, float] = {}
            for i in range(LOAD_TRIPS):
                key_id = f"t{i}"
                for n in range(BREAKER.failure_threshold):
                    lease = pool.try_acquire_key("trip", key_id)
                    assert lease is not None
                    if n == BREAKER.failure_threshold - 1:
                        at[key_id] = time.monotonic()
                    lease.failure("503")
                time.sleep(0.01)
            conn.send(at)
        elif command == "admin":  # PATCH config, one change at a time
            made: dict[int, float] = {}
            for i in range(ADMIN_CHANGES):
                mark = 3600 + i
                made[mark] = time.monotonic()
                pool.update_config({"max_retry_after": mark}, provider="trip")
                time.sleep(0.01)
            conn.send(made)
        elif command == "applied":
            time.sleep(1.0)
            conn.send(dict(applied))
        elif command == "seen":
            time.sleep(1.0)
            conn.send(dict(seen))
            seen.clear()
        elif command == "reset":
            pool.reset(arg)
            conn.send(None)
        elif command == "open-trials":
            pool.trip("trial")
            conn.send(None)
        elif command == "contest":
            counts, claims = contest(pool, barrier)
            conn.send((counts, claims, store.slow_claims, store.degradations))
    store.close()


def delays_in_others(conns: list[Connection], make: str, report: str) -> tuple[list[float], int]:
    """The first process makes changes (``make``: when each was made); the others say when each
    reached them (``report``). (Delays in ms, changes that never arrived.)"""
    conns[0].send((make, None))
    made = conns[0].recv()
    delays, missing = [], 0
    for conn in conns[1:]:
        conn.send((report, None))
        arrived = conn.recv()
        for change, at in made.items():
            if change in arrived:
                delays.append((arrived[change] - at) * 1000)
            else:
                missing += 1
    return delays, missing


def fleet_run(url: str, label: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    namespace = f"bench-fleet-{label.split()[0]}"
    barrier = ctx.Barrier(FLEET)
    conns, procs = [], []
    for _ in range(FLEET):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=fleet_worker, args=(url, namespace, theirs, barrier), daemon=True)
        proc.start()
        conns.append(mine)
        procs.append(proc)
    for conn in conns:
        assert conn.recv() == "ready"

    def ask_all(command: str, arg: Any = None) -> list[Any]:
        for conn in conns:
            conn.send((command, arg))
        return [conn.recv() for conn in conns]

    ask_all("load")
    time.sleep(0.5)
    delays, missing = delays_in_others(conns, "trip", "seen")
    print(
        f"4. {label}: trip propagation under load, {FLEET} processes, {LOAD_TRIPS} trips"
        f" ({len(delays)} samples)"
    )
    print(
        f"   p50 {statistics.median(delays):6.2f} ms   p99 {percentile(delays, 0.99):6.2f} ms"
        f"   max {max(delays):6.2f} ms   never seen: {missing}"
    )
    admin_delays, admin_missing = delays_in_others(conns, "admin", "applied")
    print(
        f"   operator's config change (update_config, what PATCH calls) applied in the 7 others:"
        f" p50 {statistics.median(admin_delays):.2f} ms p99 {percentile(admin_delays, 0.99):.2f} ms"
        f" ({len(admin_delays)} samples, never applied: {admin_missing})"
    )
    overshoot, claims, slow, degradations, episodes = 0, [], 0, 0, 0
    for _ in range(TRIAL_ROUNDS):
        conns[0].send(("open-trials", None))
        conns[0].recv()
        time.sleep(TRIAL_OPEN)
        results = ask_all("contest")
        for key_id in TRIAL_KEYS:
            total = sum(counts[key_id] for counts, _, _, _ in results)
            overshoot += max(0, total - BREAKER.half_open_max_calls)
            episodes += 1
        for _, took, s, d in results:
            claims += [t * 1000 for t in took]
            slow, degradations = slow + s, degradations + d
    ask_all("calm")
    print(
        f"   half_open_max_calls={BREAKER.half_open_max_calls}: {episodes} half-open episodes, "
        f"{FLEET} processes x {TRIAL_THREADS} threads: overshoot {overshoot} (target 0); "
        f"claim p50 {statistics.median(claims):.2f} ms p99 {percentile(claims, 0.99):.2f} ms; "
        f"slow claims refused {slow}; degradations {degradations}"
    )
    for conn in conns:
        conn.send(("stop", None))
    for proc in procs:
        proc.join(timeout=15)


def main() -> None:
    with RedisServer() as server:
        anyio.run(throughput, server.url, False)
        anyio.run(throughput, server.url, True)
        lease_costs(server.url)
        propagation(server.url)
        fleet_run(server.url, "loopback")
        with TcpProxy(server.port, latency=0.010) as proxy:
            fleet_run(proxy.url(server.url), "10ms Redis (TCP proxy adding 10 ms per round trip)")


if __name__ == "__main__":
    main()
