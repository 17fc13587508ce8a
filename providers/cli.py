"""The ``keypool`` command: ``keypool demo`` and ``keypool serve-admin``.

It lives in ``providers`` because it composes both layers: the demo drives a DeepSeek client,
``serve-admin`` runs the core's admin API.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keypool", description="API key pools with a circuit breaker per key."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="watch a pool ride out a simulated outage (no keys, no network)")
    demo.add_argument("--seconds", type=float, default=40.0, help="how long to drive traffic")
    demo.add_argument("--quiet", action="store_true", help="no live display, summary only")
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
    return parser


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

        return run_demo(seconds=args.seconds, quiet=args.quiet)
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
