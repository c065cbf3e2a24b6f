"""Media lines: the input contract of the QoS service (sans-I/O).

A media line is one session's directed path through system components over a
measurement interval: ``n`` units sent (seconds of playback for IQN, packets for
VoIP), ``m`` of them good.  On the wire it is one JSON object per line::

    {"t": 1700000000, "path": ["subnet-a", "city-x", "srv-1"], "n": 600, "m": 588}

with optional ``client``, ``server``, ``router``, ``kind``.  A line may carry
``client``/``server`` addresses and no ``path``; a topology then resolves it
(see :mod:`iqn_qos.topology`); such a line has ``path == ()`` until resolved.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any

from .errors import QosError


@dataclass(frozen=True, slots=True)
class MediaLine:
    """One session's measurement: ``n`` units over ``path``, ``m`` of them good."""

    t: float
    path: tuple[str, ...]
    n: int
    m: int
    client: str | None = None
    server: str | None = None
    router: str | None = None
    kind: str | None = None

    @property
    def bad(self) -> int:
        return self.n - self.m


_OPTIONAL = ("client", "server", "router", "kind")
_KNOWN = {"t", "path", "n", "m", *_OPTIONAL}


def _int(obj: dict[str, Any], key: str, where: str) -> int:
    if key not in obj:
        raise QosError(f"{where}: missing {key!r}")
    v = obj[key]
    # bool is an int in Python; a count of True is a bug upstream, not a count.
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v != int(v):
        raise QosError(f"{where}: {key!r} must be a whole number, got {v!r}")
    if v < 0:
        raise QosError(f"{where}: {key!r} is negative ({int(v)})")
    return int(v)


def parse_line(text: str, where: str) -> MediaLine:
    """Parse one JSON line; every defect raises :class:`QosError` naming ``where``."""
    try:
        obj = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise QosError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise QosError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    t = obj.get("t")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise QosError(f"{where}: 't' must be a number (epoch seconds), got {t!r}")
    n = _int(obj, "n", where)
    m = _int(obj, "m", where)
    if m > n:
        raise QosError(f"{where}: m > n ({m} > {n})")
    if n == 0:
        # An empty measurement says nothing about any component; it is a bug upstream.
        raise QosError(f"{where}: empty measurement (n = 0)")
    opt: dict[str, str | None] = {}
    for k in _OPTIONAL:
        v = obj.get(k)
        if v is not None and not isinstance(v, str):
            raise QosError(f"{where}: {k!r} must be a string, got {v!r}")
        opt[k] = v
    raw_path = obj.get("path")
    if raw_path is None:
        if opt["client"] is None or opt["server"] is None:
            raise QosError(f"{where}: no 'path' and no 'client'/'server' to resolve one")
        path: tuple[str, ...] = ()
    else:
        if not isinstance(raw_path, list) or not raw_path:
            raise QosError(f"{where}: 'path' must be a non-empty list of component ids")
        if not all(isinstance(c, str) and c for c in raw_path):
            raise QosError(f"{where}: 'path' must hold non-empty strings")
        path = tuple(raw_path)
    return MediaLine(t=float(t), path=path, n=n, m=m, **opt)


def read_lines(stream: Iterable[str] | IO[str], name: str) -> Iterator[MediaLine]:
    """Yield media lines from a text stream; blank lines are skipped, errors name ``name:lineno``."""
    for i, text in enumerate(stream, 1):
        if text.strip():
            yield parse_line(text, f"{name}:{i}")


def to_json(line: MediaLine) -> str:
    """One JSON line per the input contract (optional fields only when set)."""
    d = asdict(line)
    out: dict[str, Any] = {"t": d["t"], "path": list(line.path), "n": line.n, "m": line.m}
    if not line.path:
        del out["path"]
    for k in _OPTIONAL:
        if d[k] is not None:
            out[k] = d[k]
    return json.dumps(out, separators=(",", ":"))
