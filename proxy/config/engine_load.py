"""The ``engine:`` block of a provider in routes.yaml → ``EngineSpec``, errors with YAML paths.

It uses the same reader as the rest of routes.yaml (``proxy.config.load``), so an
error here reads like any other: ``providers.local.engine.replicas: must be …``.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol

from proxy.config.engine import START_MODES, EngineSpec, QueueSpec, ReadyCheck, RestartPolicy

ENGINE_KEYS = {
    "command",
    "port",
    "host",
    "api_path",
    "replicas",
    "start",
    "ready",
    "restart",
    "wait",
    "idle_unload",
    "stop_timeout",
    "metrics_path",
    "env",
    "slots",
    "queue",
}
QUEUE_KEYS = {"max", "wait"}
# The launcher's flag for the calls llama.cpp serves at once (engines/llamacpp.py).
_PARALLEL_FLAGS = ("--parallel", "-np")
READY_KEYS = {"path", "timeout", "interval"}
RESTART_KEYS = {"base_delay", "max_delay"}


class Reader(Protocol):
    def error(self, path: str, message: str) -> None: ...
    def mapping(self, raw: Any, path: str, allowed: set[str] | None = None) -> dict[str, Any]: ...
    def string(self, raw: Any, path: str, allow_empty: bool = False) -> str | None: ...
    def duration(self, raw: Any, path: str) -> float | None: ...
    def headers(self, raw: Any, path: str) -> Any: ...


def read_engine(reader: Reader, raw: Any, path: str) -> EngineSpec | None:
    node = reader.mapping(raw, path, ENGINE_KEYS)
    command = _command(reader, node.get("command"), f"{path}.command")
    default = EngineSpec(command=())
    spec = EngineSpec(
        command=command or (),
        port=_port(reader, node.get("port", "auto"), f"{path}.port"),
        host=reader.string(node.get("host", default.host), f"{path}.host") or default.host,
        api_path=_path(reader, node.get("api_path", default.api_path), f"{path}.api_path"),
        replicas=_count(reader, node.get("replicas", 1), f"{path}.replicas"),
        start=_start(reader, node.get("start", default.start), f"{path}.start"),
        ready=_ready(reader, node.get("ready"), f"{path}.ready"),
        restart=_restart(reader, node.get("restart"), f"{path}.restart"),
        wait=_seconds(reader, node, "wait", default.wait, path),
        idle_unload=_idle(reader, node.get("idle_unload"), f"{path}.idle_unload"),
        stop_timeout=_seconds(reader, node, "stop_timeout", default.stop_timeout, path),
        metrics_path=_optional_path(reader, node.get("metrics_path"), f"{path}.metrics_path"),
        env=reader.headers(node.get("env"), f"{path}.env"),
        slots=_slots(reader, node, command or (), path),
        queue=_queue(reader, node.get("queue"), f"{path}.queue"),
    )
    return spec if command else None


def _command(reader: Reader, raw: Any, path: str) -> tuple[str, ...] | None:
    if not isinstance(raw, list) or not raw:
        reader.error(path, "must be a non-empty list of strings (the program and its arguments)")
        return None
    parts = [reader.string(item, f"{path}[{i}]") for i, item in enumerate(raw)]
    if any(part is None for part in parts):
        return None
    return tuple(part for part in parts if part is not None)


def _port(reader: Reader, raw: Any, path: str) -> int | None:
    if raw == "auto":
        return None
    if isinstance(raw, int) and not isinstance(raw, bool) and 1 <= raw <= 65535:
        return raw
    reader.error(path, f"must be 'auto' or a port number 1-65535, got {raw!r}")
    return None


def _count(reader: Reader, raw: Any, path: str) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool) and 1 <= raw <= 64:
        return raw
    reader.error(path, f"must be a whole number from 1 to 64, got {raw!r}")
    return 1


def _start(reader: Reader, raw: Any, path: str) -> str:
    if raw in START_MODES:
        return str(raw)
    reader.error(path, f"must be one of {', '.join(START_MODES)}, got {raw!r}")
    return "boot"


def _path(reader: Reader, raw: Any, path: str) -> str:
    value = reader.string(raw, path, allow_empty=True)
    if value is None:
        return ""
    if value and not value.startswith("/"):
        reader.error(path, f"must start with '/', got {value!r}")
    return value.rstrip("/")


def _optional_path(reader: Reader, raw: Any, path: str) -> str | None:
    return None if raw is None else _path(reader, raw, path) or "/"


def _seconds(reader: Reader, node: dict[str, Any], key: str, default: float, path: str) -> float:
    if key not in node:
        return default
    value = reader.duration(node[key], f"{path}.{key}")
    return default if value is None else value


def _idle(reader: Reader, raw: Any, path: str) -> float | None:
    if raw is None or raw == "never":
        return None
    return reader.duration(raw, path)


def _ready(reader: Reader, raw: Any, path: str) -> ReadyCheck:
    node = reader.mapping(raw or {}, path, READY_KEYS)
    default = ReadyCheck()
    return ReadyCheck(
        path=_path(reader, node.get("path", default.path), f"{path}.path") or "/",
        timeout=_seconds(reader, node, "timeout", default.timeout, path),
        interval=_seconds(reader, node, "interval", default.interval, path),
    )


def _restart(reader: Reader, raw: Any, path: str) -> RestartPolicy:
    node = reader.mapping(raw or {}, path, RESTART_KEYS)
    default = RestartPolicy()
    base = _seconds(reader, node, "base_delay", default.base_delay, path)
    most = _seconds(reader, node, "max_delay", default.max_delay, path)
    if most < base:
        reader.error(f"{path}.max_delay", "must not be shorter than base_delay")
    return RestartPolicy(base_delay=base, max_delay=most)


def _slots(reader: Reader, node: dict[str, Any], command: tuple[str, ...], path: str) -> int:
    """``slots`` as written, else the command's ``--parallel N`` or ``--parallel=N``
    (llama.cpp), else 1."""
    if "slots" in node:
        return _count(reader, node["slots"], f"{path}.slots")
    joined = [part.split("=", 1) for part in command if "=" in part]
    for flag, value in [*itertools.pairwise(command), *joined]:
        if flag in _PARALLEL_FLAGS and value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def _queue(reader: Reader, raw: Any, path: str) -> QueueSpec:
    node = reader.mapping(raw or {}, path, QUEUE_KEYS)
    default = QueueSpec()
    most = node.get("max", default.max)
    if isinstance(most, bool) or not isinstance(most, int) or not 0 <= most <= 100_000:
        reader.error(f"{path}.max", f"must be a whole number from 0 to 100000, got {most!r}")
        most = default.max
    return QueueSpec(max=most, wait=_seconds(reader, node, "wait", default.wait, path))
