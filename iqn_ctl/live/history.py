"""Stall history on disk (SQLite), bounded and kept across agent restarts.

Why SQLite: ``iqn-ctl stalls`` must work with no agent running, several agents
(one per interface) may write at once, and a crash (even SIGKILL) must not lose
or corrupt what was already recorded. SQLite in WAL mode gives all three with
no extra service. The table is bounded (newest ``max_rows`` kept) so a router
that runs for years never fills its disk.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from iqn_ctl.errors import IqnError

DEFAULT_STATE_DIR = Path(os.environ.get("IQN_STATE_DIR", "/var/lib/iqn"))
DB_NAME = "stalls.sqlite"
#: newest stalls kept; at ~100 bytes a row this is ~10 MB
DEFAULT_MAX_ROWS = 100_000
#: prune only every this many inserts: deleting is cheap but not free
_PRUNE_EVERY = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stalls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    iface TEXT NOT NULL,
    flow TEXT NOT NULL,
    client TEXT NOT NULL,
    server TEXT NOT NULL,
    start REAL NOT NULL,
    "end" REAL NOT NULL,
    candidates INTEGER NOT NULL,
    detected_at REAL NOT NULL,
    truncated INTEGER NOT NULL DEFAULT 0,
    estimator TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS stalls_start ON stalls (start);
"""


class HistoryError(IqnError):
    """The history cannot be opened or read; the message is for the user."""


@dataclass(frozen=True, slots=True)
class StallRecord:
    iface: str
    flow: str
    client: str
    server: str
    start: float
    end: float
    candidates: int
    detected_at: float
    truncated: bool = False
    estimator: str = ""

    @property
    def duration(self) -> float:
        return self.end - self.start

    def as_json(self) -> dict[str, object]:
        """The stall object of docs/contracts.md (flow, client, start, end, duration) plus extras."""
        d = asdict(self)
        out: dict[str, object] = {
            "flow": self.flow,
            "client": self.client,
            "start": self.start,
            "end": self.end,
            "duration": self.duration,
        }
        out.update({k: v for k, v in d.items() if k not in out})
        return out


def db_path(state_dir: Path) -> Path:
    return state_dir / DB_NAME


def _explain(path: Path, e: Exception) -> HistoryError:
    if isinstance(e, PermissionError) or "unable to open" in str(e) or "readonly" in str(e):
        if os.geteuid() != 0:
            return HistoryError(f"cannot open stall history {path}: permission denied (run as root)")
    return HistoryError(f"cannot open stall history {path}: {e}")


class History:
    """Append-only (plus pruning) store of ended stalls."""

    def __init__(self, state_dir: Path, max_rows: int = DEFAULT_MAX_ROWS, create: bool = True) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.path = db_path(state_dir)
        self.max_rows = max_rows
        self._since_prune = 0
        try:
            if create:
                # client addresses are personal data: only root reads them
                state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                old = os.umask(0o077)
                try:
                    self._db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
                finally:
                    os.umask(old)
            else:
                if not self.path.exists():
                    raise HistoryError(f"no stall history at {self.path} (no agent ran with this state dir)")
                self._db = sqlite3.connect(
                    f"file:{self.path}?mode=rw", uri=True, timeout=10.0, check_same_thread=False
                )
            if create:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                self._db.commit()
            else:
                self._db.execute("SELECT 1 FROM stalls LIMIT 1").fetchall()
        except (sqlite3.Error, OSError) as e:
            raise _explain(self.path, e) from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, records: Iterable[StallRecord]) -> int:
        """Store records in one transaction (one fsync per poll round, not per stall)."""
        rows = [
            (r.iface, r.flow, r.client, r.server, r.start, r.end, r.candidates, r.detected_at,
             int(r.truncated), r.estimator)
            for r in records
        ]
        if not rows:
            return 0
        with self._db:
            self._db.executemany(
                'INSERT INTO stalls (iface, flow, client, server, start, "end", candidates, '
                "detected_at, truncated, estimator) VALUES (?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
        self._since_prune += len(rows)
        if self._since_prune >= _PRUNE_EVERY or self._since_prune >= self.max_rows:
            self.prune()
        return len(rows)

    def prune(self) -> int:
        """Drop all but the newest ``max_rows`` stalls."""
        self._since_prune = 0
        with self._db:
            cur = self._db.execute(
                "DELETE FROM stalls WHERE id <= (SELECT MAX(id) FROM stalls) - ?", (self.max_rows,)
            )
        return cur.rowcount

    def query(self, iface: str | None = None, since: float | None = None) -> list[StallRecord]:
        """Stalls oldest first; ``since`` keeps those that end at or after it."""
        sql = (
            'SELECT iface, flow, client, server, start, "end", candidates, detected_at, truncated, '
            "estimator FROM stalls"
        )
        where: list[str] = []
        args: list[object] = []
        if iface is not None:
            where.append("iface = ?")
            args.append(iface)
        if since is not None:
            where.append('"end" >= ?')
            args.append(since)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start, id"
        try:
            rows = self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise HistoryError(f"cannot read stall history {self.path}: {e}") from None
        return [
            StallRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]), r[9]) for r in rows
        ]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM stalls").fetchone()[0])
