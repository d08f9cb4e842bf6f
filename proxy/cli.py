"""``python -m proxy serve|check``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TextIO

from proxy.call.auth import key_hash, new_key
from proxy.config.exposure import Exposure, load_to_serve
from proxy.config.load import ConfigError, load_config
from proxy.config.prices import unpriced
from proxy.observe import access_log
from proxy.server import ServeOptions, run_worker, supervise
from proxy.usage_cli import show_usage


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: int = args.run(args)
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m proxy", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", type=Path, default=Path("routes.yaml"))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds to let requests in flight finish on SIGTERM",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="let another proxy bind the same port (rolling restarts)",
    )
    serve.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="serve without team keys on a non-loopback address",
    )
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(run=_serve)

    check = sub.add_parser("check", help="validate a routes.yaml and print every error")
    check.add_argument("config", type=Path)
    check.set_defaults(run=_check)

    keygen = sub.add_parser("keygen", help="print a new key for a team, once")
    keygen.add_argument("team")
    keygen.set_defaults(run=_keygen)

    usage = sub.add_parser("usage", help="show the ledger of a running proxy")
    usage.add_argument("--url", default="http://127.0.0.1:8080")
    usage.add_argument("--team")
    usage.add_argument("--from", dest="first", metavar="YYYY-MM-DD")
    usage.add_argument("--to", dest="last", metavar="YYYY-MM-DD")
    usage.add_argument("--by-key", action="store_true", help="a line per key that called")
    usage.add_argument(
        "--admin-key",
        default=os.environ.get("PROXY_ADMIN_KEY", ""),
        help="default: $PROXY_ADMIN_KEY",
    )
    usage.set_defaults(run=show_usage)
    return parser


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(levelname)s %(name)s %(message)s",
    )
    _lean_log_records()
    access_log.install(logging.getLogger().level)
    try:
        config = load_to_serve(args.config, Exposure(args.host, args.allow_anonymous))
    except ConfigError as exc:
        _print_errors(args.config, exc, sys.stderr)
        return 2
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and args.port == 0:
        print("--workers > 1 needs a fixed --port for the workers to share", file=sys.stderr)
        return 2
    fixed = [p.name for p in config.providers.values() if p.engine and p.engine.port is not None]
    if args.workers > 1 and fixed:
        # Every worker runs its own engines; they cannot all bind the same port.
        print(f"--workers > 1 needs port: auto for engines ({', '.join(fixed)})", file=sys.stderr)
        return 2
    options = ServeOptions(
        config_path=args.config,
        host=args.host,
        allow_anonymous=args.allow_anonymous,
        port=args.port,
        workers=args.workers,
        shutdown_timeout=args.shutdown_timeout,
        reuse_port=args.reuse_port,
    )
    if args.workers == 1:
        run_worker(options)
        return 0
    return supervise(options)


def _lean_log_records() -> None:
    """Skip what every log record collects and the format above never shows (thread and
    multiprocessing names, the caller's file and line): there is one access-log line per
    call. The logging HOWTO's own advice ("Optimization"). The pid, a getpid() system
    call per record, is filled in only for the plain lines that print it."""
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    logging._srcfile = None
    for handler in logging.getLogger().handlers:
        handler.addFilter(_with_pid)


def _with_pid(record: logging.LogRecord) -> bool:
    record.process = os.getpid()  # not cached: --workers forks after this is set up
    return True


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _print_errors(args.config, exc, sys.stdout)
        return 1
    for warning in (*config.warnings, *unpriced(config)):
        print(f"warning: {warning}")
    print(f"{args.config}: OK ({len(config.providers)} providers, {len(config.models)} models)")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    key = new_key()
    print(f"key for team {args.team} (shown once, store it now): {key}")
    print("add its hash to routes.yaml:")
    print(f'teams:\n  {args.team}:\n    keys: ["{key_hash(key)}"]')
    return 0


def _print_errors(path: Path, exc: ConfigError, stream: TextIO) -> None:
    print(f"{path}: {len(exc.errors)} error(s)", file=stream)
    for error in exc.errors:
        print(error, file=stream)
