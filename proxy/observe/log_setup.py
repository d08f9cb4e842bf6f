"""How a serving process logs: plain lines (time, pid, level, logger, message) or, with
``--log-format json``, one JSON object per line for every record. The access log is
JSON in both (observe/access_log.py), so with ``json`` every line of stderr parses."""

from __future__ import annotations

import json
import logging
import os
import sys

from proxy.observe import access_log

FORMATS = ("plain", "json")
_PLAIN = "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "pid", "message"}``, and ``"exception"`` when there is
    one: ``ts`` in seconds since the epoch, as the access log's lines have it."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging(level: str, form: str = "plain") -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=_PLAIN)
    for handler in logging.getLogger().handlers:
        if form == "json":
            handler.setFormatter(JsonFormatter())
        handler.addFilter(_with_pid)
    _lean_log_records()
    access_log.install(logging.getLogger().level)


def _lean_log_records() -> None:
    """Skip what every log record collects and the formats above never show (thread and
    multiprocessing names, the caller's file and line): there is one access-log line per
    call. The logging HOWTO's own advice ("Optimization"). The pid, a getpid() system
    call per record, is filled in only for the lines that show it (``_with_pid``)."""
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    logging._srcfile = None


def _with_pid(record: logging.LogRecord) -> bool:
    record.process = os.getpid()  # not cached: --workers forks after this is set up
    return True
