"""The daemon's log output: plain lines on a terminal, syslog priority prefixes when
stderr is the journal, JSON lines for log collectors.

- Under systemd, stderr is a stream to journald and `$JOURNAL_STREAM` names it
  (`device:inode`). journald reads a leading `<N>` as the line's priority, so
  `journalctl -p err` finds errors; it adds its own time stamp, so the line has none.
- `log_format: json` writes one object a line (`ts`, `level`, `logger`, `msg`, and the
  `extra` fields a record carries, such as the access log's), for Loki, Vector, Fluent
  Bit and the like.
- Otherwise `time LEVEL logger: message`, as before.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

FORMATS = ("text", "json")

# Python level → syslog priority (sd-daemon(3): <0> emerg ... <7> debug).
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

# Attributes every LogRecord has; the rest came from `extra=` and go into JSON lines.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


def _priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return _PRIORITY[logging.DEBUG]


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (stderr) is the journal stream systemd named in $JOURNAL_STREAM."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class JournalFormatter(logging.Formatter):
    """`<priority>logger: message`; each line of a multi-line message (a traceback)
    carries the prefix, so journald keeps the priority on all of them."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (RFC 3339, UTC, ms), level, logger, msg, the record's
    `extra` fields, and `exc` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def formatter(log_format: str = "text", stream: TextIO | None = None) -> logging.Formatter:
    """The formatter for `log_format` on `stream` (stderr): JSON when asked, the
    journal's priority prefixes when stderr is the journal, else plain text."""
    if log_format == "json":
        return JsonFormatter()
    if stderr_is_journal(stream):
        return JournalFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup(level: str = "info", log_format: str = "text") -> None:
    """Configure the root logger for the daemon (replaces handlers set before)."""
    if log_format not in FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, sys.stderr))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
