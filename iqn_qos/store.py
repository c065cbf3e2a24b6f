"""The DuckDB store: one file with the media lines and the estimates per slot.

``infer`` over a store reads each slot's lines with one query and keeps the
slot's estimates, so asking again (or ``predict``, ``heatmap``) is a query, not
a re-read of days of JSON lines.  A slot's estimates are recomputed only when
its lines changed (count and unit sums) or the parameters differ.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np

from .errors import QosError
from .ingest import Columns, Decoded
from .lines import MediaLine
from .mle import Estimate, infer_counts, slot_of

_SCHEMA = """
CREATE TABLE IF NOT EXISTS paths (id INTEGER PRIMARY KEY, path VARCHAR[] NOT NULL);
CREATE TABLE IF NOT EXISTS slots (
  slot DOUBLE NOT NULL, slot_s DOUBLE NOT NULL, nlines BIGINT NOT NULL, units BIGINT NOT NULL,
  good BIGINT NOT NULL, threshold DOUBLE NOT NULL, l1 DOUBLE NOT NULL, PRIMARY KEY (slot, slot_s));
CREATE TABLE IF NOT EXISTS estimates (
  slot DOUBLE NOT NULL, slot_s DOUBLE NOT NULL, component VARCHAR[] NOT NULL, p DOUBLE NOT NULL,
  lo DOUBLE NOT NULL, hi DOUBLE NOT NULL, lines BIGINT NOT NULL, faulty BOOLEAN NOT NULL);
CREATE TABLE IF NOT EXISTS records (
  id VARCHAR PRIMARY KEY, type VARCHAR NOT NULL, router VARCHAR NOT NULL, stored_at DOUBLE NOT NULL);
CREATE TABLE IF NOT EXISTS stalls (
  id VARCHAR NOT NULL, router VARCHAR, interface VARCHAR, client VARCHAR, server VARCHAR, start DOUBLE,
  "end" DOUBLE, duration_s DOUBLE, candidates BIGINT, state VARCHAR, detected_at DOUBLE);
CREATE TABLE IF NOT EXISTS rejected (
  id VARCHAR NOT NULL, type VARCHAR, router VARCHAR, reason VARCHAR NOT NULL, raw BLOB,
  rejected_at DOUBLE NOT NULL);
"""

# a line names its path by the id of a row of ``paths`` (each distinct path stored once): the
# list column written per line was half of the store's CPU per record (its own insert and,
# mostly, the commit's write-ahead log: bench/bench_qos_serve.py), an integer is not
_LINES = """
CREATE TABLE IF NOT EXISTS lines (
  t DOUBLE NOT NULL, path_id INTEGER NOT NULL, n BIGINT NOT NULL, m BIGINT NOT NULL,
  client VARCHAR, server VARCHAR, router VARCHAR, kind VARCHAR, id VARCHAR);
"""

# a store written before ``paths`` (a list column ``path`` per line, ``id`` added later): its
# lines are rewritten once, each distinct path into ``paths``, in one transaction
_MIGRATE = """
ALTER TABLE lines ADD COLUMN IF NOT EXISTS id VARCHAR;
INSERT INTO paths SELECT (row_number() OVER (ORDER BY path) - 1)::INTEGER, path
  FROM (SELECT DISTINCT path FROM lines);
CREATE TABLE lines_v2 (
  t DOUBLE NOT NULL, path_id INTEGER NOT NULL, n BIGINT NOT NULL, m BIGINT NOT NULL,
  client VARCHAR, server VARCHAR, router VARCHAR, kind VARCHAR, id VARCHAR);
INSERT INTO lines_v2 SELECT l.t, p.id, l.n, l.m, l.client, l.server, l.router, l.kind, l.id
  FROM lines l JOIN paths p ON p.path = l.path;
DROP TABLE lines;
ALTER TABLE lines_v2 RENAME TO lines;
"""


@dataclass(frozen=True, slots=True)
class Ingested:
    """What one stored batch added: new media lines, stall rows, rejected messages; how many
    sessions had nothing watched (``empty``) and how many messages were already stored."""

    lines: list[MediaLine]
    stalls: int
    rejected: list[Decoded]
    empty: int
    duplicates: int
    types: dict[str, int]  # new usable messages per type
    #: the slot times of new lines stored from columns (:meth:`Store.ingest_columns`; not in ``lines``)
    line_t: np.ndarray | None = None

    @property
    def nlines(self) -> int:
        return len(self.lines) + (0 if self.line_t is None else int(self.line_t.size))


class Store:
    """A DuckDB file (``:memory:`` for none) holding lines and per-slot estimates."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            self.con = duckdb.connect(self.path)
            self.con.execute("BEGIN")
            self.con.execute(_SCHEMA)
            cols = {r[0] for r in self.con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'lines'").fetchall()}
            self.con.execute(_MIGRATE if "path" in cols else _LINES)
            self.con.execute("COMMIT")
            # path -> its id in ``paths``: the writer (one connection: DuckDB lets one process
            # write a file) numbers new paths itself, so a batch's lines need no lookup query
            self._path_ids: dict[tuple[str, ...], int] = {
                tuple(p): int(i) for i, p in self.con.execute("SELECT id, path FROM paths").fetchall()}
        except duckdb.Error as e:
            raise QosError(f"{self.path}: cannot open the store ({e})") from None

    def close(self) -> None:
        self.con.close()

    def cursor(self) -> Store:
        """Another connection to the same database, for another thread (a DuckDB connection
        is not shared between threads; ``iqn-qos serve`` infers on its own while it stores)."""
        other = Store.__new__(Store)
        other.path, other.con, other._path_ids = self.path, self.con.cursor(), self._path_ids
        return other

    def _path_column(self, paths: Sequence[tuple[str, ...]], new: list[tuple[str, ...]]) -> np.ndarray:
        """The ids of ``paths`` (int32, for the lines' ``path_id``); the paths new to the store are
        inserted into ``paths`` (inside the caller's transaction) and appended to ``new``, for
        :meth:`_forget` should that transaction roll back."""
        ids = self._path_ids
        out = np.empty(len(paths), np.int32)
        start = len(new)  # ``new`` may hold paths of an earlier statement of this transaction
        for k, p in enumerate(paths):
            i = ids.get(p)
            if i is None:
                i = ids[p] = len(ids)
                new.append(p)
            out[k] = i
        if len(new) > start:
            mine = new[start:]
            self.con.execute("INSERT INTO paths SELECT unnest($1::INTEGER[]), unnest($2::VARCHAR[][])",
                             [[ids[p] for p in mine], [list(p) for p in mine]])
        return out

    def _forget(self, new: Sequence[tuple[str, ...]]) -> None:
        """Drop paths numbered in a transaction that rolled back (they are not in ``paths``)."""
        for p in new:
            self._path_ids.pop(p, None)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def add_lines(self, lines: Sequence[MediaLine]) -> None:
        """Append lines in one transaction (numpy columns: no row-by-row inserts)."""
        self.con.execute("BEGIN")
        new: list[tuple[str, ...]] = []
        try:
            self._insert_lines(lines, None, new)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            self._forget(new)
            raise

    def ingest(self, batch: Sequence[Decoded], raw: Sequence[bytes], now: float) -> Ingested:
        """Store a batch of decoded export messages in one transaction, idempotent on their ids.

        A message whose id is already in ``records`` (a re-delivery, a re-send after the
        broker's duplicate window) stores nothing again; a rejected one is kept in
        ``rejected`` with its reason and raw bytes (its own ``raw``, else ``raw[i]``: the
        message ``batch[i]`` came in).
        Returns what was new, so the caller acknowledges only after this returned."""
        new_paths: list[tuple[str, ...]] = []
        self.con.execute("BEGIN")
        try:
            got = self._ingest_decoded(batch, raw, now, new_paths, alone=True)
            self.con.execute("COMMIT")
        except duckdb.Error as e:
            self.con.execute("ROLLBACK")
            self._forget(new_paths)
            raise QosError(f"{self.path}: cannot store a batch ({e})") from None
        return got

    def ingest_columns(self, cols: Columns, now: float) -> Ingested:
        """:meth:`ingest` for a batch decoded into :class:`Columns` (what ``iqn-qos serve``
        stores): the session columns go to DuckDB as numpy arrays with no Python object per
        record, the others as :meth:`ingest` stores them, all in one transaction, idempotent on
        the ids (a record whose id is stored already, or came earlier in the batch, is a
        duplicate)."""
        con = self.con
        k = len(cols.id)
        new_paths: list[tuple[str, ...]] = []
        fresh = k
        line_t = np.empty(0, np.float64)
        empty = 0
        con.execute("BEGIN")
        try:
            keep: np.ndarray | None = None  # None: every session record is new
            if k:
                # an id twice in the batch: DuckDB inserts the first, and the count falls short too
                sessions = {"id": np.array(cols.id, object), "router": np.array(cols.router, object)}
                new = self._new_records(sessions, "'session'", now, alone=True)
                if new is not None:
                    keep = np.zeros(k, bool)
                    for i, rid in enumerate(cols.id):
                        if rid in new:  # its first occurrence in the batch
                            keep[i] = True
                            new.discard(rid)
                    fresh = int(keep.sum())
                watched = cols.n >= 1
                empty = int((~watched if keep is None else keep & ~watched).sum())
                sel = watched if keep is None else keep & watched
                if sel.any():
                    gids = self._path_column(cols.paths, new_paths)
                    line_t = cols.t[sel]
                    obj = {c: np.array(getattr(cols, c), object)[sel]
                           for c in ("client", "server", "router", "id")}
                    self._insert_line_columns({"t": line_t, "p": gids[cols.path[sel]], "n": cols.n[sel],
                                               "m": cols.m[sel], **obj})
            rest = (self._ingest_decoded(cols.others, cols.raw, now, new_paths, alone=False)
                    if cols.others else None)
            con.execute("COMMIT")
        except duckdb.Error as e:
            con.execute("ROLLBACK")
            self._forget(new_paths)
            raise QosError(f"{self.path}: cannot store a batch ({e})") from None
        types = dict(rest.types) if rest is not None else {}
        if fresh:
            types["session"] = types.get("session", 0) + fresh
        return Ingested(
            lines=rest.lines if rest is not None else [], stalls=rest.stalls if rest is not None else 0,
            rejected=rest.rejected if rest is not None else [],
            empty=empty + (rest.empty if rest is not None else 0),
            duplicates=k - fresh + (rest.duplicates if rest is not None else 0), types=types, line_t=line_t)

    def _new_records(self, recs: dict[str, np.ndarray], type_sql: str, now: float,
                     alone: bool) -> set[str] | None:
        """Insert the records (columns ``id``, ``router`` and, named by ``type_sql``, their type)
        into ``records`` unless their id is there; return the ids inserted, None when all were.

        The columns reach DuckDB as numpy arrays it scans directly: passing Python lists as
        statement parameters converted every value (7x slower; the store was the service's
        slowest stage: bench/bench_qos_serve.py). The common case has no duplicate: the count of
        inserted rows tells it, and costs nothing; RETURNING the new ids (3x the insert's time
        on large batches) is paid only when the count falls short (a re-delivery), after a
        rollback of the transaction, which ``alone`` says holds nothing else yet (else the new
        ids are asked for at once)."""
        con = self.con
        sql = f"INSERT OR IGNORE INTO records SELECT id, {type_sql}, router, $1 FROM _in_records"
        con.register("_in_records", recs)
        try:
            if alone:
                r = con.execute(sql, [now]).fetchone()
                if (int(r[0]) if r else 0) == len(recs["id"]):
                    return None
                con.execute("ROLLBACK")
                con.execute("BEGIN")
                con.register("_in_records", recs)  # a rollback drops the registration
            return {g[0] for g in con.execute(sql + " RETURNING id", [now]).fetchall()}
        finally:
            con.unregister("_in_records")

    def _ingest_decoded(self, batch: Sequence[Decoded], raw: Sequence[bytes], now: float,
                        new_paths: list[tuple[str, ...]], alone: bool) -> Ingested:
        """:meth:`ingest`'s work inside the caller's transaction; ``alone``: nothing else was
        written in it yet, so the duplicate check may roll it back and start it again (else the
        new ids are asked for at once)."""
        first: dict[str, int] = {}
        for i, d in enumerate(batch):
            first.setdefault(d.id, i)
        uniq = [batch[i] for i in first.values()]
        con = self.con
        new = self._new_records({"id": np.array([d.id for d in uniq], object),
                                 "type": np.array([d.type for d in uniq], object),
                                 "router": np.array([d.router for d in uniq], object)}, "type", now, alone)
        fresh = uniq if new is None else [d for d in uniq if d.id in new]
        lines = [d for d in fresh if d.line is not None]
        if lines:
            self._insert_lines([d.line for d in lines if d.line is not None], [d.id for d in lines],
                               new_paths)
        stalls = [d for d in fresh if d.stall is not None]
        if stalls:
            self._insert_stalls(stalls)
        bad = [first[d.id] for d in fresh if d.error is not None]
        if bad:
            con.execute(
                "INSERT INTO rejected SELECT unnest($1::VARCHAR[]), unnest($2::VARCHAR[]),"
                " unnest($3::VARCHAR[]), unnest($4::VARCHAR[]), unnest($5::BLOB[]), $6",
                [[batch[i].id for i in bad], [batch[i].type for i in bad], [batch[i].router for i in bad],
                 [batch[i].error for i in bad],
                 [batch[i].raw if batch[i].raw is not None else bytes(raw[i]) for i in bad], now],
            )
        return Ingested(
            lines=[d.line for d in lines if d.line is not None],
            stalls=len(stalls),
            rejected=[batch[i] for i in bad],
            empty=sum(1 for d in fresh if d.line is None and d.stall is None and d.error is None),
            duplicates=len(batch) - len(fresh),
            types=dict(Counter(d.type for d in fresh if d.error is None)),
        )

    def _insert_line_columns(self, cols: dict[str, np.ndarray]) -> None:
        """The service's lines (kind 'iqn') given as columns, ``p`` their path ids."""
        self.con.register("_in_lines", cols)
        try:
            self.con.execute("INSERT INTO lines (t, path_id, n, m, client, server, router, kind, id)"
                             " SELECT t, p, n, m, client, server, router, 'iqn', id FROM _in_lines")
        finally:
            self.con.unregister("_in_lines")

    def _insert_lines(self, ls: Sequence[MediaLine], ids: Sequence[str] | None,
                      new: list[tuple[str, ...]]) -> None:
        """Lines as numpy columns DuckDB scans directly (Python lists as statement parameters
        converted every value: 7x slower), each path as its id in ``paths`` (new paths are added
        there and to ``new``); ``ids`` are the records the lines came from (None: not from the
        service)."""
        self.con.register("_in_lines", {
            "t": np.array([ln.t for ln in ls], np.float64),
            "p": self._path_column([ln.path for ln in ls], new),
            "n": np.array([ln.n for ln in ls], np.int64), "m": np.array([ln.m for ln in ls], np.int64),
            "client": np.array([ln.client for ln in ls], object),
            "server": np.array([ln.server for ln in ls], object),
            "router": np.array([ln.router for ln in ls], object),
            "kind": np.array([ln.kind for ln in ls], object),
            "id": np.array(ids if ids is not None else [None] * len(ls), object)})
        try:
            self.con.execute("INSERT INTO lines (t, path_id, n, m, client, server, router, kind, id)"
                             " SELECT t, p, n, m, client, server, router, kind, id FROM _in_lines")
        finally:
            self.con.unregister("_in_lines")

    def _insert_stalls(self, rows: Sequence[Decoded]) -> None:
        st = [d.stall for d in rows if d.stall is not None]
        self.con.execute(
            "INSERT INTO stalls SELECT unnest($1::VARCHAR[]), unnest($2::VARCHAR[]), unnest($3::VARCHAR[]),"
            " unnest($4::VARCHAR[]), unnest($5::VARCHAR[]), unnest($6::DOUBLE[]), unnest($7::DOUBLE[]),"
            " unnest($8::DOUBLE[]), unnest($9::BIGINT[]), unnest($10::VARCHAR[]), unnest($11::DOUBLE[])",
            [[d.id for d in rows], [s.router for s in st], [s.interface for s in st], [s.client for s in st],
             [s.server for s in st], [s.start for s in st], [s.end for s in st], [s.duration_s for s in st],
             [s.candidates for s in st], [s.state for s in st], [s.detected_at for s in st]],
        )

    def counts(self) -> dict[str, int]:
        """Rows per table, for the service's status and the tests."""
        out = {}
        for table in ("records", "lines", "stalls", "rejected", "estimates"):
            r = self.con.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 (fixed names)
            out[table] = int(r[0]) if r else 0
        return out

    def slot_starts(self, slot_s: float) -> list[float]:
        rows = self.con.execute(
            "SELECT DISTINCT floor(t / $1) * $1 AS s FROM lines ORDER BY s", [slot_s]
        ).fetchall()
        return [float(r[0]) for r in rows]

    def lines_in(self, slot: float, slot_s: float) -> list[MediaLine]:
        rows = self.con.execute(
            "SELECT l.t, p.path, l.n, l.m, l.client, l.server, l.router, l.kind FROM lines l"
            " JOIN paths p ON p.id = l.path_id WHERE l.t >= $1 AND l.t < $1 + $2",
            [slot, slot_s],
        ).fetchall()
        return [MediaLine(r[0], tuple(r[1]), r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows]

    def path_counts(self, slot: float, slot_s: float) -> list[tuple[list[str], int, int, int]]:
        """The slot's sufficient statistics (:func:`iqn_qos.mle.path_counts`) aggregated by DuckDB:
        one row per distinct path instead of one Python object per line (a slot of 5,000 lines:
        6 ms instead of 64 ms, and nothing large to send to the solver process).  Grouped on the
        path's id (each distinct stored path has one), its list joined after: paths naming the
        same components in another order are merged by :func:`iqn_qos.mle.problem_of`."""
        rows = self.con.execute(
            "SELECT p.path, c.bad, c.good, c.k FROM (SELECT path_id, sum(n - m) AS bad, sum(m) AS good,"
            " count(*) AS k FROM lines WHERE t >= $1 AND t < $1 + $2 GROUP BY path_id) c"
            " JOIN paths p ON p.id = c.path_id",
            [slot, slot_s],
        ).fetchall()
        return [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]

    def _stats(self, slot: float, slot_s: float) -> tuple[int, int, int]:
        r = self.con.execute(
            "SELECT count(*), coalesce(sum(n), 0), coalesce(sum(m), 0) FROM lines"
            " WHERE t >= $1 AND t < $1 + $2",
            [slot, slot_s],
        ).fetchone()
        assert r is not None
        return int(r[0]), int(r[1]), int(r[2])

    def cached(self, slot: float, slot_s: float, threshold: float, l1: float) -> list[Estimate] | None:
        """The slot's stored estimates if they are up to date for its lines and these parameters."""
        meta = self.con.execute(
            "SELECT nlines, units, good, threshold, l1 FROM slots WHERE slot = $1 AND slot_s = $2",
            [slot, slot_s],
        ).fetchone()
        if meta is None or tuple(meta) != (*self._stats(slot, slot_s), threshold, l1):
            return None
        return self.estimates_of(slot, slot_s)

    def estimates_of(self, slot: float, slot_s: float) -> list[Estimate]:
        rows = self.con.execute(
            "SELECT component, p, lo, hi, lines, faulty FROM estimates WHERE slot = $1 AND slot_s = $2"
            " ORDER BY p DESC, component",
            [slot, slot_s],
        ).fetchall()
        return [
            Estimate(r[0][0] if len(r[0]) == 1 else tuple(r[0]), r[1], r[2], r[3], r[4], r[5]) for r in rows
        ]

    def put(self, slot: float, slot_s: float, threshold: float, l1: float, ests: Sequence[Estimate]) -> None:
        self.con.execute("BEGIN")
        try:
            self._put(slot, slot_s, threshold, l1, ests, self._stats(slot, slot_s))
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def _put(self, slot: float, slot_s: float, threshold: float, l1: float, ests: Sequence[Estimate],
             stats: tuple[int, int, int]) -> None:
        self.con.execute("DELETE FROM estimates WHERE slot = $1 AND slot_s = $2", [slot, slot_s])
        self.con.execute("DELETE FROM slots WHERE slot = $1 AND slot_s = $2", [slot, slot_s])
        self.con.execute(
            "INSERT INTO slots VALUES ($1, $2, $3, $4, $5, $6, $7)", [slot, slot_s, *stats, threshold, l1]
        )
        if ests:
            comps = [[e.component] if isinstance(e.component, str) else list(e.component) for e in ests]
            self.con.execute(
                "INSERT INTO estimates SELECT $1, $2, unnest($3::VARCHAR[][]), unnest($4::DOUBLE[]),"
                " unnest($5::DOUBLE[]), unnest($6::DOUBLE[]), unnest($7::BIGINT[]), unnest($8::BOOLEAN[])",
                [
                    slot,
                    slot_s,
                    comps,
                    [e.p for e in ests],
                    [e.lo for e in ests],
                    [e.hi for e in ests],
                    [e.lines for e in ests],
                    [e.faulty for e in ests],
                ],
            )

    def infer(
        self, slot: float, slot_s: float, *, threshold: float = 0.01, l1: float = 0.0,
        solve: Callable[..., list[Estimate]] = infer_counts,
    ) -> list[Estimate]:
        """The slot's estimates: from the store when fresh, else computed from its lines'
        sufficient statistics (:meth:`path_counts`, by ``solve``, :func:`infer_counts`' signature:
        the service runs it in another process) and stored."""
        # one transaction: the lines inferred and the counts the estimates are stamped with come
        # from the same snapshot, so lines stored meanwhile (by the ingest thread) leave the slot
        # stale, not wrongly fresh
        self.con.execute("BEGIN")
        try:
            got = self.cached(slot, slot_s, threshold, l1)
            if got is None:
                counts = self.path_counts(slot, slot_s)
                got = solve(counts, threshold=threshold, l1=l1)
                # the stamp (lines, units, good units) from the same snapshot's counts: no rescan
                stats = (sum(c[3] for c in counts), sum(c[1] + c[2] for c in counts),
                         sum(c[2] for c in counts))
                self._put(slot, slot_s, threshold, l1, got, stats)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        return got

    def latest(self, k: int) -> list[tuple[float, list[Estimate]]]:
        """The ``k`` latest slots with stored estimates (newest first), for ``predict``."""
        rows = self.con.execute(
            "SELECT slot, slot_s FROM slots ORDER BY slot DESC, slot_s LIMIT $1", [k]
        ).fetchall()
        return [(float(s), self.estimates_of(s, ss)) for s, ss in rows]


def slots_of(lines: Sequence[MediaLine], slot_s: float) -> list[float]:
    """Distinct slot starts of ``lines``, sorted."""
    return sorted({slot_of(ln.t, slot_s) for ln in lines})
