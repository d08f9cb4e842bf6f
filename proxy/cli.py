"""The command line: ``llm-proxy`` once installed, or ``python -m proxy``."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import TextIO, TypeAlias

import yaml

from proxy.call.auth import key_hash, new_key
from proxy.config.exposure import Exposure, load_to_serve
from proxy.config.load import ConfigError, load_config
from proxy.config.model import Config
from proxy.config.prices import unpriced
from proxy.config.teams import expiry_text, key_name_problem, parse_expiry
from proxy.limits.ledger_file import LedgerFile, LedgerFileError
from proxy.observe.log_setup import FORMATS, setup_logging
from proxy.observe.worker_metrics import package_version
from proxy.server import ServeOptions, run_worker, supervise
from proxy.usage_cli import ADMIN_KEY_ENV, show_usage


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: int = args.run(args)
    return command


DESCRIPTION = (
    "An LLM routing proxy: one OpenAI-compatible endpoint in front of hosted providers "
    "and local engines, routed by routes.yaml."
)


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in --help, except where there is none to show (a flag
    that is off, an option that is unset unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _prog() -> str:
    """``llm-proxy`` when run as the installed command, else ``python -m proxy``."""
    return "llm-proxy" if Path(sys.argv[0]).name == "llm-proxy" else "python -m proxy"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_prog(), description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_serve(sub)
    check = sub.add_parser("check", help="validate a routes.yaml and print every error")
    check.add_argument("config", type=Path, help="the routes file to check")
    check.set_defaults(run=_check)
    _add_keygen(sub)
    _add_usage(sub)
    return parser


# What add_subparsers() returns (typeshed names its class; argparse has no public name).
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_serve(sub: Commands) -> None:
    serve = sub.add_parser("serve", help="run the proxy", formatter_class=_Defaults)
    serve.add_argument("--config", type=Path, default=Path("routes.yaml"), help="routes file")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)"
    )
    serve.add_argument("--port", type=int, default=8080, help="port to bind")
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
    serve.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING (no access log) or ERROR"
    )
    serve.add_argument(
        "--log-format",
        choices=FORMATS,
        default="plain",
        help="json: every line of stderr one JSON object (the access log is JSON either way)",
    )
    serve.set_defaults(run=_serve)


def _add_keygen(sub: Commands) -> None:
    keygen = sub.add_parser(
        "keygen", help="print a new key for a team, once, and its entry for routes.yaml"
    )
    keygen.add_argument("team", help="the team (under teams: in routes.yaml)")
    keygen.add_argument("--name", required=True, help="the key's name in the access log")
    keygen.add_argument(
        "--expires",
        metavar="DATE",
        help="YYYY-MM-DD (refused from 00:00 UTC that day), or an ISO date and time "
        "with its UTC offset (2026-01-31T18:00:00+01:00, or Z)",
    )
    keygen.set_defaults(run=_keygen)


def _add_usage(sub: Commands) -> None:
    usage = sub.add_parser(
        "usage", help="show the ledger of a running proxy", formatter_class=_Defaults
    )
    usage.add_argument("--url", default="http://127.0.0.1:8080", help="the running proxy")
    usage.add_argument("--team", help="one team (default: every team)")
    usage.add_argument("--from", dest="first", metavar="YYYY-MM-DD", help="first UTC day (today)")
    usage.add_argument("--to", dest="last", metavar="YYYY-MM-DD", help="last UTC day (today)")
    usage.add_argument("--by-key", action="store_true", help="a line per key that called")
    usage.add_argument(
        "--admin-key",
        help=f"routes.yaml's admin_key, or a team's key for its own usage (default: "
        f"${ADMIN_KEY_ENV}, never shown here)",
    )
    usage.set_defaults(run=show_usage)


def _serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
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
    if (problem := _ledger_problem(config)) is not None:
        print(problem, file=sys.stderr)
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


def _ledger_problem(config: Config) -> str | None:
    """Why the embedded ledger's file cannot be used (not a ledger, not writable), before
    any worker starts: a clear refusal, where serving on would lose what it holds."""
    path = config.accounting.ledger_path
    if config.redis.urls or path is None:
        return None
    file = LedgerFile(path)
    try:
        file.open(today=int(time.time() // 86400))
    except LedgerFileError as exc:
        return f"accounting.ledger_path: {exc} (move it away, or set another ledger_path)"
    file.close()
    return None


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
    problem = key_name_problem(args.name)
    if problem:
        print(f"--name {problem}", file=sys.stderr)
        return 2
    entry = {"name": _yaml_text(args.name)}
    expires = None
    if args.expires is not None:
        try:
            expires = parse_expiry(args.expires)
        except ValueError as exc:
            print(f"--expires {exc}", file=sys.stderr)
            return 2
        if expires <= time.time():
            print(f"--expires {expiry_text(expires)} has passed already", file=sys.stderr)
            return 2
    key = new_key()
    entry["hash"] = f'"{key_hash(key)}"'
    if expires is not None:
        entry["expires"] = f'"{expiry_text(expires)}"'
    until = f", expires at {expiry_text(expires)}" if expires is not None else ""
    print(f"key {args.name} for team {args.team}{until} (shown once, store it now): {key}")
    print(f"add its entry to teams.{args.team}.keys in routes.yaml (the key is stored nowhere):")
    fields = ", ".join(f"{name}: {value}" for name, value in entry.items())
    print(f"teams:\n  {_yaml_text(args.team)}:\n    keys:\n      - {{{fields}}}")
    return 0


def _yaml_text(text: str) -> str:
    """``text`` as a YAML flow scalar that reads back as this very string: plain when it
    is a plain word YAML reads as a string, in JSON's double quotes (valid YAML) if not."""
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9._@-]*", text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text)


def _print_errors(path: Path, exc: ConfigError, stream: TextIO) -> None:
    print(f"{path}: {len(exc.errors)} error(s)", file=stream)
    for error in exc.errors:
        print(error, file=stream)
