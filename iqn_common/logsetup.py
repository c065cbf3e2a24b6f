"""How the long-running commands log (``iqn-ctl attach``, ``iqn-qos serve``): ``--log-level`` and
``--log-format text|json``.

- ``text``: ``<time> <LEVEL> <message>``, one line per record; when stderr is
  the systemd journal the time is left out (the journal stamps every line
  itself, and a second stamp only doubles it). systemd says so by setting
  ``JOURNAL_STREAM`` to ``<device>:<inode>`` of the stream it connected; the
  variable is inherited by children whose stderr may go elsewhere, so it counts
  only when it matches stderr itself (systemd.exec(5)).
- ``json``: one JSON object per line, ``{"ts": RFC 3339 UTC with ms, "level":
  "info", "logger": "iqn.agent", "msg": "...", ...}`` plus every extra field the
  code attached to the record (``extra={"flow": ...}``) and ``exc`` for a
  traceback: for log shippers that parse lines (Loki, Elasticsearch, jq).

Both commands share this module, so they print the same shapes
(tests/test_version_logging.py checks both). A bad flag raises the caller's own
error class (``error=``), which its command turns into one line.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("text", "json")
DEFAULT_LEVEL, DEFAULT_FORMAT = "info", "text"
#: what every LogRecord has: anything else on a record is an extra field
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def check(level: str, fmt: str, error: type[Exception] = ValueError) -> tuple[int, str]:
    """The level number and format, or ``error`` with one line naming the flag."""
    lv = LEVELS.get(level.lower())
    if lv is None:
        raise error(f"--log-level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise error(f"--log-format must be text or json, got {fmt!r}")
    return lv, fmt


def stderr_is_journal(env: dict[str, str] | None = None) -> bool:
    """Whether fd 2 is the stream systemd connected to the journal."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD and k not in out:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(fmt: str, stamped: bool = True) -> logging.Formatter:
    """The formatter of ``--log-format``; ``stamped``: text lines carry their time."""
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter(("%(asctime)s " if stamped else "") + "%(levelname)s %(message)s")


def configure(level: str = DEFAULT_LEVEL, fmt: str = DEFAULT_FORMAT,
              handler: logging.Handler | None = None) -> None:
    """Route the root logger to ``handler`` (default stderr) with the chosen
    level and format. A file handler (the daemon's log) keeps its stamps."""
    lv, fmt = check(level, fmt)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter(fmt, stamped=not stderr_is_journal()))
    else:
        handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lv)
