"""What ``keypool serve`` adds: latency at a fixed request rate and requests/s at saturation,
streaming and not, against the fake upstream on loopback; direct to the upstream is the baseline
measured in the same run (and LiteLLM's proxy beside it, with ``--litellm``).

Every server runs in its own process (upstream, gateway, LiteLLM), so the load generator, the
gateway and the upstream do not share an interpreter. The client is a raw ``httpx2`` one: the same
cost on every path, so the differences are the servers'.

Run: .venv/bin/python benchmarks/bench_gateway.py [--quick] [--litellm]
``--litellm`` installs ``litellm[proxy]`` into ``.venv/bench-litellm`` (its own environment) if
it is not there, and configures it with the same keys and upstream.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx2

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ("sk-bench-1", "sk-bench-2", "sk-bench-3", "sk-bench-4")
CALLER = "kp-0000bbbb-benchmark-caller-key-xyz"
MESSAGES = [{"role": "user", "content": "one two three four five six seven eight"}]
LITELLM_VENV = ROOT / ".venv" / "bench-litellm"

_UPSTREAM = """
import sys, uvicorn
from keypool.testing import FakeUpstream
uvicorn.run(FakeUpstream({secrets!r}), host="127.0.0.1", port=int(sys.argv[1]),
            log_level="warning", access_log=False)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(port: int, process: subprocess.Popen[bytes], seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"a benchmark server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {seconds} s")


@contextmanager
def process(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def gateway_config(directory: Path, upstream: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from providers.gateway import hash_caller_key

    keys = ", ".join(f'{{ secret = "{s}", key_id = "k{i}" }}' for i, s in enumerate(SECRETS, 1))
    path = directory / "gateway.toml"
    path.write_text(
        f"""
[[providers]]
name = "fake"
base_url = "{upstream}/v1"
keys = [{keys}]

[models.chat]
routes = [{{ provider = "fake", model = "gpt-4o-mini" }}]

[[callers]]
name = "bench"
key_hash = "{hash_caller_key(CALLER)}"
"""
    )
    return path


def litellm_config(directory: Path, upstream: str) -> Path:
    deployments = [
        {
            "model_name": "chat",
            "litellm_params": {
                "model": "openai/gpt-4o-mini",
                "api_base": f"{upstream}/v1",
                "api_key": secret,
            },
        }
        for secret in SECRETS
    ]
    config = {"model_list": deployments, "general_settings": {"master_key": CALLER}}
    path = directory / "litellm.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(config))
    return path


def ensure_litellm() -> Path | None:
    binary = LITELLM_VENV / "bin" / "litellm"
    if binary.exists():
        return binary
    print("installing litellm[proxy] into .venv/bench-litellm ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    done = subprocess.run(
        [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=False, timeout=1200
    )
    return binary if done.returncode == 0 and binary.exists() else None


@dataclass
class Target:
    name: str
    url: str
    key: str
    model: str


def body(target: Target, stream: bool) -> bytes:
    return json.dumps({"model": target.model, "messages": MESSAGES, "stream": stream}).encode()


async def one(http: httpx2.AsyncClient, target: Target, payload: bytes) -> float:
    start = time.perf_counter()
    async with http.stream(
        "POST",
        f"{target.url}/v1/chat/completions",
        content=payload,
        headers={"Authorization": f"Bearer {target.key}", "content-type": "application/json"},
    ) as response:
        async for _ in response.aiter_raw():
            pass
        if response.status_code != 200:
            raise RuntimeError(f"{target.name}: HTTP {response.status_code}")
    return time.perf_counter() - start


async def fixed_rate(target: Target, rate: float, count: int, stream: bool) -> list[float]:
    payload = body(target, stream)
    latencies: list[float] = []
    limits = httpx2.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx2.AsyncClient(limits=limits, timeout=30) as http:
        for _ in range(20):
            await one(http, target, payload)  # warm connections and caches
        start = time.perf_counter()

        async def at(i: int) -> None:
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            latencies.append(await one(http, target, payload))

        async with anyio.create_task_group() as group:
            for i in range(count):
                group.start_soon(at, i)
    return latencies


async def saturate(target: Target, count: int, concurrency: int, stream: bool) -> float:
    payload = body(target, stream)
    remaining = iter(range(count))
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(limits=limits, timeout=60) as http:
        for _ in range(20):
            await one(http, target, payload)

        async def worker() -> None:
            for _ in remaining:
                await one(http, target, payload)

        start = time.perf_counter()
        async with anyio.create_task_group() as group:
            for _ in range(concurrency):
                group.start_soon(worker)
        return count / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer requests: the same shape in seconds")
    parser.add_argument("--litellm", action="store_true", help="also measure LiteLLM's proxy")
    parser.add_argument("--rate", type=float, default=50.0, help="the fixed rate, requests/s")
    args = parser.parse_args()
    count = 100 if args.quick else 400
    burst = 300 if args.quick else 1500
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        up_port, gw_port = free_port(), free_port()
        upstream_code = _UPSTREAM.format(secrets=SECRETS)
        with process([python, "-c", upstream_code, str(up_port)], up_port) as upstream:
            config = gateway_config(Path(tmp), upstream)
            serve = [python, "-m", "providers.cli", "serve", "--config", str(config), "--port", str(gw_port)]
            targets = [Target("direct", upstream, SECRETS[0], "gpt-4o-mini")]
            with process(serve, gw_port, {"KEYPOOL_ADMIN_TOKEN": "bench-admin-token-000000000000"}) as gw:
                targets.append(Target("keypool serve", gw, CALLER, "chat"))
                litellm = ensure_litellm() if args.litellm else None
                if args.litellm and litellm is None:
                    print("LiteLLM proxy: could not be installed; not measured")
                if litellm is not None:
                    lt_port = free_port()
                    lt_args = [str(litellm), "--config", str(litellm_config(Path(tmp), upstream))]
                    lt_env = {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
                    with process(
                        [*lt_args, "--port", str(lt_port), "--num_workers", "1"], lt_port, lt_env
                    ) as lt:
                        targets.append(Target("LiteLLM proxy", lt, CALLER, "chat"))
                        report(targets, args.rate, count, burst)
                else:
                    report(targets, args.rate, count, burst)


def report(targets: list[Target], rate: float, count: int, burst: int) -> None:
    print(f"fixed rate {rate:g} req/s x {count} requests; saturation {burst} requests at concurrency 32")
    for stream in (False, True):
        kind = "stream" if stream else "whole"
        base_lat = anyio.run(fixed_rate, targets[0], rate, count, stream)
        base_rps = anyio.run(saturate, targets[0], burst, 32, stream)
        p50, p99 = pct(base_lat, 0.5), pct(base_lat, 0.99)
        print(f"[{kind}] {targets[0].name:14s} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  {base_rps:8.0f} req/s")
        for target in targets[1:]:
            lat = anyio.run(fixed_rate, target, rate, count, stream)
            rps = anyio.run(saturate, target, burst, 32, stream)
            t50, t99 = pct(lat, 0.5), pct(lat, 0.99)
            print(
                f"[{kind}] {target.name:14s} p50 {t50:7.2f} ms  p99 {t99:7.2f} ms  {rps:8.0f} req/s"
                f"  (added p50 {t50 - p50:+.2f} ms, p99 {t99 - p99:+.2f} ms;"
                f" {rps / base_rps:.2f}x direct req/s)"
            )
        if len(targets) > 2:
            gw_rps = anyio.run(saturate, targets[1], burst, 32, stream)
            lt_rps = anyio.run(saturate, targets[2], burst, 32, stream)
            print(f"[{kind}] keypool serve / LiteLLM proxy req/s: {gw_rps / lt_rps:.2f}x")
        print(f"[{kind}] median of latencies: direct {statistics.median(base_lat) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
