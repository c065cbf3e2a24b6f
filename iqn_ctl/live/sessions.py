"""Watched time of the clients that signal, measured from the kernel's
per-flow counters and written to the ``sessions`` table of the agent's history.

The accounting itself is sans-I/O (:mod:`iqn_ctl.engine.watch`); this module
feeds it and stores what it closes:

* Which client received how much, when: the XDP program counts, per client
  address, every UDP packet from the signalling port (443: QUIC, so the page
  *and* the video connections of an HTTP/3 player) in a slot of a plain array
  the client owns (``vol_client``, docs/dataplane.md), with the source of its
  last non-candidate datagram: the media server. Once a second the known
  clients' slots are read from the mapped array (no system call); a known
  client whose slot is not its own claims it, and counts from the next sample.
  A slot seen for the first time (or claimed again since) counts whole in that
  sample: the kernel claimed it with one of the client's candidates, recently.
  The bytes of a sample go to the server the slot names (the one whose
  datagram came last), or to the server the client signalled through.
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
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Protocol

from iqn_ctl.engine.watch import DEFAULT_SLOT, RECORD_VERSION, WatchAccounting, WatchRecord
from iqn_ctl.live.history import HistoryError

log = logging.getLogger("iqn.sessions")

#: seconds between samples of the known clients' counters
SAMPLE_EVERY = 1.0
#: a slot is closed this long after its end: stalls ending at the edge are known by then
#: (the stall-end window is 4 p = 0.8 s by default)
GRACE = 2.0
#: rows held in memory while the history cannot be written
MAX_HELD = 10_000
#: newest rows kept (~100 bytes each: ~100 MB at most)
MAX_SESSION_ROWS = 1_000_000
_PRUNE_EVERY = 1024

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


class ClientVolume(Protocol):
    """What the sampler needs of :class:`~iqn_ctl.live.datapath.Datapath`."""

    def client_volume(
        self, clients: Iterable[str], claim: bool = True
    ) -> dict[str, tuple[int, int, str] | None]: ...


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
                 since: float | None = None) -> None:
        self.acc = WatchAccounting(slot_s, router if router is not None else socket.gethostname(), iface)
        self.store = SessionStore(db)
        start = time.time() if since is None else since
        for client in self.store.known_clients(iface):
            self.acc.know(client, start)
        #: known client -> its (byte counter, slot claim count) at the last sample
        self._bytes: dict[str, tuple[int, int]] = {}
        #: client -> the server it last signalled through (bytes with no server named go there)
        self._signal: dict[str, str] = {}
        self._last: float | None = None
        self._due = 0.0

    # stall events, epoch seconds (the agent adds its wall-clock offset)
    def stall_started(self, flow: Hashable, client: str, server: str, start: float) -> None:
        self._signal[client] = server
        self.acc.stall_started(flow, client, server, start)

    def stall_ended(self, flow: Hashable, client: str, server: str, start: float, end: float,
                    kept: bool, detected: float | None = None) -> None:
        # A client that becomes known waits for the next budgeted scan to have its
        # connections learnt: forcing a scan per new client let forged signals (a new
        # "client" every second) keep the agent scanning 65k kernel entries all the
        # time (74 % of a core in the soak, against the 2 % budget).
        self.acc.stall_ended(flow, client, server, start, end, kept, detected)

    def tick(self, dp: ClientVolume, now: float, off: float) -> None:
        """Sample if due (``now`` monotonic, ``off`` = wall minus monotonic), close
        the slots that are over and write their records."""
        if now < self._due:
            return
        self._sample(dp, now, off)
        self.store.add(self.acc.close_until(now + off - GRACE), now + off)
        if self.store.pending:
            self.store.flush()

    def finish(self, dp: ClientVolume | None, now: float, off: float) -> None:
        """The agent stops: a last sample, then every slot closes (the current one early)."""
        if dp is not None:
            self._sample(dp, now, off)
        self.store.add(self.acc.close_all(now + off), now + off)
        if not self.store.flush(force=True):
            log.error("%d watched-time record(s) could not be written to %s and are lost",
                      self.store.pending, self.store.path)

    def close(self) -> None:
        self.store.close()

    def _sample(self, dp: ClientVolume, now: float, off: float) -> None:
        t0 = now if self._last is None else self._last
        received: dict[tuple[str, str], float] = {}
        clients = self.acc.clients
        if not clients:
            self._bytes.clear()
        else:
            for client, got in dp.client_volume(sorted(clients)).items():
                if got is None:  # not its slot (yet): claimed now, counted from the next sample
                    self._bytes.pop(client, None)
                    continue
                nbytes, claims, server = got
                old = self._bytes.get(client)
                self._bytes[client] = (nbytes, claims)
                # First sight (or counters restarted by a new claim): all of it counts in this
                # sample, as the flow-table sampler counted a key first seen with a fresh packet.
                # The kernel claimed the slot with one of the client's candidates, and a client
                # becomes known when its stall ends, so those bytes are recent; a slot we claimed
                # ourselves starts at zero.
                delta = nbytes if old is None or old[1] != claims else nbytes - old[0]
                if delta <= 0:
                    continue
                names = (client, server or self._signal.get(client, ""))
                received[names] = received.get(names, 0.0) + delta
            if len(self._bytes) > len(clients):
                self._bytes = {c: b for c, b in self._bytes.items() if c in clients}
        self.acc.sample(t0 + off, now + off, received)
        self._last = now
        self._due = now + SAMPLE_EVERY
