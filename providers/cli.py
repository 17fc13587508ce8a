"""The ``keypool`` command: ``demo``, ``serve``, ``serve-admin``, ``hash-key``, ``study`` and ``tune``.

It lives in ``providers`` because it composes both layers: the demo drives a DeepSeek client,
``serve`` runs the gateway, ``serve-admin`` runs the core's admin API alone, ``hash-key`` makes
caller keys for the gateway, ``study`` and ``tune`` run the core's simulator.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keypool", description="API key pools with a circuit breaker per key."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="watch a pool ride out a simulated outage (no keys, no network)")
    demo.add_argument("--seconds", type=float, default=40.0, help="how long to drive traffic")
    demo.add_argument("--quiet", action="store_true", help="no live display, summary only")
    demo.add_argument("--event-log", metavar="PATH", help="write the pool's events as JSON lines (for tune)")
    serve = sub.add_parser(
        "serve-admin",
        help="run the runbook's admin HTTP API for a configured pool",
        description="Serve the runbook's admin HTTP API (stats, reset, config, rotation, capacity,\n"
        "/metrics) for a pool built from --config or from the environment.",
        epilog=_serve_admin_environment(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", help="TOML file describing providers and keys")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument(
        "--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: %(default)s)"
    )
    serve.add_argument(
        "--protect-reads",
        action="store_true",
        help="make the read endpoints (stats, capacity, /metrics) need the admin token too",
    )
    serve.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="allow mutations without a token (only when bound to loopback)",
    )
    _gateway_parser(sub)
    study = sub.add_parser(
        "study", help="the threshold study: simulated and exact figures, JSON, plots, doc tables"
    )
    study.add_argument("--out", default="docs/threshold-study", help="directory for the JSON and PNGs")
    study.add_argument("--doc", default="docs/threshold-study.md", help="Markdown whose tables to regenerate")
    study.add_argument("--no-doc", action="store_true", help="leave the Markdown alone")
    study.add_argument("--no-plots", action="store_true", help="JSON only (no matplotlib needed)")
    study.add_argument("--quick", action="store_true", help="few seeds: the same shape in seconds")
    study.add_argument("--seed", type=int, default=0, help="first seed of every measurement")
    study.add_argument("--jobs", type=int, help="worker processes (default: up to 4 CPUs)")
    tune = sub.add_parser(
        "tune", help="rank breaker settings for your traffic: an event log, or --rate/--keys/--failure-rate"
    )
    tune.add_argument(
        "log", nargs="?", help="event log (JSON lines from keypool.EventLog / demo --event-log)"
    )
    tune.add_argument("--provider", help="which provider of the log (default: the busiest)")
    tune.add_argument("--rate", type=float, help="synthetic: requests per second")
    tune.add_argument("--keys", type=int, default=1, help="synthetic: number of keys")
    tune.add_argument("--failure-rate", type=float, default=0.0, help="synthetic: background failure rate")
    tune.add_argument("--latency", type=float, default=0.0, help="synthetic: seconds an answer takes")
    tune.add_argument("--thresholds", default="3,5,7,10", help="failure_threshold candidates")
    tune.add_argument("--timeouts", help="timeout candidates (default: 30,60,120 and the current one)")
    tune.add_argument("--success", help="success_threshold candidates (default: the current one)")
    tune.add_argument("--half-open", help="half_open_max_calls candidates (default: the current one)")
    tune.add_argument("--max-false-trips", type=float, default=1.0, help="false trips per day allowed")
    tune.add_argument("--seeds", type=int, default=12, help="simulated outages per candidate")
    tune.add_argument("--json", action="store_true", help="print the ranking as JSON")
    tune.add_argument("--no-progress", action="store_true")
    return parser


def _gateway_parser(sub: Any) -> None:
    gateway = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible gateway (without --config: an embedded demo, no keys needed)",
        description="Serve /v1/chat/completions, /v1/embeddings, /v1/responses and /v1/models through\n"
        "key pools with breakers and model routes, plus the admin API, /metrics and /healthz.",
        epilog=_serve_environment(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gateway.add_argument(
        "--config", help="gateway TOML: providers, models, callers (default: the embedded demo)"
    )
    gateway.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    gateway.add_argument(
        "--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)"
    )
    gateway.add_argument(
        "--workers", type=int, default=1, help="worker processes (above 1 needs KEYPOOL_REDIS_URL)"
    )
    gateway.add_argument(
        "--admin-port", type=int, help="serve the admin API and /metrics on this port instead"
    )
    gateway.add_argument(
        "--protect-reads", action="store_true", help="the admin read endpoints need the admin token too"
    )
    gateway.add_argument(
        "--insecure-no-token", action="store_true", help="admin changes without a token (loopback only)"
    )
    hash_key = sub.add_parser(
        "hash-key",
        help="make a caller key for the gateway and print the hash to put in its config",
        description="Without --stdin: make a new random caller key, print it and its hash.\n"
        "With --stdin: read a key you chose from standard input and print its hash only.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hash_key.add_argument("--stdin", action="store_true", help="hash the key read from standard input")


def _hash_key(args: argparse.Namespace) -> int:
    from keypool import ConfigError

    from .gateway import hash_caller_key, new_caller_key

    if args.stdin:
        key = sys.stdin.readline().strip()
        try:
            print(hash_caller_key(key))
        except ConfigError as exc:
            print(f"keypool hash-key: {exc}", file=sys.stderr)
            return 2
        return 0
    key = new_caller_key()
    print(f"key:      {key}    (give this to the caller; it is not stored anywhere)")
    print(f"key_hash: {hash_caller_key(key)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .gateway import GatewayOptions, serve_gateway

    return serve_gateway(
        GatewayOptions(
            config=args.config,
            host=args.host,
            port=args.port,
            workers=args.workers,
            admin_port=args.admin_port,
            protect_reads=args.protect_reads,
            insecure_no_token=args.insecure_no_token,
        )
    )


def _refusing_bad_input(command: str, run: Callable[[], int]) -> int:
    """Run a simulator command; bad input (a ConfigError naming the field) exits 2 with its message."""
    from keypool import ConfigError

    try:
        return run()
    except ConfigError as exc:
        print(f"keypool {command}: {exc}", file=sys.stderr)
        return 2


def _tune(args: argparse.Namespace) -> int:
    from keypool.sim._commands import tune_command

    return _refusing_bad_input(
        "tune",
        lambda: tune_command(
            log=args.log,
            provider=args.provider,
            rate=args.rate,
            keys=args.keys,
            failure_rate=args.failure_rate,
            latency=args.latency,
            thresholds=args.thresholds,
            timeouts=args.timeouts,
            successes=args.success,
            half_open=args.half_open,
            budget=args.max_false_trips,
            seeds=args.seeds,
            as_json=args.json,
            progress=not args.no_progress,
        ),
    )


def _study(args: argparse.Namespace) -> int:
    from keypool.sim._commands import study_command

    return _refusing_bad_input(
        "study",
        lambda: study_command(
            out=args.out,
            doc=None if args.no_doc else args.doc,
            quick=args.quick,
            seed=args.seed,
            jobs=args.jobs,
            plots=not args.no_plots,
        ),
    )


def _serve_environment() -> str:
    """The gateway help's last section: the variables serve reads."""
    from keypool._serve import TOKEN_ENV

    return "\n".join(
        [
            "environment:",
            f"  {TOKEN_ENV}",
            "      the admin token (required with --config unless --insecure-no-token on loopback)",
            "  KEYPOOL_REDIS_URL",
            "      share breakers, throttles and admin changes across workers and hosts",
            "      (required for --workers above 1)",
            "  the variables the config's keys_env / secret_env fields name",
        ]
    )


def _serve_admin_environment() -> str:
    """The help's last section: the variables serve-admin reads."""
    from keypool._serve import ENV_PROVIDERS, TOKEN_ENV

    lines = [
        "environment:",
        f"  {TOKEN_ENV}",
        "      the admin token, required (unless --insecure-no-token on a loopback host):",
        "      every change, and with --protect-reads every read, needs",
        "      'Authorization: Bearer <token>'",
    ]
    for keys, backups in ENV_PROVIDERS.values():
        lines += [f"  {keys}, {backups}", "      comma-separated secrets, read when no --config is given"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(seconds=args.seconds, quiet=args.quiet, event_log=args.event_log)
    if args.command == "study":
        return _study(args)
    if args.command == "tune":
        return _tune(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "hash-key":
        return _hash_key(args)
    from keypool._serve import serve_admin

    return serve_admin(
        config=args.config,
        host=args.host,
        port=args.port,
        insecure_no_token=args.insecure_no_token,
        protect_reads=args.protect_reads,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
