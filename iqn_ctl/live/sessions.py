"""Watched time of the clients that signal, measured from the kernel's
per-flow counters and written to the ``sessions`` table of the agent's history.

The accounting itself is sans-I/O (:mod:`iqn_ctl.engine.watch`); this module
feeds it and stores what it closes:

* Which client received how much, when: the XDP program counts, per 5-tuple,
  every UDP packet from the signalling port (443: QUIC, so the page *and* the
  video connections of an HTTP/3 player). Reading the whole LRU table costs
  time proportional to its size, so it is scanned only every
  ``max(SAMPLE_EVERY, cost / SCAN_SHARE)`` seconds (at most 2 % of the loop's
  time, also when new clients keep appearing) to learn the keys of *known*
  clients; in between, once a second, only those keys are looked up. A key
  first found by a scan counts as active in the sample where the kernel last
  saw a packet of it.
* What is written: one row per client and slot (:class:`WatchRecord`), when the
  slot is over (plus :data:`GRACE`, so a stall that ended just before the edge
  is in) and, for the slot going on, when the agent stops. Rows that cannot be
  written (a full disk) are held, bounded, and retried; the table keeps the
  newest :data:`MAX_SESSION_ROWS` rows.

The table is documented in docs/qos.md ("From the ISP agent"); ``iqn-qos
from-agent`` reads it with nothing but ``sqlite3`` (it does not import
``iqn_ctl``), so its shape is a contract: change it only with a new
``RECORD_VERSION``.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Protocol

from iqn_ctl.engine.discard import Counters
from iqn_ctl.engine.flowkey import FlowKey
from iqn_ctl.engine.watch import DEFAULT_SLOT, RECORD_VERSION, WatchAccounting, WatchRecord
from iqn_ctl.live.history import HistoryError
from iqn_ctl.live.layout import decode_key

log = logging.getLogger("iqn.sessions")

#: seconds between samples of the known clients' counters
SAMPLE_EVERY = 1.0
#: a full scan of the kernel's flow table may take at most this share of the time
SCAN_SHARE = 0.02
#: a slot is closed this long after its end: stalls ending at the edge are known by then
#: (the stall-end window is 4 p = 0.8 s by default)
GRACE = 2.0
#: rows held in memory while the history cannot be written
MAX_HELD = 10_000
#: newest rows kept (~100 bytes each: ~100 MB at most)
MAX_SESSION_ROWS = 1_000_000
_PRUNE_EVERY = 1024
#: kernel keys of known clients remembered
MAX_KEYS = 262_144

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    v INTEGER NOT NULL,
    router TEXT NOT NULL,
    iface TEXT NOT NULL,
    client TEXT NOT NULL,
    server TEXT NOT NULL,
    slot REAL NOT NULL,
    slot_s REAL NOT NULL,
    watched_s REAL NOT NULL,
    stalled_s REAL NOT NULL,
    recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_slot ON sessions (slot);
"""


class FlowCounters(Protocol):
    """What the sampler needs of :class:`~iqn_ctl.live.datapath.Datapath`."""

    def flow_stats(self) -> list[tuple[bytes, dict[str, int]]]: ...

    def flow_counters(self, raws: Iterable[bytes]) -> dict[bytes, Counters | None]: ...


class SessionStore:
    """The ``sessions`` table, on its own connection to the history file (WAL:
    the stall writes and these do not block each other). Opening adds the
    table to a history written by an older agent."""

    def __init__(self, path: Path, max_rows: int = MAX_SESSION_ROWS) -> None:
        self.path = path
        self.max_rows = max_rows
        self._held: deque[tuple[object, ...]] = deque()
        self.failures = 0
        self.dropped = 0
        self.written = 0
        self._since_prune = 0
        self._retry_at = 0.0
        old = os.umask(0o077)
        try:
            self._db = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
            self._db.execute("PRAGMA synchronous=FULL")
            with self._db:
                self._db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise HistoryError(f"cannot open the sessions table of {path}: {e}") from None
        finally:
            os.umask(old)

    def known_clients(self, iface: str) -> list[str]:
        """Clients with a stall recorded on ``iface``: they run the end-user agent."""
        rows = self._db.execute("SELECT DISTINCT client FROM stalls WHERE iface = ?", (iface,)).fetchall()
        return [str(r[0]) for r in rows]

    def add(self, recs: Iterable[WatchRecord], at: float) -> None:
        for r in recs:
            if len(self._held) >= MAX_HELD:
                self._held.popleft()
                self.dropped += 1
            self._held.append((RECORD_VERSION, r.router, r.iface, r.client, r.server, r.slot, r.slot_s,
                               r.watched_s, r.stalled_s, at))
        self.flush()

    @property
    def pending(self) -> int:
        return len(self._held)

    def flush(self, force: bool = False) -> bool:
        """Write what is held in one transaction; on failure keep it and retry
        no sooner than a second later (unless ``force``)."""
        if not self._held:
            return True
        now = time.monotonic()
        if not force and now < self._retry_at:
            return False
        rows = list(self._held)
        try:
            with self._db:
                self._db.executemany(
                    "INSERT INTO sessions (v, router, iface, client, server, slot, slot_s, watched_s, "
                    "stalled_s, recorded_at) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        except sqlite3.Error as e:
            self.failures += 1
            self._retry_at = now + 1.0
            if self.failures == 1:
                log.error("cannot write %d watched-time record(s) to %s: %s; holding them", len(rows),
                          self.path, e)
            return False
        self._held.clear()
        self.written += len(rows)
        self._since_prune += len(rows)
        if self._since_prune >= _PRUNE_EVERY:
            self._since_prune = 0
            with self._db:
                self._db.execute("DELETE FROM sessions WHERE id <= (SELECT MAX(id) FROM sessions) - ?",
                                 (self.max_rows,))
        return True

    def close(self) -> None:
        self._db.close()


class Sessions:
    """The agent's watched-time accounting: kernel counters in, records out."""

    def __init__(self, iface: str, db: Path, slot_s: float = DEFAULT_SLOT, router: str | None = None,
                 decode: Callable[[bytes], FlowKey] = decode_key, since: float | None = None) -> None:
        self.acc = WatchAccounting(slot_s, router if router is not None else socket.gethostname(), iface)
        self.store = SessionStore(db)
        start = time.time() if since is None else since
        for client in self.store.known_clients(iface):
            self.acc.know(client, start)
        self._decode = decode
        #: raw kernel key -> (client, server), for keys of known clients
        self._names: dict[bytes, tuple[str, str] | None] = {}
        #: raw key of a known client -> (client, server, bytes at the last sample)
        self._keys: dict[bytes, tuple[str, str, int]] = {}
        self._last: float | None = None
        self._due = 0.0
        self._scan_due = 0.0

    # stall events, epoch seconds (the agent adds its wall-clock offset)
    def stall_started(self, flow: Hashable, client: str, server: str, start: float) -> None:
        self.acc.stall_started(flow, client, server, start)

    def stall_ended(self, flow: Hashable, client: str, server: str, start: float, end: float,
                    kept: bool, detected: float | None = None) -> None:
        # A client that becomes known waits for the next budgeted scan to have its
        # connections learnt: forcing a scan per new client let forged signals (a new
        # "client" every second) keep the agent scanning 65k kernel entries all the
        # time (74 % of a core in the soak, against the 2 % budget).
        self.acc.stall_ended(flow, client, server, start, end, kept, detected)

    def _name(self, raw: bytes) -> tuple[str, str] | None:
        if raw in self._names:
            return self._names[raw]
        if len(self._names) >= MAX_KEYS:
            self._names.clear()
        try:
            k = self._decode(raw)
            got: tuple[str, str] | None = (k.client, k.server)
        except ValueError:
            got = None
        self._names[raw] = got
        return got

    def tick(self, dp: FlowCounters, now: float, off: float) -> None:
        """Sample if due (``now`` monotonic, ``off`` = wall minus monotonic), close
        the slots that are over and write their records."""
        if now < self._due:
            return
        self._sample(dp, now, off)
        self.store.add(self.acc.close_until(now + off - GRACE), now + off)
        if self.store.pending:
            self.store.flush()

    def finish(self, dp: FlowCounters | None, now: float, off: float) -> None:
        """The agent stops: a last sample, then every slot closes (the current one early)."""
        if dp is not None:
            self._sample(dp, now, off)
        self.store.add(self.acc.close_all(now + off), now + off)
        if not self.store.flush(force=True):
            log.error("%d watched-time record(s) could not be written to %s and are lost",
                      self.store.pending, self.store.path)

    def close(self) -> None:
        self.store.close()

    def _sample(self, dp: FlowCounters, now: float, off: float) -> None:
        t0 = now if self._last is None else self._last
        received: dict[tuple[str, str], float] = {}
        if not self.acc.clients:
            self._keys.clear()
        elif now >= self._scan_due:
            began = time.perf_counter()
            seen: set[bytes] = set()
            for raw, st in dp.flow_stats():
                names = self._name(raw)
                if names is None or not self.acc.known(names[0]):
                    continue
                seen.add(raw)
                fresh = st.get("last_seen_ns", 0) / 1e9 > t0
                self._count(raw, names, int(st.get("bytes", 0)), fresh, received)
            for raw in [r for r in self._keys if r not in seen]:
                del self._keys[raw]  # evicted from the kernel's table
            cost = time.perf_counter() - began
            self._scan_due = now + max(SAMPLE_EVERY, cost / SCAN_SHARE)
        elif self._keys:
            for raw, c in dp.flow_counters(list(self._keys)).items():
                got = self._keys.get(raw)
                if got is None:
                    continue
                if c is None:
                    del self._keys[raw]
                    continue
                self._count(raw, (got[0], got[1]), c.bytes, True, received)
        self.acc.sample(t0 + off, now + off, received)
        self._last = now
        self._due = now + SAMPLE_EVERY

    def _count(self, raw: bytes, names: tuple[str, str], nbytes: int, fresh: bool,
               received: dict[tuple[str, str], float]) -> None:
        """Bytes of one key since the last sample into ``received``. A key seen for the
        first time (or restarted by the kernel) counts whole only if it was ``fresh``
        (a packet in this sample); its earlier bytes cannot be placed in time."""
        old = self._keys.get(raw)
        if old is None or nbytes < old[2]:
            delta = nbytes if fresh else 0
        else:
            delta = nbytes - old[2]
        if old is None and len(self._keys) >= MAX_KEYS:
            del self._keys[next(iter(self._keys))]
        self._keys[raw] = (names[0], names[1], nbytes)
        if delta > 0:
            received[names] = received.get(names, 0.0) + delta
