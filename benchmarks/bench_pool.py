"""Cost of one lease + record at 10, 1,000 and 10,000 keys (median microseconds).

The pick is O(log n): the ratio between 10,000 and 10 keys should stay near 1.
Run: .venv/bin/python benchmarks/bench_pool.py
"""

from __future__ import annotations

import statistics
import time

from keypool import KeyPool

ROUNDS = 7
OPS = 20_000


def lease_record_us(n_keys: int) -> float:
    pool = KeyPool.from_keys("p", [f"sk-bench-{i}" for i in range(n_keys)])
    acquire = pool.try_acquire
    for _ in range(1000):  # warm up
        acquire("p").success()
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(OPS):
            acquire("p").success()
        samples.append((time.perf_counter() - start) / OPS * 1e6)
    return statistics.median(samples)


def lease_record_with_open_keys_us(n_keys: int) -> float:
    """The same with half of the keys open: picks must not scan past dead keys."""
    pool = KeyPool.from_keys("p", [f"sk-bench-{i}" for i in range(n_keys)])
    for key_id in pool.key_ids("p")[: n_keys // 2]:
        pool.trip("p", key_id)
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(OPS):
            pool.try_acquire("p").success()
        samples.append((time.perf_counter() - start) / OPS * 1e6)
    return statistics.median(samples)


def main() -> None:
    sizes = [10, 1_000, 10_000]
    healthy = {n: lease_record_us(n) for n in sizes}
    half_open = {n: lease_record_with_open_keys_us(n) for n in sizes}
    print("lease + record, median of", ROUNDS, "rounds of", OPS, "operations")
    for n in sizes:
        print(f"  {n:>6} keys: {healthy[n]:6.2f} us all healthy   {half_open[n]:6.2f} us half the keys open")
    print(
        f"  ratio 10,000 / 10 keys: {healthy[10_000] / healthy[10]:.2f} (healthy), "
        f"{half_open[10_000] / half_open[10]:.2f} (half open)   target: near 1"
    )


if __name__ == "__main__":
    main()
