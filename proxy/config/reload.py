"""The running config and its hot reload (file change or SIGHUP).

A request reads ``holder.current`` once when it starts and keeps that object, so a
swap never changes a call in flight. A new file is validated as a whole before it
replaces the old one; a bad file is refused with every error in the log. A file the
worker's address must not serve (no teams on a public address) is refused the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from proxy.config.changes import describe_changes
from proxy.config.exposure import Exposure, load_to_serve
from proxy.config.load import ConfigError
from proxy.config.model import Config

log = logging.getLogger(__name__)

Stamp = tuple[int, int, int] | None


def _stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)  # follows symlinks: a Kubernetes ConfigMap swap shows here
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ConfigHolder:
    def __init__(self, config: Config, path: Path | None = None, exposure: Exposure | None = None):
        self.current = config
        self.path = path
        # Where this worker listens: a reload must pass the same guard as the start.
        self.exposure = exposure or Exposure()
        self._stamp = _stamp(path) if path else None
        self.reloads = {"ok": 0, "error": 0}
        # Told the result of every reload (the app points it at its metrics).
        self.on_reload: Callable[[bool], None] | None = None
        log_warnings(config)

    def reload(self) -> bool:
        if self.path is None:
            return False
        self._stamp = _stamp(self.path)
        try:
            config = load_to_serve(self.path, self.exposure)
        except ConfigError as exc:
            return self._refuse(exc.errors)
        old, self.current = self.current, config
        self.reloads["ok"] += 1
        self._tell(True)
        log.info("config reloaded from %s: %s", self.path, describe_changes(old, config))
        log_warnings(config)
        return True

    def _refuse(self, errors: list[str]) -> bool:
        self.reloads["error"] += 1
        self._tell(False)
        log.error(
            "config reload of %s refused, the running config stays: %s",
            self.path,
            "; ".join(errors),
        )
        return False

    def _tell(self, ok: bool) -> None:
        if self.on_reload is not None:
            self.on_reload(ok)

    def file_changed(self) -> bool:
        return self.path is not None and _stamp(self.path) != self._stamp


def log_warnings(config: Config) -> None:
    for warning in config.warnings:
        log.warning("%s", warning)


async def watch_file(holder: ConfigHolder) -> None:
    """Poll the file's stamp: no extra dependency, and it sees ConfigMap symlink swaps."""
    while True:
        await asyncio.sleep(holder.current.server.reload_interval)
        if holder.file_changed():
            holder.reload()
