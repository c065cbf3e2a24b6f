"""``iqn-qos serve``: the live QoS service, fed by the routers' export over NATS JetStream.

A durable pull consumer on stream ``IQN`` (subjects ``iqn.sessions.*`` and
``iqn.stalls.*``) fetches batches of messages, each one record (export schema v1)
or many (a v2 batch); each batch is decoded (:mod:`iqn_qos.ingest`, on the decode
thread), stored in one DuckDB transaction idempotent on the records' ids
(:meth:`Store.ingest`, on the store thread, while the next batch is decoded and the
loop pulls the one after), and only then acknowledged, each message explicitly.  A
crash before the ack means the broker re-delivers (after the ack wait), and the
ids make a second delivery a no-op: every record is stored once.  (Not ack
policy *all*, cheaper as it is: after a restart, acking the new service's first
batch would also acknowledge the batch the killed one had in hand and never
stored: the restart test lost exactly that batch with it.  v2 messages make the
acks few instead: one per batch of records.)  Closed slots that
gained lines are inferred in rounds (:class:`~iqn_qos.ingest.SlotPlanner`), and on
demand (``POST /api/infer``), on an inference thread with its own DuckDB connection:
storing never waits for an inference (late records used to wait seconds for one).

Why the pull loop is hand-made: nats-py's ``fetch()`` hands over messages one
``await`` (and one timer) at a time, which capped ingestion at ~27,000
messages/s here; a pull request on our own inbox subscription, whose callback
only appends to a list, reaches ~100,000/s (bench/bench_qos_serve.py).  The
request is JetStream's documented ``$JS.API.CONSUMER.MSG.NEXT`` API; its end
is a status message (408 expired, 404 nothing, 409 a consumer change).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QosError
from .ingest import Columns, Decoder, SlotPlanner
from .mle import Estimate, infer_counts
from .store import Ingested, Store
from .topology import Topology, load_topology
from .view import Counters, View
from .web import Web

log = logging.getLogger("iqn_qos.serve")

STREAM = "IQN"
SUBJECTS = ("iqn.stalls.*", "iqn.sessions.*")
#: slots kept in memory for the page, /metrics and predict
KEEP_SLOTS = 96
#: a batch delivered but not acknowledged (the service died before storing it) is
#: re-delivered after this long; storing a batch takes well under a second
ACK_WAIT_S = 10.0
#: batches decoded, stored and not yet acknowledged at once (one decoding while one is written)
MAX_IN_FLIGHT = 2
#: when idle, the consumer's lag and ack-pending counts are refreshed this often (s)
INFO_S = 0.5
#: closed dirty slots are inferred at most this often (s): a round reads each slot's sufficient
#: statistics with one GROUP BY (DuckDB, off the interpreter lock) and solves in the worker
#: process, so rounds may follow each other closely; a late record is shown about a round after
#: it is stored.  While a backlog drains, DRAIN_TICK_S: a slot still gaining lines from the
#: backlog would be inferred again and again, taking CPU from the decode (the drain's bottleneck);
#: so a backlog is mostly stored first, then inferred
TICK_S = 0.2
DRAIN_TICK_S = 30.0


@dataclass(frozen=True)
class ServeConfig:
    nats: Sequence[str]
    topology: Path
    store: Path
    durable: str = "iqn-qos"
    slot_s: float = 900.0
    grace_s: float = 10.0
    host: str = "127.0.0.1"
    port: int = 9480
    batch: int = 5000  # messages per pull (at most)
    max_bytes: int = 4 << 20  # and bytes per pull: a v2 batch message holds many records
    expires_s: float = 0.1  # a pull waits this long for a full batch: the delay when caught up
    threshold: float = 0.01
    l1: float = 1e-4
    #: puller processes (0: the service pulls and decodes in its own process); see _Pullers.  On the
    #: 2-core box with a core to spare 2 drained 105k records/s against 77k without
    #: (bench/bench_qos_serve.py); with 2 the shortened localisation test with a node kill
    #: (tests/test_localise.py) ranked the faulty component first in 4 of 7 runs, likely from
    #: the pullers spinning on 503 answers while the consumer had no leader (_Batch.pull)
    pullers: int = 0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``PORT`` (on 127.0.0.1); IPv6 as ``[::1]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise QosError(f"--listen: expected HOST:PORT, got {text!r}") from None
    if not 0 <= p <= 65535:
        raise QosError(f"--listen: port out of range: {p}")
    return host, p


def _ack_meta(reply: str) -> tuple[int, int, int]:
    """(stream sequence, publish time ns, pending) from a JetStream ack subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``, or the
    longer form with domain and account hash)."""
    t = reply.split(".")
    if len(t) == 9:
        return int(t[5]), int(t[7]), int(t[8])
    return int(t[8]), int(t[10]), int(t[11])


class _GcPause:
    """Pause the cyclic garbage collector while any thread decodes or stores a batch.

    Why: a batch is tens of thousands of new objects (parsed dicts, records, lines, numpy
    object arrays), none in a reference cycle (reference counting frees them all), and the
    collector, run every few hundred allocations, walked the growing batch again and again:
    the decode took 1.5-2x its time with it on.  Nested and threaded uses count; the collector
    comes back as it was when the last one ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holds = 0
        self._was = True

    def __enter__(self) -> None:
        with self._lock:
            if self._holds == 0:
                self._was = gc.isenabled()
                gc.disable()
            self._holds += 1

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._holds -= 1
            if self._holds == 0 and self._was:
                gc.enable()


_gc_paused = _GcPause()


def _die_with_parent(parent: int) -> None:
    """Initializer of the solver process: it ends when the service does, also a SIGKILLed one.
    Why: a spawned worker otherwise outlives a killed service, waiting forever on its queue (the
    restart tests left one per kill).  Linux's PR_SET_PDEATHSIG signals it when the thread that
    started it (the service's loop) ends; a service already gone before that is seen by its
    parent id."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


class Service:
    """The store, the decoder, the planner and the view, driven by :meth:`run`'s loop
    (or by a test or benchmark calling :meth:`handle` and :meth:`tick` directly)."""

    def __init__(self, cfg: ServeConfig, topology: Topology | None = None,
                 on_stored: Callable[[Columns, float], None] | None = None) -> None:
        self.cfg = cfg
        self.topology = topology if topology is not None else load_topology(cfg.topology)
        self.decoder = Decoder(self.topology)
        self.planner = SlotPlanner(cfg.slot_s, cfg.grace_s)
        self.store = Store(cfg.store)
        self.counters = Counters()
        self.on_stored = on_stored
        self._history: dict[float, list[Estimate]] = {}
        self._version = 0
        for start, ests in self.store.latest(KEEP_SLOTS):
            self._history[start] = ests
        # slots whose stored lines changed since their estimate (a crash between store and
        # inference) are inferred again once closed
        for start in self.store.slot_starts(cfg.slot_s)[-KEEP_SLOTS:]:
            if self.store.cached(start, cfg.slot_s, cfg.threshold, cfg.l1) is None:
                self.planner.dirty.add(start)
        if self._history:
            self.counters.last_slot = max(self._history)
        self.view = self._make_view()

    def _make_view(self) -> View:
        self._version += 1
        hist = sorted(self._history.items())[-KEEP_SLOTS:]
        return View(self._version, self.cfg.slot_s, self.cfg.threshold, hist, dict(self.topology.kinds),
                    self.counters.copy())

    def decode_batch(self, datas: Sequence[bytes], ids: Sequence[str]) -> Columns:
        """The records of a batch of messages as columns (``ids[i]`` names message i when it
        carries no id; a v2 message brings many); runs on the decode thread (:func:`run`) or in
        a puller process, touches nothing but the decoder."""
        with _gc_paused:
            return self.decoder.decode_columns(datas, ids)

    def store_decoded(self, cols: Columns, now: float) -> Ingested:
        """Store decoded records in one transaction; runs on the store thread, touches nothing
        but the store."""
        with _gc_paused:
            got = self.store.ingest_columns(cols, now)
        if self.on_stored is not None:
            self.on_stored(cols, time.time())
        return got

    def store_batch(self, datas: Sequence[bytes], ids: Sequence[str], now: float) -> tuple[Columns, Ingested]:
        """:meth:`decode_batch` then :meth:`store_decoded`, in the calling thread."""
        cols = self.decode_batch(datas, ids)
        return cols, self.store_decoded(cols, now)

    def account(self, cols: Columns, got: Ingested, now: float) -> None:
        """Count a stored batch and mark its slots dirty (on the loop: the counters' owner)."""
        c = self.counters
        for typ, n in got.types.items():
            c.records[typ] = c.records.get(typ, 0) + n
        c.lines += got.nlines
        c.empty += got.empty
        c.duplicates += got.duplicates
        c.rejected += len(got.rejected)
        c.batches += 1
        for d in got.rejected:
            log.warning("rejected message %s: %s", d.id, d.error)
        self.planner.added(got.lines)
        if got.line_t is not None and got.line_t.size:
            self.planner.added_times(got.line_t)
        at = cols.at[~np.isnan(cols.at)]
        if cols.others:
            at = np.concatenate([at, np.array([d.at for d in cols.others if d.at is not None], float)])
        if at.size:
            c.observe_delays(now - at)

    def handle(self, datas: Sequence[bytes], ids: Sequence[str], now: float) -> Ingested:
        """:meth:`store_batch` and :meth:`account` in one call (no threads)."""
        cols, got = self.store_batch(datas, ids, now)
        self.account(cols, got, now)
        return got

    def due(self, now: float, force: bool = False) -> list[float]:
        """The slots to infer now (every dirty one when ``force``); they stop being dirty."""
        due = sorted(self.planner.dirty) if force else self.planner.due(now)
        if force:
            self.planner.dirty.clear()
        return due

    def infer_slots(self, due: Sequence[float], store: Store | None = None,
                    solver: concurrent.futures.Executor | None = None,
                    on_slot: Callable[[float, list[Estimate]], None] | None = None,
                    ) -> list[tuple[float, list[Estimate]]]:
        """Estimates of ``due`` (runs on the inference thread with its own ``store`` cursor:
        each slot is read from one snapshot, so storing goes on meanwhile; the MLE itself runs
        in the ``solver`` process, so it does not hold this process' GIL for seconds).
        ``on_slot`` gets each slot's estimates as soon as they are there: the service shows a
        slot then, not after the round's last one."""
        st = store if store is not None else self.store

        def solve(counts: Sequence[Any], **kw: Any) -> list[Estimate]:
            if solver is None:
                return infer_counts(counts, **kw)
            return solver.submit(infer_counts, list(counts), **kw).result()

        out = []
        for start in due:
            t0 = time.monotonic()
            try:
                ests = st.infer(start, self.cfg.slot_s, threshold=self.cfg.threshold, l1=self.cfg.l1,
                                solve=solve)
            except QosError as e:
                log.warning("slot %.0f: %s", start, e)
                continue
            out.append((start, ests))
            if on_slot is not None:
                on_slot(start, ests)
            worst = ests[0] if ests else None
            log.info("slot %.0f inferred in %.2f s: %d components%s", start, time.monotonic() - t0, len(ests),
                     f", worst {worst.component} p={worst.p:.4f}" if worst else "")
        return out

    def apply(self, inferred: Sequence[tuple[float, list[Estimate]]]) -> None:
        """Keep inferred estimates for the view (on the loop)."""
        for start, ests in inferred:
            self._history[start] = ests
            self.counters.inferences += 1
            self.counters.last_slot = max(self.counters.last_slot or start, start)

    def tick(self, now: float, force: bool = False) -> int:
        """Infer the slots that are due, here and now; returns how many."""
        due = self.due(now, force)
        self.apply(self.infer_slots(due))
        return len(due)

    def publish_view(self) -> None:
        self.view = self._make_view()

    def close(self) -> None:
        self.store.close()


async def _connect(cfg: ServeConfig) -> Any:
    import nats

    async def _err(e: Exception) -> None:
        log.warning("nats: %s", e)

    try:
        return await nats.connect(servers=list(cfg.nats), connect_timeout=5, max_reconnect_attempts=-1,
                                  reconnect_time_wait=0.5, error_cb=_err, allow_reconnect=True,
                                  pending_size=1 << 28)
    except Exception as e:  # nats-py raises several kinds when no server answers
        raise QosError(f"--nats {','.join(cfg.nats)}: cannot connect ({e or type(e).__name__})") from None


async def _ensure(js: Any, cfg: ServeConfig) -> None:
    """Stream IQN (created if missing, as the export does) and our durable consumer."""
    import nats.errors
    import nats.js.errors
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    deadline = time.monotonic() + 60
    while True:
        try:
            try:
                await js.stream_info(STREAM)
            except nats.js.errors.NotFoundError:
                with contextlib.suppress(nats.js.errors.BadRequestError):
                    await js.add_stream(name=STREAM, subjects=list(SUBJECTS))
            try:
                await js.consumer_info(STREAM, cfg.durable)
            except nats.js.errors.NotFoundError:
                await js.add_consumer(STREAM, ConsumerConfig(
                    durable_name=cfg.durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                    filter_subjects=list(SUBJECTS), ack_wait=ACK_WAIT_S,
                    max_ack_pending=max(4 * cfg.batch, 20000), max_waiting=64))
            return
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError,
                nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError):
            if time.monotonic() > deadline:
                raise QosError("JetStream did not answer for 60 s (no stream leader?)") from None
            await asyncio.sleep(0.5)


class _Batch:
    """Pull requests on the durable consumer, their messages collected by the callback of our
    own inbox's subscription (:meth:`open`, then :meth:`pull` per batch)."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.msgs: list[Any] = []
        self.done = asyncio.Event()
        self.nc: Any = None
        self.cfg: ServeConfig | None = None
        self.inbox = self.subject = ""
        self.request = b""
        self.status = ""  # the status that ended the last pull ("": none came)
        self.unanswered = 0  # pulls in a row answered 503 (no consumer leader)

    @classmethod
    async def open(cls, nc: Any, cfg: ServeConfig) -> _Batch:
        """Subscribed to a new inbox of ``nc``, ready to pull batches of ``cfg.batch``."""
        b = cls(cfg.batch)
        b.nc, b.cfg, b.inbox = nc, cfg, nc.new_inbox()
        await nc.subscribe(b.inbox, cb=b.cb, pending_msgs_limit=4 * cfg.batch + 1000,
                           pending_bytes_limit=1 << 28)
        b.subject, b.request = _pull_request(cfg, nc)
        return b

    async def cb(self, msg: Any) -> None:
        if not msg.data and msg.headers and "Status" in msg.headers:
            # 408 expired, 404 no messages, 409 consumer changed, 503 no consumer answered
            self.status = str(msg.headers.get("Status"))
            self.done.set()
            return
        self.msgs.append(msg)
        if len(self.msgs) >= self.want:
            self.done.set()

    async def pull(self) -> list[Any]:
        """One pull request: the messages it brought; none when it expired or the connection
        dropped (nats-py reconnects by itself).

        A pull that brings nothing lasts at least its expiry (``expires_s``), also when it was
        answered sooner: while the consumer has no leader (its node killed in a cluster: a new
        one is elected in seconds) every request is answered at once with 503 No Responders,
        and pulling again at once spun, tens of thousands of requests a second in each puller,
        taking the CPUs the JetStream servers needed to elect the leader and the agents needed
        to export (tests/test_qos_serve.py::test_pulls_wait_while_the_consumer_has_no_leader;
        in the localisation test's node kill, the last slot's lines came after it closed)."""
        cfg = self.cfg
        assert cfg is not None, "_Batch.open() first"
        self.msgs, self.want = [], cfg.batch
        self.done.clear()
        self.status = ""
        t0 = time.monotonic()
        try:
            await self.nc.publish(self.subject, self.request, reply=self.inbox)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.done.wait(), cfg.expires_s + 2.0)
        except Exception as e:  # disconnected: nats-py reconnects by itself
            log.warning("pull request failed: %s", e)
            await asyncio.sleep(0.5)
        msgs, self.msgs = self.msgs, []
        if msgs:
            self.unanswered = 0
            return msgs
        if self.status == "503":
            self.unanswered += 1
            if self.unanswered == 1:
                log.warning("no consumer %s answers pull requests (503: no leader, or deleted); pulling "
                            "every %.1f s", cfg.durable, cfg.expires_s)
        elif self.status:
            self.unanswered = 0
        rest = cfg.expires_s - (time.monotonic() - t0)
        if rest > 0:
            await asyncio.sleep(rest)
        return msgs


def _pull_request(cfg: ServeConfig, nc: Any) -> tuple[str, bytes]:
    """The pull request's subject and body (``$JS.API.CONSUMER.MSG.NEXT``)."""
    # bytes bound a pull too (v2 messages carry up to 1,000 records each: 5,000 of them would be
    # one store transaction longer than the ack wait); never under the server's largest message,
    # which would otherwise never be delivered
    max_bytes = max(cfg.max_bytes, 2 * int(getattr(nc, "max_payload", 0) or 0))
    return (f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{cfg.durable}",
            json.dumps({"batch": cfg.batch, "expires": int(cfg.expires_s * 1e9),
                        "max_bytes": max_bytes}).encode())


def _puller_main(cfg: ServeConfig, conn: Any, parent: int) -> None:
    """A puller process (``--pullers``): pull batches from the durable consumer, decode each
    into :class:`Columns`, send it to the service (the store writer), and acknowledge its
    messages only when the service says the batch is committed."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service stops its pullers itself
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_pull_loop(cfg, conn))


async def _pull_loop(cfg: ServeConfig, conn: Any) -> None:
    loop = asyncio.get_running_loop()
    decoder = Decoder(load_topology(cfg.topology))
    held: dict[int, list[Any]] = {}  # token -> the messages of a batch sent, not yet committed
    freed = asyncio.Event()  # a batch was committed
    stopping = asyncio.Event()
    acks: set[asyncio.Task[None]] = set()
    nc = await _connect(cfg)

    async def ack(msgs: list[Any]) -> None:
        try:
            for m in msgs:  # explicit, each (see the module's docstring); nats-py buffers them
                await nc.publish(m.reply, b"+ACK")
        except Exception as e:
            log.warning("ack failed (the batch will be re-delivered, stored once): %s", e)

    def from_service() -> None:
        try:
            while conn.poll():
                what = conn.recv()
                if what[0] == "ack":
                    task = loop.create_task(ack(held.pop(what[1])))
                    acks.add(task)
                    task.add_done_callback(acks.discard)
                    freed.set()
                else:
                    stopping.set()
        except (EOFError, OSError):  # the service is gone: nothing more will be committed
            loop.remove_reader(conn.fileno())
            held.clear()
            stopping.set()

    loop.add_reader(conn.fileno(), from_service)
    sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="iqn-qos-send")
    decode = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="iqn-qos-decode")
    batch = await _Batch.open(nc, cfg)
    # the topology and the modules are kept for the process' life: out of the collector's sight
    # (each of its full passes walked them), and paused while a batch is decoded (_GcPause)
    gc.freeze()

    def decode_columns(datas: list[bytes], ids: list[str]) -> Columns:
        with _gc_paused:
            return decoder.decode_columns(datas, ids)

    conn.send_bytes(pickle.dumps((0, None)))  # ready: connected and subscribed
    token = 0
    try:
        while not stopping.is_set():
            if len(held) >= MAX_IN_FLIGHT:  # a batch is decoded and pulled while one is stored
                freed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(freed.wait(), 0.5)
                continue
            msgs = await batch.pull()
            if not msgs:
                continue
            datas = [m.data for m in msgs]
            ids = [f"{STREAM}/seq/{_ack_meta(m.reply)[0]}" for m in msgs]
            cols = await loop.run_in_executor(decode, decode_columns, datas, ids)
            cols.pending, cols.messages = _ack_meta(msgs[-1].reply)[2], len(msgs)
            token += 1
            held[token] = msgs
            await loop.run_in_executor(sender, conn.send_bytes, pickle.dumps((token, cols), protocol=5))
        # stopping: the batches sent are committed or not; wait a little for their word
        deadline = time.monotonic() + 5.0
        while held and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if acks:
            await asyncio.gather(*acks, return_exceptions=True)
    except (BrokenPipeError, EOFError, OSError):
        pass  # the service is gone: what was not acknowledged is re-delivered
    finally:
        sender.shutdown(wait=False)
        decode.shutdown(wait=False)
        with contextlib.suppress(Exception):
            await nc.flush(2)
            await nc.close()


class _Pullers:
    """K puller processes on the service's durable consumer (JetStream spreads each pull's
    messages over the pullers), and their batches stored by the one store writer here.

    Why processes: the decode is Python (the interpreter lock) and one process's pull, decode
    and acknowledgements topped out under 100,000 records/s (bench/bench_qos_serve.py); K
    processes decode K batches at once, and this one only stores (DuckDB: one writer) and
    serves.  A batch is acknowledged by its puller only after the service committed it, so a
    SIGKILL anywhere loses nothing (unacknowledged batches are re-delivered after the ack wait
    and stored once: their ids)."""

    def __init__(self, cfg: ServeConfig) -> None:
        ctx = multiprocessing.get_context("spawn")  # not forked: this process has threads and DuckDB
        self.batches: queue.Queue[tuple[int, int, Columns] | int] = queue.Queue()
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.locks: list[threading.Lock] = []
        self.readers: list[threading.Thread] = []
        self.ready = [threading.Event() for _ in range(cfg.pullers)]
        self.ended: list[int] = []  # pullers whose pipe closed
        for i in range(cfg.pullers):
            mine, theirs = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_puller_main, args=(cfg, theirs, os.getpid()), name=f"iqn-qos-puller-{i}",
                            daemon=True)
            p.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(p)
            self.locks.append(threading.Lock())
            th = threading.Thread(target=self._read, args=(i,), name=f"iqn-qos-recv-{i}", daemon=True)
            th.start()
            self.readers.append(th)

    def _read(self, i: int) -> None:
        """A reader thread: puller i's batches into the queue (the end: -1 - i)."""
        conn = self.conns[i]
        try:
            while True:
                token, cols = pickle.loads(conn.recv_bytes())
                if cols is None:
                    self.ready[i].set()
                else:
                    self.batches.put((i, token, cols))
        except (EOFError, OSError):
            self.ended.append(i)
            self.batches.put(-1 - i)

    def wait_ready(self, timeout: float) -> bool:
        """Every puller connected and subscribed (False: not within ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self.ready)

    def ack(self, i: int, token: int) -> None:
        """Tell puller i its batch ``token`` is committed (it acknowledges it then)."""
        with self.locks[i], contextlib.suppress(OSError):
            self.conns[i].send(("ack", token))

    def stop(self) -> None:
        for i in range(len(self.conns)):
            with self.locks[i], contextlib.suppress(OSError):
                self.conns[i].send(("stop",))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the pullers (killed if they do not end within ``timeout``) and the writer."""
        self.stop()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1)
        for c in self.conns:
            c.close()
        self.batches.put(_WRITER_STOP)


#: in the pullers' queue: the store writer ends
_WRITER_STOP = 1 << 30


async def _serve_pullers(svc: Service, pullers: _Pullers, stop: asyncio.Event,
                         store_pool: concurrent.futures.ThreadPoolExecutor,
                         maybe_infer: Callable[[bool | None, bool], None],
                         refresh_info: Callable[[], Any]) -> None:
    """The service's loop with puller processes: the store thread is the one writer (each
    batch a transaction, then its puller is told to acknowledge it); the loop counts, infers
    and refreshes the consumer's numbers."""
    loop = asyncio.get_running_loop()
    state: dict[str, Any] = {"more": None, "storing": False, "last": 0.0}
    woke = asyncio.Event()

    def stored(cols: Columns, got: Ingested, now: float) -> None:  # on the loop
        svc.account(cols, got, now)
        svc.counters.lag = cols.pending
        # a backlog: more messages wait than this batch brought (with several pullers, a steady
        # stream's batches say a few are pending: those the other pullers are being sent).  Kept
        # between batches (the writer is idle while the pullers decode, and a round started then
        # took the CPU the drain needed) until a batch says otherwise, or none came for INFO_S
        state["more"] = cols.pending >= max(1, cols.messages)
        state["last"] = time.monotonic()
        svc.publish_view()
        woke.set()

    def writer() -> None:
        """The store thread: batches from every puller, until all ended (or told to stop)."""
        ended = 0
        while ended < len(pullers.procs):
            item = pullers.batches.get()
            if isinstance(item, int):
                if item == _WRITER_STOP:
                    return
                ended += 1
                loop.call_soon_threadsafe(woke.set)
                continue
            i, token, cols = item
            state["storing"] = True
            now = time.time()
            try:
                got = svc.store_decoded(cols, now)  # a QosError ends the writer: nothing acknowledged
            finally:
                state["storing"] = False
            pullers.ack(i, token)  # committed: the puller may acknowledge it now
            loop.call_soon_threadsafe(stored, cols, got, now)

    writing = loop.run_in_executor(store_pool, writer)
    last_info = 0.0
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(woke.wait(), 0.1)
            woke.clear()
            if writing.done():
                writing.result()  # re-raises a store failure
            if pullers.ended and not stop.is_set():
                i = pullers.ended[0]
                pullers.procs[i].join(2.0)  # its pipe closed first: wait for its exit code
                raise QosError(f"puller process {i} ended (exit code {pullers.procs[i].exitcode})")
            busy = state["storing"] or not pullers.batches.empty()
            if not busy and time.monotonic() - state["last"] > INFO_S:
                state["more"] = None
            if not busy and time.monotonic() - max(state["last"], last_info) > INFO_S:
                last_info = time.monotonic()
                await refresh_info()
                svc.publish_view()
            maybe_infer(state["more"], busy)
    finally:
        # the pullers stop pulling; what they sent is stored and acknowledged before they end
        pullers.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(writing), 15.0)
        pullers.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(writing), 5.0)


async def run(cfg: ServeConfig, *, ready: Callable[[str, int], None] | None = None,
              stop: asyncio.Event | None = None, service: Service | None = None) -> None:
    """Consume, store, infer and serve until ``stop`` is set (or SIGTERM/SIGINT)."""
    svc = service if service is not None else Service(cfg)
    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    me = asyncio.current_task()

    def on_signal() -> None:
        # cancel whatever is awaited (a broker that does not answer, a pull): a batch stored
        # but not yet acknowledged is re-delivered later and stored once (its ids)
        stop.set()
        if me is not None:
            me.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    forced: list[concurrent.futures.Future[int]] = []

    def infer_now() -> int:
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        loop.call_soon_threadsafe(forced.append, fut)
        try:
            return fut.result(timeout=120)
        except concurrent.futures.TimeoutError:
            raise QosError("the service is busy; try again") from None

    web = Web(lambda: svc.view, svc.topology, infer_now)
    host, port = web.start(cfg.host, cfg.port)
    # one thread stores (decode + DuckDB, which releases the GIL while it writes) while the
    # loop pulls the next batch; another infers on its own cursor, so a slot's inference
    # (seconds for a large slot) never holds up storing: late records used to wait for it
    store_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="iqn-qos-store")
    # and decoding (Python: the interpreter lock) has a thread of its own, so a batch is decoded
    # while the one before is written (DuckDB: no lock), MAX_IN_FLIGHT batches at a time; the
    # rate is then the slower of the two stages, not their sum
    decode_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="iqn-qos-decode")
    infer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="iqn-qos-infer")
    reader = svc.store.cursor()
    # the MLE is Python and numpy: in a thread it would hold the GIL the loop and the store
    # thread need (a slot of 5,000 lines is seconds of CPU on a busy box); a spawned process
    # (not forked: this one has threads and DuckDB open) computes it from the lines it is given
    solver = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_die_with_parent, initargs=(os.getpid(),))
    # started now, not at the first inference: spawning it and importing scipy took 3.3 s on the
    # loaded box, and the first late records waited for it; and consuming starts once it is up
    # (below): started alongside, it took the CPU a backlog's first batches needed
    warm = asyncio.wrap_future(solver.submit(infer_counts, [(("warm-up",), 1, 1, 2)]))
    storing: list[asyncio.Future[None]] = []  # batches being decoded, stored, acknowledged
    pullers: _Pullers | None = None
    nc = None
    try:
        nc = await _connect(cfg)
        js = nc.jetstream()
        await _ensure(js, cfg)
        await warm
        if cfg.pullers > 0:  # started, and connected, before the service says it is consuming
            pullers = _Pullers(cfg)
            if not await loop.run_in_executor(None, pullers.wait_ready, 60.0):
                raise QosError("the puller processes did not connect in 60 s")
        log.info("serving http://%s:%d/ ; consuming stream %s as %s from %s", host, port, STREAM, cfg.durable,
                 ",".join(cfg.nats))
        if ready is not None:
            ready(host, port)

        async def refresh_info() -> None:
            """Lag and ack-pending from the consumer's own numbers (at start, and when idle:
            a batch's last message only tells the lag)."""
            with contextlib.suppress(Exception):
                info = await js.consumer_info(STREAM, cfg.durable)
                svc.counters.lag = int(info.num_pending or 0)
                svc.counters.ack_pending = int(info.num_ack_pending or 0)

        async def store_then_ack(msgs: list[Any], now: float) -> None:
            """Decode a batch on the decode thread, store it on the store thread, then (only then)
            acknowledge each message.  Batches may be stored out of order: each is idempotent
            and acknowledges only its own messages."""
            datas = [m.data for m in msgs]
            ids = [f"{STREAM}/seq/{_ack_meta(m.reply)[0]}" for m in msgs]
            cols = await loop.run_in_executor(decode_pool, svc.decode_batch, datas, ids)
            # raises QosError on a store failure: nothing acked, the loop stops
            got = await loop.run_in_executor(store_pool, svc.store_decoded, cols, now)
            svc.account(cols, got, now)
            try:
                for m in msgs:  # explicit, each (see the module's docstring); nats-py buffers them
                    await nc.publish(m.reply, b"+ACK")
            except Exception as e:
                log.warning("ack failed (the batch will be re-delivered, stored once): %s", e)
            svc.counters.lag = _ack_meta(msgs[-1].reply)[2]
            svc.publish_view()

        def inferred(fut: asyncio.Future[list[tuple[float, list[Estimate]]]], due: list[float],
                     waiting: list[Any]) -> None:
            n = 0
            if not fut.cancelled() and fut.exception() is None:
                n = len(fut.result())  # each slot was applied as it came (show_slot)
            elif not fut.cancelled():
                log.warning("inference failed (its slots stay dirty): %s", fut.exception())
                svc.planner.dirty.update(due)
            for f in waiting:
                if fut.cancelled() or fut.exception() is None:
                    f.set_result(n)
                else:
                    f.set_exception(QosError(f"inference failed: {fut.exception()}"))

        def show_slot(start: float, ests: list[Estimate]) -> None:
            svc.apply([(start, ests)])
            svc.publish_view()

        def slot_done(start: float, ests: list[Estimate]) -> None:  # on the inference thread
            loop.call_soon_threadsafe(show_slot, start, ests)

        await refresh_info()
        # the first round waits like the others: started at once, it inferred every slot of a
        # backlog's first batch (slots the rest of the backlog was still filling) while the
        # drain needed the CPU (bench/bench_qos_serve.py: the solver process and the inference
        # thread took CPU during the whole drain)
        tick = {"last": time.monotonic(), "backlog": False}
        inferring_box: list[asyncio.Future[list[tuple[float, list[Estimate]]]] | None] = [None]

        def maybe_infer(more: bool | None, busy: bool) -> None:
            """An inference round at most every TICK_S (DRAIN_TICK_S while a backlog drains), one at
            a time, on the inference thread.  ``more``: the last batch said messages wait in the
            stream (None: no batch came); ``busy``: batches are still being stored."""
            inferring = inferring_box[0]
            if inferring is not None and not inferring.done():
                return
            futs, forced[:] = list(forced), []
            since = time.monotonic() - tick["last"]
            # kept from the last batch that came, and until the backlog is stored: a round started
            # with the backlog's last pull inferred every slot of it while its last batches were
            # still being stored (and then again), taking the CPU they needed
            if more:
                tick["backlog"] = True
            elif tick["backlog"] and not busy:
                tick["backlog"] = False
            if futs or since > (DRAIN_TICK_S if tick["backlog"] else TICK_S):
                tick["last"] = time.monotonic()
                due = svc.due(time.time(), force=bool(futs))
                if due:
                    fut = loop.run_in_executor(infer_pool, svc.infer_slots, due, reader, solver, slot_done)
                    fut.add_done_callback(lambda f, d=due, w=futs: inferred(f, d, w))  # type: ignore[misc]
                    inferring_box[0] = fut
                else:
                    for f in futs:
                        f.set_result(0)

        if pullers is not None:
            await _serve_pullers(svc, pullers, stop, store_pool, maybe_infer, refresh_info)
            return
        batch = await _Batch.open(nc, cfg)
        last_info = 0.0
        while not stop.is_set():
            msgs = await batch.pull()
            for task in [t for t in storing if t.done()]:
                storing.remove(task)
                task.result()  # re-raises a store failure
            if msgs:
                if len(storing) >= MAX_IN_FLIGHT:
                    await storing.pop(0)
                storing.append(asyncio.ensure_future(store_then_ack(msgs, time.time())))
            elif not storing and time.monotonic() - last_info > INFO_S:
                last_info = time.monotonic()
                await refresh_info()
                svc.publish_view()
            # a backlog: more messages wait than this batch brought (see _serve_pullers)
            maybe_infer(_ack_meta(msgs[-1].reply)[2] >= len(msgs) if msgs else None, bool(storing))
        while storing:
            await storing.pop(0)
    finally:
        if pullers is not None:
            pullers.close()
        for f in forced:
            f.set_exception(QosError("the service is stopping"))
        for task in storing:
            task.cancel()
        decode_pool.shutdown(wait=True)
        store_pool.shutdown(wait=True)  # a write in progress ends before the store closes
        infer_pool.shutdown(wait=True)
        solver.shutdown(wait=True)
        reader.close()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        web.close()
        if service is None:
            svc.close()


def main(cfg: ServeConfig, log_level: str = "info", log_format: str = "text") -> None:
    """Run the service in the foreground (the CLI's entry point); logs as
    ``--log-level``/``--log-format`` say (:mod:`iqn_common.logsetup`)."""
    from iqn_common.logsetup import configure

    configure(log_level, log_format)
    svc = Service(cfg)  # opens the topology and the store first: their errors are one line

    def ready(host: str, port: int) -> None:
        print(f"iqn-qos serve: listening on http://{host}:{port}/", flush=True)

    try:
        asyncio.run(run(cfg, ready=ready, service=svc))
    except asyncio.CancelledError:
        log.info("stopped")
    finally:
        svc.close()


