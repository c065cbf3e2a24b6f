"""The paper's text formats: candidate timestamps, ground-truth stalls, the
end-user agent's screenshot log, and our one-JSON-object-per-line stall records.

Readers fail with :class:`TraceError` naming the file and line, so a truncated
or garbled file gives the user one clear line instead of a traceback.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import numpy.typing as npt

from iqn_ctl.errors import IqnError


class TraceError(IqnError, ValueError):
    """A trace file that cannot be read; the message names file and line."""


@dataclass(frozen=True, slots=True)
class Stall:
    """A stall interval in epoch seconds, real or inferred."""

    start: float
    end: float
    flow: str = "trace"
    client: str = "trace"
    #: candidates the engine attributed to an inferred stall (None: not known)
    candidates: int | None = field(default=None, compare=False)
    #: what the --bulk-ratio check of an inferred stall found (iqn_ctl.engine.discard), None: not run
    bulk_check: str | None = field(default=None, compare=False)

    @property
    def duration(self) -> float:
        return self.end - self.start


def check_regular(path: str | Path) -> None:
    """Fail unless ``path`` is a regular file: reading a FIFO or a terminal
    would wait forever for a writer, and a device may never end."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise TraceError(f"{path}: is a directory, expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise TraceError(f"{path}: not a regular file (a FIFO or a device?); give a file, or - for stdin")


def _lines(path: str | Path) -> list[str]:
    check_regular(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text file") from None


def _epoch(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise TraceError(f"{where}: expected an epoch time in seconds, got {text[:40]!r}") from None
    if not math.isfinite(v):
        raise TraceError(f"{where}: time is not finite: {text[:40]!r}")
    return v


class TimestampLog(NamedTuple):
    """Candidate arrival times read from a timestamp file, in time order."""

    times: npt.NDArray[np.float64]
    #: lines dropped as repeats of an earlier line (see read_timestamp_log)
    repeats: int
    #: lines read (non-blank)
    lines: int

    def warning(self, path: str | Path) -> str | None:
        """One line for the user when lines were dropped, else None."""
        if not self.repeats:
            return None
        return (
            f"{path}: not in time order, read as repeated dumps of one arrival log: "
            f"dropped {self.repeats} repeated timestamp(s), kept {self.times.size} distinct"
        )


def read_timestamp_log(path: str | Path) -> TimestampLog:
    """``timestamp_of_candidate.txt``: one epoch float per line (blank lines ignored).

    A file in time order is an arrival log: every line is one packet, even two
    lines with the same time (two packets stamped in the same instant; the
    paper's news and music traces hold 5 such pairs, and its published figures
    count both). A file out of order is not a log the capture could have
    written; the paper's agent made such files by dumping its whole list again
    and again (``operational_example``: 4,903 lines, 309 distinct times), and
    counting every copy would inflate the count estimator's durations. Such a
    file is read as the set of its distinct times; ``repeats`` says how many
    lines that dropped. Either way the times come back sorted, so the order of
    distinct lines never matters.
    """
    out: list[float] = []
    for i, line in enumerate(_lines(path), 1):
        s = line.strip()
        if s:
            out.append(_epoch(s, f"{path}:{i}"))
    t = np.asarray(out, dtype=np.float64)
    if t.size < 2 or bool(np.all(t[1:] >= t[:-1])):
        return TimestampLog(t, 0, t.size)
    distinct = np.unique(t)
    return TimestampLog(distinct, t.size - distinct.size, t.size)


def read_timestamps(path: str | Path) -> npt.NDArray[np.float64]:
    """The sorted arrival times of a timestamp file (:func:`read_timestamp_log`)."""
    return read_timestamp_log(path).times


def looks_like_timestamps(path: str | Path) -> bool:
    """True when the file starts as text (a capture's magic never is), so it is
    read as a timestamp file, whose reader says which line is wrong ("nan",
    a word) rather than calling it a capture with a strange magic.
    False for anything but a regular file (never opens a FIFO)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    try:  # not final: the head may end inside a multi-byte character
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return bool(text) and all(c.isprintable() or c in "\t\r\n" for c in text)


def read_real_stalls(path: str | Path) -> list[Stall]:
    """``Real_stalls.txt``: ``S-<epoch>`` / ``E-<epoch>`` lines, alternating.

    A trailing ``S-`` with no ``E-`` (recording stopped mid-stall) is dropped:
    its duration is unknown, so it can be neither matched nor scored.
    """
    stalls: list[Stall] = []
    open_at: float | None = None
    for i, line in enumerate(_lines(path), 1):
        s = line.strip()
        if not s:
            continue
        where = f"{path}:{i}"
        kind, _, val = s.partition("-")
        if kind not in ("S", "E") or not val:
            raise TraceError(f"{where}: expected 'S-<epoch>' or 'E-<epoch>', got {s[:40]!r}")
        t = _epoch(val, where)
        if kind == "S":
            if open_at is not None:
                raise TraceError(f"{where}: two stall starts in a row")
            open_at = t
        else:
            if open_at is None:
                raise TraceError(f"{where}: stall end without a start")
            if t < open_at:
                raise TraceError(f"{where}: stall ends before it starts")
            stalls.append(Stall(open_at, t))
            open_at = None
    return stalls


def write_real_stalls(stalls: Iterable[Stall], out: IO[str]) -> None:
    for st in stalls:
        out.write(f"S-{st.start!r}\nE-{st.end!r}\n")


def read_detected_clicks(path: str | Path) -> list[tuple[str, float]]:
    """``Detected_clicks_<p>.txt``: ``S-<epoch>`` (signal sent) or ``N-<epoch>``."""
    out: list[tuple[str, float]] = []
    for i, line in enumerate(_lines(path), 1):
        s = line.strip()
        if not s:
            continue
        kind, _, val = s.partition("-")
        if kind not in ("S", "N") or not val:
            raise TraceError(f"{path}:{i}: expected 'S-<epoch>' or 'N-<epoch>', got {s[:40]!r}")
        out.append((kind, _epoch(val, f"{path}:{i}")))
    return out


def stall_to_json(st: Stall, **extra: object) -> str:
    rec: dict[str, object] = {
        "flow": st.flow,
        "client": st.client,
        "start": st.start,
        "end": st.end,
        "duration": st.duration,
    }
    if st.candidates is not None:
        rec["candidates"] = st.candidates
    if st.bulk_check is not None:
        rec["bulk_check"] = st.bulk_check
    rec.update(extra)
    return json.dumps(rec)


def read_stall_lines(lines: Iterable[str], name: str = "<stdin>") -> list[Stall]:
    """Stalls as ``replay --json`` / ``stalls --json`` print them (one object per line)."""
    out: list[Stall] = []
    for i, line in enumerate(lines, 1):
        s = line.strip()
        if not s:
            continue
        try:
            rec = json.loads(s)
            start, end = float(rec["start"]), float(rec["end"])
        # OverflowError: an integer too large for a float; RecursionError: nesting
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            raise TraceError(
                f"{name}:{i}: expected a JSON stall with 'start' and 'end', got {s[:60]!r}"
            ) from None
        if not (math.isfinite(start) and math.isfinite(end)) or end < start:
            raise TraceError(f"{name}:{i}: stall has bad times: {s[:60]!r}")
        out.append(Stall(start, end, str(rec.get("flow", "trace")), str(rec.get("client", "trace"))))
    return out
