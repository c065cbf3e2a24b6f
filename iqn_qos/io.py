"""Reading media lines from files or stdin, resolving paths through a topology.

Everything is read and checked before anything is used, so one bad line stops
the run with one error naming ``<file>:<line>`` and nothing half-done.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import QosError
from .lines import MediaLine, parse_line
from .topology import Topology


def source_name(source: str) -> str:
    return "<stdin>" if source == "-" else source


def read_media_lines(source: str, topology: Topology | None = None) -> list[MediaLine]:
    """All lines of ``source`` (a path or ``-``), paths resolved/validated against ``topology``."""
    name = source_name(source)
    try:
        stream = sys.stdin if source == "-" else Path(source).open(encoding="utf-8")
    except FileNotFoundError:
        raise QosError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise QosError(f"{name}: is a directory, expected media lines (JSON lines)") from None
    except OSError as e:
        raise QosError(f"{name}: {e.strerror}") from None
    out: list[MediaLine] = []
    known = topology.components if topology is not None else None
    try:
        for i, text in enumerate(stream, 1):
            if not text.strip():
                continue
            where = f"{name}:{i}"
            ln = parse_line(text, where)
            if not ln.path:
                if topology is None:
                    raise QosError(f"{where}: no 'path'; give --topology to resolve client/server")
                try:
                    path = topology.resolve(ln.client or "", ln.server or "")
                except QosError as e:
                    raise QosError(f"{where}: {e}") from None
                ln = MediaLine(ln.t, path, ln.n, ln.m, ln.client, ln.server, ln.router, ln.kind)
            elif known is not None:
                for c in ln.path:
                    if c not in known:
                        raise QosError(f"{where}: unknown component {c!r} (not in the topology)")
            out.append(ln)
    except UnicodeDecodeError:
        raise QosError(f"{name}: not a text file (expected JSON lines)") from None
    finally:
        if stream is not sys.stdin:
            stream.close()
    if not out:
        raise QosError(f"{name}: no media lines (empty input)")
    return out
