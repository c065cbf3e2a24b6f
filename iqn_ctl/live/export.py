"""Live export of the agent's records to NATS JetStream (``attach --export``).

Why: an ISP runs agents on many routers and one QoS service; every finished
stall and every watched-time record must reach it, also across a broker or
link outage and an agent crash. The rules (docs/export.md):

* **The history is the outbox.** A record is shipped from the agent's SQLite
  history (``stalls`` rows once ``ended`` or ``interrupted``, every
  ``sessions`` row) and marked sent (``exported_at``) only when JetStream has
  acknowledged it. Until then it waits on disk: a broker outage grows the
  backlog, a SIGKILL forgets nothing (what was sent but not yet marked is sent
  again after the restart).
* **Stable message ids.** Each message carries ``Nats-Msg-Id`` = its ``id``
  (``<router>/<history uuid>/stall|session/<row id>``), the same on every
  retry and after restarts, so JetStream drops re-sends inside the stream's
  duplicate window and consumers can be idempotent on it after that.
* **Never in the packet loop's way.** The exporter is a thread with its own
  asyncio loop (nats-py is asyncio) and its own SQLite connection (WAL: its
  reads never block the agent's writes; its marks are small transactions
  without fsync, since a mark lost to a power cut only means a re-send).
  Records go out in rounds of core publishes whose replies land on one
  wildcard inbox: the acknowledgements of a whole round are awaited together
  (``js.publish_async`` does the same with a future and a task switch per
  message and is ~2.5x slower here: bench/bench_export.py), while the next
  round is already read, encoded and sent (two rounds in flight), and the
  acknowledged records are marked by runs of row ids, one statement a run.

nats-py is imported only when an exporter starts, so the agent runs without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from iqn_ctl.extras import hint
from iqn_ctl.live.history import ensure_outbox
from iqn_ctl.live.settings import AgentError

log = logging.getLogger("iqn.export")

#: message schema version of one record (the ``v`` field); any change of the fields bumps it
SCHEMA_VERSION = 1
#: the version of a batch message (``--export-batch`` > 1): many v1 records in one message
BATCH_SCHEMA_VERSION = 2
#: ``--export-batch``: records per message; 1 sends v1 messages (one record each)
DEFAULT_RECORDS_PER_MSG = 1
MAX_RECORDS_PER_MSG = 1000
#: the stream the agent publishes to, created if missing
STREAM = "IQN"
STALL_SUBJECT = "iqn.stalls.{router}"
SESSION_SUBJECT = "iqn.sessions.{router}"
#: what a stream created by the agent listens on
STREAM_SUBJECTS = ("iqn.stalls.*", "iqn.sessions.*")
#: a stream created by the agent drops a re-sent message id within this many seconds
#: (JetStream's default, stated so that it is a contract: consumers de-duplicate after it)
DUPLICATE_WINDOW = 120.0
#: records published per round, their acknowledgements awaited together
BATCH = 1024
#: rounds in flight at once (Exporter._round)
WINDOW = 2
#: records written to the client's send buffer at once
PUB_CHUNK = 256
#: seconds a batch waits for its acknowledgements before its silent records are retried
ACK_TIMEOUT = 5.0
#: seconds a look-up of the stream waits for an answer after a failure or a reconnect, doubling
#: every PROBE_DOUBLING failed attempts up to ACK_TIMEOUT; while the broker answers, look-ups are
#: the back-off apart but at most PROBE_PAUSE_MAX.  Why look first: a JetStream stream
#: whose leader died answers nothing until its raft group elects another (seconds), and a batch
#: sent meanwhile is dropped; re-sending batches would hold the records ACK_TIMEOUT past each
#: one, while a look-up answers within milliseconds of the new leader.  Why grow: a slow but
#: working broker must not be given up on forever
PROBE_TIMEOUT = 0.5
PROBE_DOUBLING = 8
PROBE_PAUSE_MAX = 1.0
#: seconds between looks at the outbox while it is empty (bounds the export delay)
IDLE_POLL = 0.1
#: back-off after a failure: doubles from MIN to MAX seconds, reset by a success
BACKOFF_MIN = 0.25
BACKOFF_MAX = 4.0
#: the backlog (a COUNT over the waiting rows) is recounted at most this often (s)
COUNT_EVERY = 1.0
#: seconds the exporter pauses after a batch during which the packet loop fell behind
YIELD_PAUSE = 0.2
#: seconds a stopping agent gives the exporter to ship what is left (the rest waits on disk)
DRAIN_ON_STOP = 3.0
#: ``--router-id``: it becomes a subject token and a part of message ids
ROUTER_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_REPLICAS = 5
DEFAULT_PORT = 4222


def probe_wait(streak: int) -> float:
    """How long a look-up of the stream waits, after ``streak`` failed attempts in a row."""
    return min(ACK_TIMEOUT, PROBE_TIMEOUT * 2 ** (max(0, streak) // PROBE_DOUBLING))


def default_router_id() -> str:
    """The host name made a valid router id: a dot (or any other character a
    subject token cannot hold) becomes ``_``, at most 64 characters."""
    rid = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64]
    return rid or "router"


def check_router_id(rid: str) -> str:
    if not ROUTER_RE.fullmatch(rid):
        raise AgentError(f"--router-id must be 1-64 letters, digits, '_' or '-', got {rid!r}")
    return rid


def check_export_url(url: str) -> str:
    """``nats://HOST[:PORT]`` (port 4222 if omitted), returned with its port."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        port, u = -1, None
    if u is None or u.scheme != "nats" or not u.hostname or port == -1 or u.path not in ("", "/") \
            or u.query or u.fragment or u.username or u.password:
        raise AgentError(f"--export must be nats://HOST:PORT, got {url!r}")
    if port == 0:
        raise AgentError(f"--export port must be in 1..65535, got {url!r}")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"nats://{host}:{port or DEFAULT_PORT}"


def default_replicas(urls: Sequence[str]) -> int:
    """R3 when given a cluster's seeds (three or more), else R1: the stream then
    survives the loss of any one node."""
    return 3 if len(urls) >= 3 else 1


def check_replicas(n: int | None) -> None:
    if n is not None and not 1 <= n <= MAX_REPLICAS:
        raise AgentError(f"--export-replicas must be in 1..{MAX_REPLICAS}, got {n}")


def check_records_per_msg(n: int) -> None:
    if not 1 <= n <= MAX_RECORDS_PER_MSG:
        raise AgentError(f"--export-batch must be in 1..{MAX_RECORDS_PER_MSG}, got {n}")


def check_export(urls: Sequence[str], router_id: str | None, replicas: int | None,
                 records_per_msg: int = DEFAULT_RECORDS_PER_MSG) -> None:
    """The ``--export``, ``--router-id``, ``--export-replicas`` and ``--export-batch`` flags,
    checked before anything is attached (one error line naming the flag)."""
    for url in urls:
        check_export_url(url)
    if router_id is not None:
        check_router_id(router_id)
    check_replicas(replicas)
    if replicas is not None and not urls:
        raise AgentError("--export-replicas needs --export")
    check_records_per_msg(records_per_msg)


def start_exporter(db: Path, iface: str, urls: Sequence[str], router_id: str | None,
                   replicas: int | None, late: Callable[[], int] | None = None,
                   records_per_msg: int = DEFAULT_RECORDS_PER_MSG) -> Exporter:
    """The agent's exporter, started (its thread runs until :meth:`Exporter.stop`);
    ``late``: the packet loop's count of late polls (see :class:`Exporter`)."""
    try:
        import nats  # noqa: F401
    except ImportError:
        raise AgentError(f"--export: {hint('nats')}") from None
    return Exporter(db, iface, router_id or default_router_id(), [check_export_url(u) for u in urls],
                    replicas, late=late, records_per_msg=records_per_msg).start()


def _ports(flow: str) -> tuple[int, int]:
    """(server port, client port) from a flow label ``server:sport>client:dport``;
    (0, 0) for a per-client flow (``--key client``: no single connection)."""
    head, sep, tail = flow.rpartition(">")
    if not sep:
        return 0, 0
    try:
        return int(head.rpartition(":")[2]), int(tail.rpartition(":")[2])
    except ValueError:
        return 0, 0


def stall_body(mid: str, router: str, r: tuple[Any, ...], sport: int, cport: int) -> dict[str, Any]:
    """A stall message (schema v1, docs/export.md) from a ``stalls`` row as :class:`Outbox` reads it;
    a non-finite time becomes null (JSON has no NaN)."""
    _row, iface, flow, client, server, start, end, cand, detected, trunc, est, state = r

    def num(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {"v": SCHEMA_VERSION, "type": "stall", "id": mid, "router": router, "interface": iface,
            "client.address": client, "client.port": cport, "server.address": server, "server.port": sport,
            "iqn.flow": flow, "iqn.start": num(start), "iqn.end": num(end),
            "iqn.duration_s": num(end - start), "iqn.candidates": cand, "iqn.estimator": est,
            "iqn.truncated": bool(trunc), "iqn.state": state,
            "iqn.detected_at": num(detected)}


_q = encode_basestring_ascii


@dataclass(slots=True)
class Waiting:
    """Waiting records of one table, oldest first, encoded: their row ids and their v1 JSON
    texts in two lists (no Python object per record: making one cost about as much as the
    SQLite read of the row)."""

    table: str
    #: ``stall`` or ``session``: the record ``type``
    kind: str
    subject: str
    #: ``<router>/<history uuid>/<kind>/``: a record's id is this and its row id
    prefix: str
    rows: list[int]
    payloads: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    def msg_id(self, i: int) -> str:
        return f"{self.prefix}{self.rows[i]}"


@dataclass(slots=True)
class Message:
    """One NATS message: a v1 record, or a v2 batch of consecutive records of one table."""

    subject: str
    msg_id: str
    payload: bytes
    table: str
    #: the row ids of its records, oldest first
    rows: list[int]


class Outbox:
    """The export's view of the history file, on its own connection."""

    _STALLS = ('SELECT id, flow, client, server, start, "end", candidates, detected_at, truncated, '
               "estimator, state FROM stalls WHERE iface = ? AND exported_at IS NULL AND state != 'open' "
               "AND id > ? ORDER BY id LIMIT ?")
    _SESSIONS = ("SELECT id, client, server, slot, slot_s, watched_s, stalled_s, recorded_at "
                 "FROM sessions WHERE iface = ? AND exported_at IS NULL AND id > ? ORDER BY id LIMIT ?")
    #: a run of consecutive waiting rows marked in one statement (see :meth:`mark`)
    _MARK_RUN = {"stalls": "UPDATE stalls SET exported_at = ? WHERE iface = ? AND id BETWEEN ? AND ? "
                           "AND exported_at IS NULL AND state != 'open' RETURNING id",
                 "sessions": "UPDATE sessions SET exported_at = ? WHERE iface = ? AND id BETWEEN ? AND ? "
                             "AND exported_at IS NULL RETURNING id"}

    def __init__(self, path: Path, iface: str, router: str) -> None:
        self.iface = iface
        self.router = router
        self._db = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
        # a mark lost to a power cut means a re-send (de-duplicated), not a loss: no fsync
        self._db.execute("PRAGMA synchronous=NORMAL")
        self.uuid = ensure_outbox(self._db)
        self._sessions = bool(self._db.execute("PRAGMA table_info(sessions)").fetchall())
        self._few: dict[str, str] = {}  # escaped strings of few distinct values (see _stalls)
        self._stall_subject = STALL_SUBJECT.format(router=router)
        self._session_subject = SESSION_SUBJECT.format(router=router)
        self._stall_prefix = f"{router}/{self.uuid}/stall/"
        self._session_prefix = f"{router}/{self.uuid}/session/"
        # the constant parts of a stall message around its id (see _stalls)
        self._stall_head = f'{{"v":{SCHEMA_VERSION},"type":"stall","id":{_q(self._stall_prefix)[:-1]}'
        self._stall_after_id = f'","router":{_q(router)},"interface":{_q(iface)},"client.address":'

    def close(self) -> None:
        self._db.close()

    def backlog(self) -> int:
        n = int(self._db.execute(
            "SELECT COUNT(*) FROM stalls WHERE iface = ? AND exported_at IS NULL AND state != 'open'",
            (self.iface,)).fetchone()[0])
        if self._sessions:
            n += int(self._db.execute("SELECT COUNT(*) FROM sessions WHERE iface = ? AND exported_at IS NULL",
                                      (self.iface,)).fetchone()[0])
        return n

    def take(self, limit: int, after: dict[str, int] | None = None) -> list[Waiting]:
        """Up to ``limit`` waiting records, stalls first, oldest first, those of a table
        only past row ``after[table]`` (the rows still in flight: see ``Exporter._round``);
        a table with none waiting is left out."""
        after = after or {}
        out = []
        stalls = self._stalls(limit, after.get("stalls", 0))
        if stalls.rows:
            out.append(stalls)
        if self._sessions and len(stalls) < limit:
            sessions = self._session_rows(limit - len(stalls), after.get("sessions", 0))
            if sessions.rows:
                out.append(sessions)
        return out

    def _stalls(self, limit: int, after: int) -> Waiting:
        """The stall messages (schema v1, :func:`stall_body`) of up to ``limit`` waiting rows.

        Why written out by hand: this is most of the exporter's work per record. The text is
        byte for byte what ``json.dumps`` of :func:`stall_body` writes (tests/test_export.py):
        strings escaped by json's own C escaper, floats as ``repr`` (what json writes for a
        finite float), the few distinct servers, estimators and states escaped once, the
        constant parts (router, interface) once per call; a row with a non-finite time goes
        through :func:`stall_body` (JSON has no NaN: null). Measured against SQLite writing the
        JSON itself (``printf`` and ``json_quote`` in the SELECT): that was slower (5.7 against
        3.2 us a record here) and, with SQLite 3.40's float formatting, not exact."""
        rows: list[int] = []
        payloads: list[str] = []
        add_row, add = rows.append, payloads.append
        few = self._few
        if len(few) > 4096:
            few.clear()
        head, after_id, isfinite = self._stall_head, self._stall_after_id, math.isfinite
        for r in self._db.execute(self._STALLS, (self.iface, after, limit)):
            row, flow, client, server, start, end, cand, detected, trunc, est, state = r
            h, sep, t = flow.rpartition(">")
            try:
                sport, cport = (int(h.rpartition(":")[2]), int(t.rpartition(":")[2])) if sep else (0, 0)
            except ValueError:
                sport = cport = 0
            add_row(row)
            if not isfinite(start + end + detected):
                body = stall_body(f"{self._stall_prefix}{row}", self.router, (row, self.iface, *r[1:]),
                                  sport, cport)
                add(json.dumps(body, separators=(",", ":")))
                continue
            qs = few.get(server) or few.setdefault(server, _q(server))
            qe = few.get(est) or few.setdefault(est, _q(est))
            qt = few.get(state) or few.setdefault(state, _q(state))
            add(f'{head}{row}{after_id}{_q(client)},"client.port":{cport},"server.address":{qs},'
                f'"server.port":{sport},"iqn.flow":{_q(flow)},"iqn.start":{start!r},"iqn.end":{end!r},'
                f'"iqn.duration_s":{end - start!r},"iqn.candidates":{cand},"iqn.estimator":{qe},'
                f'"iqn.truncated":{"true" if trunc else "false"},"iqn.state":{qt},'
                f'"iqn.detected_at":{detected!r}}}')
        return Waiting("stalls", "stall", self._stall_subject, self._stall_prefix, rows, payloads)

    def _session_rows(self, limit: int, after: int) -> Waiting:
        rows: list[int] = []
        payloads: list[str] = []
        for row, client, server, slot, slot_s, watched, stalled, recorded in self._db.execute(
                self._SESSIONS, (self.iface, after, limit)):
            body = {"v": SCHEMA_VERSION, "type": "session", "id": f"{self._session_prefix}{row}",
                    "router": self.router, "interface": self.iface, "client.address": client,
                    "server.address": server, "iqn.slot": slot, "iqn.slot_s": slot_s,
                    "iqn.watched_s": watched, "iqn.stalled_s": stalled, "iqn.recorded_at": recorded}
            rows.append(row)
            payloads.append(json.dumps(body, separators=(",", ":")))
        return Waiting("sessions", "session", self._session_subject, self._session_prefix, rows, payloads)

    def mark(self, runs: Sequence[tuple[str, Sequence[int]]], at: float) -> None:
        """Record the broker's acknowledgement of the records ``runs`` names (one transaction):
        each run is a table and row ids, ascending.

        Why by runs: the exporter's acknowledged records are runs of consecutive *waiting*
        rows (a :meth:`take` returns every waiting row past its start, in order), so a run is
        marked with one ``UPDATE ... WHERE id BETWEEN first AND last`` over the waiting rows
        instead of one statement per row. The rows it marked are checked against the run
        (``RETURNING id``): if they differ (a row that became waiting inside the range since
        it was read, which the agent never does, or a run that is not one), the transaction
        is rolled back and the records are marked one row at a time, so no record is ever
        marked that was not acknowledged. (An SQLite older than 3.35 has no ``RETURNING``:
        there the marks always go one row at a time.)"""
        try:
            if sqlite3.sqlite_version_info < (3, 35, 0):
                raise _NotARun
            with self._db:
                for table, rows in runs:
                    if rows:
                        got = [r[0] for r in self._db.execute(self._MARK_RUN[table],
                                                              (at, self.iface, rows[0], rows[-1]))]
                        got.sort()
                        if got != list(rows):
                            raise _NotARun
        except _NotARun:
            with self._db:
                for table, rows in runs:
                    self._db.executemany(f"UPDATE {table} SET exported_at = ? WHERE id = ?",
                                         [(at, r) for r in rows])


class _NotARun(Exception):
    """:meth:`Outbox.mark`: a run's range held other waiting rows than the run's."""


@dataclass
class ExportStats:
    """What ``status`` (``export``) and the metrics show; written by the exporter thread."""

    router: str
    servers: list[str]
    stream: str = STREAM
    #: the server the exporter is connected to, "" while it is not
    connected: str = ""
    #: records waiting in the outbox (recounted about every second)
    backlog: int = 0
    #: records acknowledged by JetStream since the agent started, per type
    exported_stalls: int = 0
    exported_sessions: int = 0
    #: failed attempts: connecting, setting up the stream, a batch not wholly acknowledged
    errors: int = 0
    #: records sent again because an earlier attempt got no acknowledgement
    retries: int = 0
    #: epoch of the last acknowledged batch; None before the first
    last_export: float | None = None
    last_error: str = ""
    #: pauses after batches during which the packet loop fell behind
    paused: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"router": self.router, "servers": list(self.servers), "stream": self.stream,
                "connected": self.connected or None, "backlog": self.backlog,
                "exported_stalls": self.exported_stalls, "exported_sessions": self.exported_sessions,
                "errors": self.errors, "retries": self.retries, "last_export": self.last_export,
                "last_error": self.last_error, "paused": self.paused}


class Exporter:
    """Ships the outbox of one interface's agent to JetStream from its own thread."""

    def __init__(self, db: Path, iface: str, router: str, urls: Sequence[str], replicas: int | None = None,
                 wall: Callable[[], float] = time.time, batch: int = BATCH,
                 late: Callable[[], int] | None = None,
                 records_per_msg: int = DEFAULT_RECORDS_PER_MSG) -> None:
        """``late`` counts the packet loop's polls that fell behind (the agent's
        ``polls_late``): when it grew during a batch, the exporter pauses
        :data:`YIELD_PAUSE` s before the next, so draining a backlog gives the CPU
        (and the GIL) back to the loop instead of competing with it."""
        self._late = late
        self._late_seen = late() if late is not None else 0
        self.db = db
        self.iface = iface
        self.router = router
        self.urls = list(urls)
        self.replicas = replicas if replicas is not None else default_replicas(urls)
        self.batch = batch
        #: records per message: 1 = schema v1, more = v2 batch messages (docs/export.md)
        self.records_per_msg = records_per_msg
        self._wall = wall
        self._stats = ExportStats(router, list(urls))
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_at: float | None = None
        self._ready = threading.Event()
        self._streak = 0
        self._seq = 0
        self._inflight = {}
        self._window = deque()
        self._after = {}
        #: a batch was not acknowledged, or the connection moved: look the stream up (or create
        #: it) before the next batch (PROBE_TIMEOUT)
        self._need_stream = False

    # -- the agent's side --

    def start(self) -> Exporter:
        self._thread = threading.Thread(target=self._run_thread, name=f"iqn-export-{self.iface}", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)
        return self

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats.as_json()

    def stop(self, drain: float = DRAIN_ON_STOP) -> None:
        """Ship what is waiting for at most ``drain`` s more, then close; what is
        left stays in the outbox for the next agent."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if thread is None:
            return
        self._stop_at = time.monotonic() + drain
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(drain + ACK_TIMEOUT + 5.0)
        if thread.is_alive():
            log.error("%s: the exporter did not stop in time; unacknowledged records stay in the outbox",
                      self.iface)
        self._thread = None

    # -- the exporter's thread --

    def _set(self, **kw: Any) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self._stats, k, v)

    def _run_thread(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:  # the agent goes on inferring; the outbox keeps everything
            log.exception("%s: the exporter stopped on an unexpected error; records wait in %s",
                          self.iface, self.db)
        finally:
            self._ready.set()

    def _fail(self, what: str, e: BaseException | str) -> None:
        msg = f"{what}: {e if isinstance(e, str) else (str(e) or type(e).__name__)}"
        self._streak += 1
        with self._lock:
            self._stats.errors += 1
            self._stats.last_error = msg
        if self._streak == 1:
            log.warning("%s: export to %s failed (%s); records wait in the history and are retried",
                        self.iface, ",".join(self.urls), msg)

    def _ok(self) -> None:
        if self._streak:
            log.info("%s: export to %s works again after %d failed attempt(s)", self.iface,
                     ",".join(self.urls), self._streak)
            self._streak = 0
            self._set(last_error="")

    def _loop_behind(self) -> bool:
        """Did the packet loop fall behind since the last look? (counted in ``paused``)"""
        if self._late is None:
            return False
        n = self._late()
        behind, self._late_seen = n > self._late_seen, n
        if behind:
            with self._lock:
                self._stats.paused += 1
        return behind

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, cut short by a stop request."""
        assert self._stop is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _past_drain(self) -> bool:
        return self._stop_at is not None and time.monotonic() >= self._stop_at

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._inflight, self._window, self._after = {}, deque(), {}
        outbox = Outbox(self.db, self.iface, self.router)
        self._ready.set()
        log.info("%s: exporting to %s as router %s (stream %s, R%d if it is created)", self.iface,
                 ",".join(self.urls), self.router, STREAM, self.replicas)
        backoff = BACKOFF_MIN
        nc: Any = None
        try:
            while not self._past_drain():
                self._count(outbox)  # also while the broker is away: the backlog is what it shows
                if nc is None or nc.is_closed:
                    await self._finish_all(outbox)  # rounds sent on a closed connection: retried
                    nc = await self._connect()
                    if nc is None:
                        if self._stopping():
                            break
                        await self._sleep(backoff)
                        backoff = min(2 * backoff, BACKOFF_MAX)
                        continue
                    self._ack_prefix = nc.new_inbox() + "."
                    await nc.subscribe(self._ack_prefix + "*", cb=self._on_ack)
                    self._need_stream = True
                if self._need_stream and nc.is_connected:  # (reconnecting: the round says so)
                    self._need_stream = False
                    if not await self._ensure_stream(nc):
                        if self._stopping():
                            break
                        # a broker that answers but has no stream leader yet is looked at again
                        # soon (the look-up itself waits): the new leader is what we wait for
                        await self._sleep(min(backoff, PROBE_PAUSE_MAX))
                        backoff = min(2 * backoff, BACKOFF_MAX)
                        continue
                shipped = await self._round(nc, outbox)
                if shipped is None:  # a failure: back off, the same records go again
                    if self._stopping():
                        break
                    await self._sleep(backoff)
                    backoff = min(2 * backoff, BACKOFF_MAX)
                    continue
                backoff = BACKOFF_MIN
                if self._loop_behind():
                    await self._sleep(YIELD_PAUSE)
                if shipped < self.batch:
                    if self._stopping():
                        break  # the outbox is empty: done
                    await self._sleep(IDLE_POLL)
        finally:
            if nc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 2.0)
            with contextlib.suppress(Exception):
                self._count(outbox, force=True)
            outbox.close()
            self._set(connected="")

    async def _connect(self) -> Any:
        import nats

        async def failed(e: Exception) -> None:
            # every failed (re)connect attempt: counted, logged once per streak of failures
            # (the client keeps trying the seeds every reconnect_time_wait, also on the first connect)
            self._fail("connect", e)

        async def gone() -> None:
            self._set(connected="")
            # the answers to batches sent on the lost connection cannot come: retry them now
            for rnd in self._window:
                rnd.done.set()
            self._need_stream = True
            log.info("%s: export: disconnected from the broker; records wait in the history", self.iface)

        async def back() -> None:
            self._need_stream = True  # the stream may be electing a leader (its node gone)
            self._set(connected=self._server(nc))
            log.info("%s: export: reconnected to %s", self.iface, self._server(nc))

        # the client tries the seeds until one answers (also on this first connect): a stop
        # request must not wait for that beyond its drain time
        task = asyncio.ensure_future(nats.connect(
            servers=self.urls, connect_timeout=2, reconnect_time_wait=0.5, max_reconnect_attempts=-1,
            allow_reconnect=True, error_cb=failed, disconnected_cb=gone, reconnected_cb=back,
            name=f"iqn-ctl {self.router}"))
        while not task.done():
            await asyncio.wait({task}, timeout=0.1)
            if not task.done() and self._past_drain():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                return None
        try:
            nc = task.result()
        except Exception as e:  # refused, timed out, no servers: the broker is down, retry
            self._fail("connect", e)
            return None
        self._set(connected=self._server(nc))
        return nc

    @staticmethod
    def _server(nc: Any) -> str:
        u = nc.connected_url
        return f"nats://{u.netloc}" if u is not None else ""

    async def _ensure_stream(self, nc: Any) -> bool:
        """The stream exists (created with our subjects and replicas if it did not)."""
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        js = nc.jetstream(timeout=ACK_TIMEOUT)
        try:
            try:
                await nc.jetstream(timeout=probe_wait(self._streak)).stream_info(STREAM)
            except NotFoundError:
                await js.add_stream(StreamConfig(name=STREAM, subjects=list(STREAM_SUBJECTS),
                                                 num_replicas=self.replicas, storage=StorageType.FILE,
                                                 duplicate_window=DUPLICATE_WINDOW))
                log.info("%s: export: created stream %s (R%d, duplicate window %g s)", self.iface, STREAM,
                         self.replicas, DUPLICATE_WINDOW)
        except Exception as e:  # no leader yet, timeout, disconnected: try again
            self._fail("stream set-up", e)
            self._need_stream = True
            # now and then through another server (this one may be cut off from the others)
            if not nc.is_connected or self._streak % PROBE_DOUBLING == 0:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 2.0)
            return False
        return True

    def _count(self, outbox: Outbox, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= getattr(self, "_count_at", 0.0):
            self._count_at = now + COUNT_EVERY
            self._set(backlog=outbox.backlog())

    # rounds in flight, oldest first; token -> (its round, the message's index) for the acks
    _ack_prefix = ""
    _inflight: dict[str, tuple[_Round, int]]
    _window: deque[_Round]
    #: per table, the last row taken by a round in flight: the next take starts past it
    _after: dict[str, int]

    async def _on_ack(self, msg: Any) -> None:
        hit = self._inflight.pop(msg.subject[len(self._ack_prefix):], None)
        if hit is None:
            return  # a late answer of an earlier round: its records were retried
        rnd, i = hit
        hdr = msg.headers
        if hdr and hdr.get("Status") == "503":
            rnd.refused.append("no stream answers (503)")
        elif b'"error"' in msg.data:
            rnd.refused.append(msg.data.decode(errors="replace")[:200])
        else:
            rnd.acked[i] = True
        rnd.left -= 1
        if not rnd.left:
            rnd.done.set()

    def _messages(self, waiting: Sequence[Waiting], max_payload: int) -> list[Message]:
        """The messages of ``waiting``: one per record (schema v1), or with ``records_per_msg``
        > 1, v2 batches of consecutive records of one subject.

        Why batches: JetStream stores, de-duplicates and acknowledges per message, and each
        consumer pays its client's per-message costs, so several records per message is what
        lifts both ends' rates.  A batch's id names its records exactly (first and last row,
        and a digest of all of them), so a re-sent batch of the same records is de-duplicated
        by JetStream, and a batch that regroups them after a failure has another id: consumers
        are idempotent on each record's own id anyway (docs/export.md)."""
        out: list[Message] = []
        if self.records_per_msg <= 1:
            for w in waiting:
                pre, subject, table = w.prefix, w.subject, w.table
                out.extend(Message(subject, f"{pre}{row}", p.encode(), table, [row])
                           for row, p in zip(w.rows, w.payloads, strict=True))
            return out
        # a message stays under half the server's max_payload (1 MiB by default; 0: not known yet)
        limit = max_payload // 2 if max_payload > 0 else 1 << 19
        per, qrouter = self.records_per_msg, _q(self.router)
        for w in waiting:
            rows, pays, n = w.rows, w.payloads, len(w.rows)
            i = 0
            while i < n:
                end = min(i + per, n)
                # the records are ASCII (json's escaper): a text's length is its size in bytes
                size, j = len(pays[i]) + 1, i + 1
                while j < end and size + len(pays[j]) <= limit:
                    size += len(pays[j]) + 1
                    j += 1
                group = rows[i:j]
                digest = hashlib.blake2b(",".join(map(str, group)).encode(), digest_size=8).hexdigest()
                mid = f"{w.prefix}{group[0]}-{group[-1]}/{digest}"
                body = (f'{{"v":{BATCH_SCHEMA_VERSION},"type":"batch","id":{_q(mid)},"router":{qrouter},'
                        f'"records":[{",".join(pays[i:j])}]}}')
                out.append(Message(w.subject, mid, body.encode(), w.table, group))
                i = j
        return out

    async def _publish(self, nc: Any, rnd: _Round) -> None:
        """Publish the messages of ``rnd``, each with a reply subject of its own under the
        ack inbox, and hand them to the client's flusher.

        Why not ``nc.publish`` per message: it validates and encodes each header and
        runs a coroutine per message, which is most of the exporter's time. The
        messages are written as the protocol's ``HPUB`` frames (the subjects,
        reply tokens and ids are made of characters the protocol allows:
        ``--router-id`` is checked), a chunk at a time, through the client's own
        send buffer, so they are flushed, and buffered across a reconnect, exactly
        like its publishes. A client without that method gets ``nc.publish``."""
        prefix = self._ack_prefix
        send = getattr(nc, "_send_command", None)
        chunk: list[bytes] = []
        for i, m in enumerate(rnd.msgs):
            # unique across rounds: a late answer to an earlier round never acknowledges this one
            self._seq += 1
            token = str(self._seq)
            self._inflight[token] = (rnd, i)
            if send is None:
                await nc.publish(m.subject, m.payload, reply=prefix + token,
                                 headers={"Nats-Msg-Id": m.msg_id})
                continue
            hdr = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % m.msg_id.encode()
            chunk.append(b"HPUB %s %s%s %d %d\r\n%s%s\r\n" % (
                m.subject.encode(), prefix.encode(), token.encode(), len(hdr), len(hdr) + len(m.payload), hdr,
                m.payload))
            if len(chunk) >= PUB_CHUNK:
                await send(b"".join(chunk))
                chunk = []
        if send is not None:
            if chunk:
                await send(b"".join(chunk))
            # what nc.publish does after each message: wake the flusher (nc.flush would also
            # wait for the server's PONG, a round trip per round)
            kick = getattr(nc, "_flush_pending", None)
            await (kick() if kick is not None else nc.flush(timeout=ACK_TIMEOUT))

    async def _round(self, nc: Any, outbox: Outbox) -> int | None:
        """Publish one round of records and mark what JetStream acknowledged. Returns how
        many records it took, None if some (of it or of a round before) were not
        acknowledged (or not sent).

        Why a window of rounds: the broker stores and acknowledges a round while the
        exporter reads, encodes and publishes the next one (and marks the one before),
        instead of each waiting for the other: up to :data:`WINDOW` rounds are in flight,
        each taking the waiting rows past those of the rounds before it. A round is
        finished (awaited, marked) oldest first; after a failure every round in flight is
        finished (what was acknowledged is marked) and the next take starts from the
        oldest waiting row again, so nothing unacknowledged is skipped. A take of less than a
        full round (the outbox drained) finishes them all: nothing stays in flight while
        the exporter idles."""
        if not nc.is_connected:
            self._fail("publish", "not connected to the broker")
            await self._finish_all(outbox)
            return None
        waiting = outbox.take(self.batch, self._after)
        taken = sum(len(w) for w in waiting)
        if taken:
            for w in waiting:
                self._after[w.table] = w.rows[-1]
            rnd = _Round(self._messages(waiting, int(getattr(nc, "max_payload", 0) or 0)), taken)
            self._window.append(rnd)
            try:
                await self._publish(nc, rnd)
            except Exception as e:  # disconnected mid-round, buffer full
                self._fail("publish", e)
                await self._finish_all(outbox)
                return None
        while self._window and (len(self._window) >= WINDOW or taken < self.batch):
            if not await self._finish(self._window.popleft(), outbox):
                await self._finish_all(outbox)
                return None
        if not self._window:
            self._after = {}
        return taken

    async def _finish_all(self, outbox: Outbox) -> None:
        """Finish every round in flight (their failures already counted by the caller's)."""
        while self._window:
            await self._finish(self._window.popleft(), outbox, quiet=True)
        self._after = {}
        self._inflight = {}

    async def _finish(self, rnd: _Round, outbox: Outbox, quiet: bool = False) -> bool:
        """Await ``rnd``'s acknowledgements (until :data:`ACK_TIMEOUT` s after it was sent)
        and mark the acknowledged records; False if some were not acknowledged."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(rnd.done.wait(), max(0.0, rnd.sent + ACK_TIMEOUT - time.monotonic()))
        if rnd.left:  # a late answer is ignored: its records are sent again
            for token in [t for t, (r, _) in self._inflight.items() if r is rnd]:
                del self._inflight[token]
        runs: list[tuple[str, list[int]]] = []
        n_acked = n_stalls = 0
        prev = False
        for m, ok in zip(rnd.msgs, rnd.acked, strict=True):
            if ok:
                if prev and runs[-1][0] == m.table:
                    runs[-1][1].extend(m.rows)
                else:
                    runs.append((m.table, list(m.rows)))
                n_acked += len(m.rows)
                if m.table == "stalls":
                    n_stalls += len(m.rows)
            prev = ok
        if runs:
            outbox.mark(runs, self._wall())
            with self._lock:
                self._stats.exported_stalls += n_stalls
                self._stats.exported_sessions += n_acked - n_stalls
                self._stats.last_export = self._wall()
                self._stats.backlog = max(0, self._stats.backlog - n_acked)
        missing = rnd.records - n_acked
        if not missing:
            if not quiet:
                self._ok()
            return True
        with self._lock:
            self._stats.retries += missing
        self._need_stream = True  # refused (503) or silent: a stream without a leader, or gone
        if quiet:
            pass
        elif rnd.refused:
            self._fail("publish", f"{len(rnd.refused)} refused, e.g. {rnd.refused[0]}")
        else:
            self._fail("publish",
                       f"{missing} of {rnd.records} record(s) not acknowledged in {ACK_TIMEOUT:g} s")
        return False


@dataclass(slots=True)
class _Round:
    """The messages of one round in flight and what their acknowledgements said."""

    msgs: list[Message]
    #: how many records its messages hold
    records: int
    acked: list[bool] = field(init=False)
    #: messages not answered yet
    left: int = field(init=False)
    refused: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: monotonic time it was made (its acknowledgements are awaited until ACK_TIMEOUT after)
    sent: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.acked = [False] * len(self.msgs)
        self.left = len(self.msgs)
        if not self.msgs:
            self.done.set()
