"""Stall history on disk (SQLite), bounded and kept across agent restarts.

Why SQLite: ``iqn-ctl stalls`` must work with no agent running, several agents
(one per interface) may write at once, and a crash (even SIGKILL) must not lose
or corrupt what was already recorded. SQLite in WAL mode gives all three with
no extra service. The table is bounded (newest ``max_rows`` kept) so a router
that runs for years never fills its disk.

Nothing lost (docs/agent.md, "The stall history"): a stall is written when it
starts (state ``open``) and completed when it ends, so one still open when the
agent is SIGKILLed is found by the next agent on that interface and marked
``interrupted``. Writes that fail (a full disk, an I/O error) are kept in
memory, bounded, and retried; every commit is synchronous (``FULL``), and a
damaged file is noticed when the agent starts and moved aside.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

from iqn_ctl.errors import IqnError

DEFAULT_STATE_DIR = Path(os.environ.get("IQN_STATE_DIR", "/var/lib/iqn"))
DB_NAME = "stalls.sqlite"
#: newest stalls kept; at ~100 bytes a row this is ~10 MB
DEFAULT_MAX_ROWS = 100_000
#: prune only every this many inserts: deleting is cheap but not free
_PRUNE_EVERY = 256
#: writes (stall starts, ends, discards) held in memory while the history cannot be
#: written; at ~300 bytes each this is ~3 MB. Past it the oldest are dropped, counted.
MAX_PENDING = 10_000
#: seconds between attempts to write what is held
RETRY_EVERY = 1.0
#: ``state`` of a stall record: ``open`` (written when it started, the agent still
#: running), ``ended`` and ``interrupted`` (the agent died while it was open)
STATES = ("open", "ended", "interrupted")

log = logging.getLogger("iqn.history")

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
    estimator TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'ended',
    bulk_check TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS stalls_start ON stalls (start);
"""
#: columns added since the first release, with their definitions: a history written
#: by an older agent gets them (and their defaults) when it is opened
_ADDED_COLUMNS = {"state": "TEXT NOT NULL DEFAULT 'ended'", "bulk_check": "TEXT NOT NULL DEFAULT ''"}

# -- the export outbox (iqn_ctl.live.export) ---------------------------------------
#: tables whose rows the live export ships; a row is waiting while ``exported_at`` is NULL
OUTBOX_TABLES = ("stalls", "sessions")
#: the ``meta`` key of the random id that makes export message ids unique across files
UUID_KEY = "history_uuid"


def ensure_outbox(db: sqlite3.Connection) -> str:
    """Make ``db`` (an open history) an export outbox and return its history uuid.

    Why in the history itself: a record is marked sent (``exported_at``, epoch of
    the broker's acknowledgement) in the same file it was recorded in, so a crash
    at any point leaves each row either acknowledged or still waiting, never
    forgotten. Idempotent and additive: an older agent's file gets an
    ``exported_at`` column (NULL: waiting) on ``stalls`` and, when it exists,
    ``sessions``, partial indexes over the waiting rows (so finding the backlog
    costs nothing when it is empty), and a ``meta`` table holding a random uuid
    drawn once per file (a recreated file's row ids never collide with old ones
    in message ids). Agents that predate export ignore all of it.

    A row becomes waiting only by being inserted (with a new, higher id: ids are
    AUTOINCREMENT), never in place, except by :meth:`History.mark_interrupted`, which runs
    when an agent starts, before its exporter: the exporter marks acknowledged records by
    runs of row ids and relies on this (and checks it: ``Outbox.mark``)."""
    import uuid

    with db:
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (UUID_KEY, uuid.uuid4().hex))
        for table in OUTBOX_TABLES:
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if not have:
                continue
            if "exported_at" not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN exported_at REAL")
            db.execute(f"CREATE INDEX IF NOT EXISTS {table}_unexported ON {table} (iface, id) "
                       "WHERE exported_at IS NULL")
    return str(db.execute("SELECT value FROM meta WHERE key = ?", (UUID_KEY,)).fetchone()[0])


class HistoryError(IqnError):
    """The history cannot be opened or read; the message is for the user."""


def _damage(db: sqlite3.Connection) -> str:
    """What ``PRAGMA quick_check`` finds wrong with the database, "" if nothing."""
    try:
        rows = [str(r[0]) for r in db.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as e:
        # SQLITE_CORRUPT (11) and SQLITE_NOTADB (26); anything else (locked, no access) is not damage
        if (getattr(e, "sqlite_errorcode", 0) & 0xFF) in (11, 26):
            return str(e)
        raise
    if rows == ["ok"]:
        return ""
    found = [r for r in rows if not r.startswith("*** in database")] or rows
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    return f"quick_check: {found[0]}{more}"


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
    #: one of :data:`STATES`; for ``open`` and ``interrupted`` ``end`` is the last
    #: moment the agent knew the stall was going on and ``candidates`` is 0
    state: str = "ended"
    #: what the bulk-discard check could tell (``iqn_ctl.engine.discard.CHECK_*``):
    #: "ok", "unknown" (a kernel counter was evicted or restarted during the stall,
    #: so it was kept unjudged), "off" (--bulk-ratio 0); "" in rows of older agents
    bulk_check: str = ""

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
            return HistoryError(f"cannot open stall history {path}: permission denied "
                                "(run as root or as a member of the agent's group)")
    return HistoryError(f"cannot open stall history {path}: {e}")


#: an insert's values in :data:`_COLUMNS` order
_Row = tuple[str, str, str, str, float, float, int, float, int, str, str, str]
_COLUMNS = ('iface, flow, client, server, start, "end", candidates, detected_at, truncated, estimator, '
            "bulk_check, state")
#: rows per INSERT statement: one statement of many rows costs SQLite (and the
#: sqlite3 module) less per row than ``executemany`` of one-row statements; 64 x 12
#: values stays under the 999 bound variables of SQLite builds before 3.32
_ROWS_PER_INSERT = 64


def _row(r: StallRecord) -> _Row:
    return (r.iface, r.flow, r.client, r.server, r.start, r.end, r.candidates, r.detected_at,
            int(r.truncated), r.estimator, r.bulk_check, r.state)


@functools.lru_cache(maxsize=_ROWS_PER_INSERT + 1)
def _insert_sql(rows: int) -> str:
    """``INSERT`` of ``rows`` rows of :data:`_COLUMNS` (a statement per row count,
    made once: the sqlite3 module keeps the prepared statements)."""
    return f"INSERT INTO stalls ({_COLUMNS}) VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?)"] * rows)


class History:
    """Append-only (plus pruning) store of ended stalls."""

    def __init__(self, state_dir: Path, max_rows: int = DEFAULT_MAX_ROWS, create: bool = True) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.path = db_path(state_dir)
        self.max_rows = max_rows
        self._since_prune = 0
        #: writes not yet on disk, oldest first: (kind, the record's row (:func:`_row`),
        #: start of the open row); rows, not records: an outage stages 50,000 open rows
        #: within one p, and a tuple is all a row needs
        self._pending: deque[tuple[str, _Row, float]] = deque()
        #: how many of them are ``start`` writes (the first to go when too many are held)
        self._starts = 0
        #: failed attempts to write, and writes dropped because too many were held
        self.failures = 0
        self.dropped = 0
        self.last_error = ""
        self._retry_at = 0.0
        self._streak = 0
        #: the file's random id (:func:`ensure_outbox`); "" when opened read-only
        self.uuid = ""
        try:
            if create:
                # client addresses are personal data: only root reads them
                state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._db = self._connect()
            else:
                if not self.path.exists():
                    raise HistoryError(f"no stall history at {self.path} (no agent ran with this state dir)")
                self._db = self._open_existing()
            # before anything is written: a damaged file opens fine and then fails every write
            problem = _damage(self._db)
            if problem and not create:
                self._db.close()
                raise HistoryError(f"stall history {self.path} is damaged ({problem}); "
                                   "the agent moves it aside when it next starts")
            if problem:
                self._move_aside(problem)
            if create:
                self._db.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit is on disk before the agent goes on (docs/agent.md)
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
            self._migrate()
            self._db.commit()
            if create:
                self.uuid = ensure_outbox(self._db)
            self._db.execute("SELECT 1 FROM stalls LIMIT 1").fetchall()
        except (sqlite3.Error, OSError) as e:
            raise _explain(self.path, e) from None

    def _open_existing(self) -> sqlite3.Connection:
        """A reader's connection: read-write where we may write, else read-only
        (a member of the agent's access group, iqn_ctl/live/access.py). A
        read-only reader uses the agent's -wal and -shm files as they are; with
        no agent running they are gone, and a reader that cannot create them
        reads the file as it is (immutable: nobody is writing it)."""
        # as_uri() percent-encodes the path: a raw '?' or '#' in it would end the
        # file name early and open (or create) another file
        uri = self.path.absolute().as_uri()
        if os.access(self.path, os.W_OK):
            return sqlite3.connect(f"{uri}?mode=rw", uri=True, timeout=10.0, check_same_thread=False)
        wal = Path(f"{self.path}-wal")
        if not wal.exists() and not os.access(self.path.parent, os.W_OK):
            uri += "?immutable=1"
        else:
            uri += "?mode=ro"
        return sqlite3.connect(uri, uri=True, timeout=10.0, check_same_thread=False)

    def _connect(self) -> sqlite3.Connection:
        old = os.umask(0o077)
        try:
            return sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
        finally:
            os.umask(old)

    def _move_aside(self, problem: str) -> None:
        """Keep a damaged history (and its WAL) for recovery under a new name and start afresh."""
        self._db.close()
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        n = 0
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}.{n}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.rename(Path(f"{aside}{suffix}"))
        log.warning("stall history %s is damaged (%s); moved it to %s and started a new one",
                    self.path, problem, aside)
        self._db = self._connect()

    def _migrate(self) -> None:
        """Add the columns an older agent's history lacks (``_ADDED_COLUMNS``)."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(stalls)")}
        for name, decl in _ADDED_COLUMNS.items():
            if have and name not in have:
                self._db.execute(f"ALTER TABLE stalls ADD COLUMN {name} {decl}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, records: Iterable[StallRecord]) -> int:
        """Store records in one transaction (one fsync per poll round, not per stall)."""
        with self._db:
            n = self._insert(records)
        self._inserted(n)
        return n

    def _insert(self, records: Iterable[StallRecord]) -> int:
        """INSERT without committing: the caller's transaction groups it with other writes."""
        return self._insert_rows([_row(r) for r in records])

    def _insert_rows(self, rows: list[_Row]) -> int:
        """INSERT rows (:func:`_row`'s tuples) in order, without committing, in
        statements of :data:`_ROWS_PER_INSERT` rows each: the row ids come out as
        one row at a time gives them (ascending, in order), at ~1.4 instead of ~2.5
        µs a row (an outage's onset writes 50,000 open rows within one p)."""
        k = _ROWS_PER_INSERT
        whole = len(rows) - len(rows) % k
        if whole:
            sql = _insert_sql(k)
            self._db.executemany(sql, [tuple(chain.from_iterable(rows[i:i + k])) for i in range(0, whole, k)])
        if whole < len(rows):
            rest = rows[whole:]
            self._db.execute(_insert_sql(len(rest)), tuple(chain.from_iterable(rest)))
        return len(rows)

    def _inserted(self, n: int) -> None:
        self._since_prune += n
        if n and (self._since_prune >= _PRUNE_EVERY or self._since_prune >= self.max_rows):
            self.prune()

    # -- the agent's writes: held in memory while the history cannot take them --

    def stage(self, kind: str, rec: StallRecord, opened: float | None = None) -> None:
        """Queue a write for :meth:`flush`. ``start`` writes ``rec`` (state ``open``);
        ``end`` replaces the open row of the same stall (same iface and flow, start
        ``opened``: the epoch start it was written with, ``rec.start`` if None) with
        ``rec``, or writes it alone if that row never made it to disk; ``drop``
        deletes the open row (a discarded stall). At most :data:`MAX_PENDING` are
        held: past it the oldest ``start`` goes first (its stall's end, when it
        comes, is written as a whole row anyway), an end only when no start is
        left; each counted in ``dropped``."""
        if kind not in ("start", "end", "drop"):
            raise ValueError(f"unknown history write {kind!r}")
        if len(self._pending) >= MAX_PENDING:
            self._drop_one()
        self._pending.append((kind, _row(rec), rec.start if opened is None else opened))
        if kind == "start":
            self._starts += 1

    def stage_open(self, iface: str, flow: str, client: str, server: str, start: float, seen: float,
                   estimator: str) -> None:
        """``stage("start", StallRecord(iface, flow, client, server, start, seen, 0,
        seen, estimator=estimator, state="open"))``, the same write without making
        the record: the agent's stall start, which an outage does 50,000 times
        within one p."""
        if len(self._pending) >= MAX_PENDING:
            self._drop_one()
        self._pending.append(("start", (iface, flow, client, server, start, seen, 0, seen, 0, estimator, "",
                                        "open"), start))
        self._starts += 1

    def _drop_one(self) -> None:
        """Make room for one write: an ended stall is the record the history
        exists for, an open row only says a stall is going on (issue 19)."""
        q = self._pending
        if self._starts:
            for i, op in enumerate(q):
                if op[0] == "start":
                    del q[i]
                    self._starts -= 1
                    break
        else:
            q.popleft()
        self.dropped += 1
        if self.dropped == 1:
            log.error("stall history %s: more than %d records held; dropping the oldest "
                      "(open rows before ended stalls)", self.path, MAX_PENDING)

    @property
    def pending(self) -> int:
        """Writes held in memory, not yet on disk."""
        return len(self._pending)

    def flush(self, force: bool = False) -> bool:
        """Write what is held in one transaction; True when nothing is left held.

        A write that fails (disk full, I/O error, damage found since the start)
        leaves everything held, counts in ``failures`` and is tried again no
        sooner than :data:`RETRY_EVERY` s later unless ``force``: a failing disk
        must not slow the event loop down, and nothing is given up while the
        agent runs."""
        if not self._pending:
            return True
        now = time.monotonic()
        if not force and now < self._retry_at:
            return False
        ops = list(self._pending)
        try:
            with self._db:
                n = self._apply(ops)
        except sqlite3.Error as e:
            self.failures += 1
            self._streak += 1
            self._retry_at = now + RETRY_EVERY
            if self._streak == 1:
                log.error("cannot write %d stall record(s) to %s: %s; keeping them in memory "
                          "(at most %d) and retrying every %g s", len(ops), self.path, e, MAX_PENDING,
                          RETRY_EVERY)
            self.last_error = str(e)
            return False
        self._pending.clear()
        self._starts = 0
        if self._streak:
            log.warning("stall history %s writable again: wrote %d held record(s) after %d failed "
                        "attempt(s)", self.path, len(ops), self._streak)
            self._streak = 0
            self.last_error = ""
        self._inserted(n)
        return True

    def _apply(self, ops: list[tuple[str, _Row, float]]) -> int:
        """The writes in order, a run of starts (or of ends and drops) in a few
        statements each (:meth:`_insert_rows`): an outage starts thousands of stalls
        in one round, and one statement per row cost as much as the rest of a stall's start.
        Within a run of ends the deletes go first: each removes only its own
        stall's open row, which no insert of the run writes."""
        inserted = 0
        i = 0
        while i < len(ops):
            starts = ops[i][0] == "start"
            j = i
            while j < len(ops) and (ops[j][0] == "start") == starts:
                j += 1
            run = ops[i:j]
            if not starts:
                self._db.executemany(
                    "DELETE FROM stalls WHERE iface = ? AND flow = ? AND start = ? AND state = 'open'",
                    [(r[0], r[1], opened) for _, r, opened in run],
                )
            inserted += self._insert_rows([r for kind, r, _ in run if kind != "drop"])
            i = j
        return inserted

    def mark_interrupted(self, iface: str) -> int:
        """Mark ``iface``'s ``open`` stalls ``interrupted`` (and truncated): only one
        agent runs per interface, so when one starts, an open row there was left
        by an agent that died before the stall ended. Returns how many."""
        with self._db:
            cur = self._db.execute(
                "UPDATE stalls SET state = 'interrupted', truncated = 1 WHERE iface = ? AND state = 'open'",
                (iface,),
            )
        return cur.rowcount

    def prune(self) -> int:
        """Drop all but the newest ``max_rows`` stalls."""
        self._since_prune = 0
        with self._db:
            cur = self._db.execute(
                "DELETE FROM stalls WHERE id <= (SELECT MAX(id) FROM stalls) - ?", (self.max_rows,)
            )
        return cur.rowcount

    def query(self, iface: str | None = None, since: float | None = None) -> list[StallRecord]:
        """Stalls oldest first; ``since`` keeps those that end at or after it (and
        the open ones: their end is not known yet)."""
        sql = (
            'SELECT iface, flow, client, server, start, "end", candidates, detected_at, truncated, '
            "estimator, bulk_check, state FROM stalls"
        )
        where: list[str] = []
        args: list[object] = []
        if iface is not None:
            where.append("iface = ?")
            args.append(iface)
        if since is not None:
            where.append("(\"end\" >= ? OR state = 'open')")
            args.append(since)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start, id"
        try:
            rows = self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise HistoryError(f"cannot read stall history {self.path}: {e}") from None
        return [
            StallRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]), r[9], bulk_check=r[10],
                        state=r[11])
            for r in rows
        ]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM stalls").fetchone()[0])
