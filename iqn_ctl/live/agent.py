"""The live ISP agent: XDP candidate events -> per-flow stall inference ->
flow table, stall history, local API and metrics.

The agent owns no inference logic and no timing of its own: the live flow
view (:mod:`iqn_ctl.live.flows`) groups ring-buffer records by flow and hands them to
:class:`~iqn_ctl.engine.vector.VectorFlowTable` (``FlowTable``'s state machine,
held to it by equivalence tests, costed per poll rather than per flow); the
loop calls ``advance(time.monotonic())`` after every poll and sleeps no longer
than the engine's ``next_deadline()``, so that stalls end on time even when the
flow goes silent. Everything else here is plumbing
whose failure modes users actually meet: a second agent on the same
interface, an agent killed with SIGKILL (stale program, socket and pid file),
records lost under load (counted by the kernel, shown and logged, never silent).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import gc
import hashlib
import json
import logging
import logging.handlers
import math
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iqn_ctl.engine.bursts import burst_cap
from iqn_ctl.engine.discard import DEFAULT_BULK_RATIO, BulkJudge, Counters, Verdict
from iqn_ctl.engine.estimators import DEFAULT_ESTIMATOR, ESTIMATORS
from iqn_ctl.engine.params import (
    BURST_MAX,
    DEFAULT_MAX_FLOWS,
    DEFAULT_PAIR_WINDOW,
    DEFAULT_SOURCE_RATE,
    CandidateFilter,
    SignalParams,
    default_cap,
    pair_credits,
)
from iqn_ctl.engine.tracker import Event, StallEnded, StallStarted
from iqn_ctl.engine.watch import DEFAULT_SLOT
from iqn_ctl.live import caps
from iqn_ctl.live.access import resolve as resolve_access
from iqn_ctl.live.access import share_dir, share_history
from iqn_ctl.live.api import (
    DEFAULT_RUN_DIR,
    ApiError,
    ApiServer,
    RawJson,
    check_iface_name,
    ensure_private_dir,
    ensure_run_dir,
    open_private,
    pid_path,
    sock_path,
)
from iqn_ctl.live.backlog import Backlog
from iqn_ctl.live.bursttable import BurstBatch, empty_batch
from iqn_ctl.live.export import check_export
from iqn_ctl.live.flows import KEY_MODES, LiveFlows
from iqn_ctl.live.history import DEFAULT_MAX_ROWS, DEFAULT_STATE_DIR, History, StallRecord
from iqn_ctl.live.sessions import Sessions
from iqn_ctl.live.settings import (
    DEFAULT_BACKLOG,
    DEFAULT_DIRECTION,
    DEFAULT_HOOK,
    DEFAULT_RING_PAGES,
    DEFAULT_VOL_SAMPLE,
    DEFAULT_XDP_MODE,
    MAX_BACKLOG,
    AgentError,
    Guard,
    dataplane_problem,
    guard_problem,
    hook_problem,
)

if TYPE_CHECKING:
    from iqn_ctl.live.datapath import Datapath
    from iqn_ctl.live.export import Exporter
    from iqn_ctl.live.metrics import AgentMetrics, MetricsHub, Snapshot
    from iqn_ctl.live.mitigate import Booster, MitigateConfig

log = logging.getLogger("iqn.agent")

#: longest the event loop sleeps in the kernel. The data plane wakes the reader
#: only once n records wait in the ring (a wake-up per record costs the kernel
#: far more than the record), and that count does not line up with bursts, so the
#: n-th packet of a signal may wait for this timeout: it bounds the detection
#: latency (target <= 10 ms) as well as how late a silent flow's stall end is
#: noticed. The loop's wake-ups (about 250/s with the work between them) cost the
#: idle agent 3.4 % of a core on the 2-core test box (no traffic, the box loaded;
#: 3-6 % while bench_forward.py ran), a third of it the burst table's sweep (profiled).
IDLE_POLL_MS = 3
#: after a poll that returned records, the next one waits until this long after it
#: (s), unless work is waiting in the backlog. Why: a poll round costs ~180 µs of
#: numpy calls whatever its size (the ring, the burst table's sweep, the flow look-up,
#: the engine), and the kernel wakes the loop once a few records wait, so under a
#: steady load the loop ran rounds of ~16 records at ~11 µs a record (in process, 10,000
#: stalling flows: 11.0 µs/record at 16 records a round, 2.0 at 256); live, that was
#: most of a core at 10,000 stalling flows. 2 ms gathers ~120 records a round at
#: 60,000 records/s and adds at most 2 ms to the stall-visible latency.
ROUND_MIN = 0.002
#: how often kernel counters are read to notice lost events
COUNTER_PERIOD = 0.5
#: a poll whose oldest candidate waited longer than this before its events were
#: handled counts as late (``polls_late``) and the agent reports ``load: behind``:
#: the stall-visible latency the agent is meant to keep (docs/agent.md)
LAG_BUDGET = 0.05
#: a wait of the loop for the agent's state lock longer than this is counted
#: (``api_waits``): API and metrics readers hold it only to copy counters
API_WAIT_NOTED = 0.01
#: a flows answer is served again to any poller for this long (s): pollers of
#: 65k flows cost one build per interval, whatever their number and speed
FLOWS_REUSE = 0.5
#: The live agent's reorder tolerance. Replays need the engine's default (merged
#: captures reorder by milliseconds), but here one flow's packets hash to one RX
#: queue, so one CPU writes them to the ring in order, and every poll's batch
#: is sorted per flow before it is fed. What is left (--key client merging flows
#: from several CPUs) is microseconds, which the tracker clamps to its watermark
#: and counts as ``late``. Holding nothing back saves 5 ms of detection latency
#: and the tracker's per-arrival Python path (half the agent's CPU per event).
LIVE_REORDER = 0.0
#: Overload (issue 19): the ring is drained into the agent's backlog every
#: round, and at most CHUNK of its oldest records are fed to the engine per
#: round, so the kernel ring keeps being emptied while a large backlog is
#: worked off (a full ring drops the *newest* records, in the kernel). Past
#: ``--backlog`` records the oldest waiting ones are dropped and counted
#: (``shed``): when the agent cannot keep up it keeps the newest data.
CHUNK = 8192
#: ``load`` is ``shedding`` for this long after records were last shed (s)
SHED_HOLD = 1.0
#: while behind, the stall history is committed at most this often (s), in
#: batches, instead of once per poll round: one fsync per round would slow the
#: loop exactly when it can least afford it
HISTORY_BATCH = 0.25
#: stall starts logged one line each per round; the rest of a round's starts
#: (an outage starts thousands within one p) get one summary line. Why: a log
#: line costs ~15 µs, half of what a stall start costs the loop, so 50,000 lines
#: would hold up the stalls themselves for most of a second; every start is
#: still written to the history and shown in the flow view, and every end logged
START_LINES = 32
#: ...and one round's writes are committed every this many: in an outage one
#: round can end more stalls than the history holds in memory (MAX_PENDING),
#: and an ended stall must never be given up for want of a commit
HISTORY_BATCH_ROWS = 4096


#: the kernel counters of the given connections (raw keys), None where unknown
CountersLookup = Callable[[list[bytes]], dict[bytes, Counters | None]]


# -- one agent per interface: the pid file is the lock ----------------------------


class InterfaceLock:
    """``/run/iqn/<iface>.pid`` held with flock by the running agent.

    Why flock and not "is the pid alive": a pid file left by a SIGKILLed agent
    may name a pid that was reused; a lock dies with its process, so a held lock
    means a live agent and a free one means a stale file, with no guessing.
    """

    def __init__(self, run_dir: Path, iface: str) -> None:
        self.path = pid_path(run_dir, iface)
        self.iface = iface
        self._fd: int | None = None

    def holder(self) -> int | None:
        """Pid of the live agent holding the lock, None when no agent runs.
        A pid file in a directory others can write may name any process: refused."""
        ensure_private_dir(self.path.parent, "run dir", create=False)
        try:
            fd = open_private(self.path, os.O_RDONLY, "pid file")
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 64).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def acquire(self) -> None:
        ensure_run_dir(self.path.parent)
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT, "pid file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            raise AgentError(
                f"an IQN agent is already attached to {self.iface} (pid {text or '?'}); "
                f"run 'iqn-ctl detach {self.iface}' first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


# -- what the agent writes where others may read it ----------------------------------

#: the daemon's log rotates at this size and keeps LOG_BACKUPS old files (60 MiB at most)
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5


def _fields(event: str, iface: str, flow: str, client: str, start: float, duration: float | None = None,
            candidates: int | None = None) -> dict[str, object]:
    """The structured fields of a stall's log line (``--log-format json``
    prints them beside the message; docs/contracts.md)."""
    out: dict[str, object] = {"event": event, "iface": iface, "flow": flow, "client": client, "start": start}
    if duration is not None:
        out["duration"] = round(duration, 3)
    if candidates is not None:
        out["candidates"] = candidates
    return out


class DaemonLog(logging.handlers.RotatingFileHandler):
    """The ``--daemon`` agent's log file: rotated by size, opened 0600 without
    following symlinks (:func:`~iqn_ctl.live.api.open_private`).

    After every (re)open the file descriptors ``fds`` (the daemon's stdout and
    stderr, once it has forked) point at the current file, so output that
    bypasses logging (bcc's compiler, a dying thread's traceback) follows the
    rotation instead of growing a renamed file forever.
    """

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
        self.fds: tuple[int, ...] = ()
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def _open(self) -> Any:
        fd = open_private(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "log file")
        for target in self.fds:
            os.dup2(fd, target)
        return os.fdopen(fd, "a", encoding="utf-8")

    def redirect(self, *fds: int) -> None:
        """Point ``fds`` at the log file now and after every rotation."""
        self.fds = fds
        if self.stream is not None:
            self.stream.flush()
            for target in fds:
                os.dup2(self.stream.fileno(), target)


class Redactor:
    """``--redact``: a client address in a log line becomes ``anon-`` and 12 hex
    digits of BLAKE2b keyed with 16 random bytes drawn when the agent starts.

    Why keyed: an unkeyed hash of an IPv4 address is undone by hashing all 2^32
    of them; the key is never written anywhere, so the log alone does not give
    the address back. Why a hash and not a truncated prefix: one client's stall
    start and end lines still match up, and two clients behind one /24 stay
    apart. The mapping changes with every agent start (unlinkable across
    restarts); the root-only history and API keep the full addresses.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(16)

    def client(self, addr: str) -> str:
        return "anon-" + hashlib.blake2b(addr.encode(), key=self._key, digest_size=6).hexdigest()

    def label(self, label: str, client: str) -> str:
        """The flow label (``server:port>client:port``, or the client with --key client)
        with the client's address replaced; the server and ports stay."""
        head, sep, tail = label.rpartition(">")
        if not sep:
            return self.client(client) if label == client else label
        return f"{head}>{self.client(client)}:{tail.rpartition(':')[2]}"


# -- the agent ----------------------------------------------------------------------


@dataclass(slots=True)
class AgentConfig:
    iface: str
    params: SignalParams = field(default_factory=SignalParams)
    filt: CandidateFilter = field(default_factory=CandidateFilter)
    estimator: str = DEFAULT_ESTIMATOR
    key_mode: str = "5tuple"
    max_flows: int = DEFAULT_MAX_FLOWS
    xdp_mode: str = DEFAULT_XDP_MODE
    force: bool = False
    state_dir: Path = DEFAULT_STATE_DIR
    run_dir: Path = DEFAULT_RUN_DIR
    metrics_port: int | None = None
    #: loopback unless asked: the metrics need no root to read (see docs/agent.md)
    metrics_addr: str = "127.0.0.1"
    #: --redact: client addresses in log lines become keyed hashes (Redactor)
    redact: bool = False
    history_rows: int = DEFAULT_MAX_ROWS
    reorder: float = LIVE_REORDER
    #: --ring-pages (old name --perf-pages): the BPF ring buffer, 4 KiB pages shared by all CPUs
    ring_pages: int = DEFAULT_RING_PAGES
    #: see Agent._bulk(): 0 disables the check
    bulk_ratio: float = DEFAULT_BULK_RATIO
    #: new flows per second (and per burst) one server address may open; 0: no limit
    source_rate: float = DEFAULT_SOURCE_RATE
    #: --slot: seconds per watched-time record (iqn_ctl.live.sessions)
    slot: float = DEFAULT_SLOT
    #: --export URL (repeatable), --router-id, --export-replicas: iqn_ctl.live.export
    export: tuple[str, ...] = ()
    router_id: str | None = None
    export_replicas: int | None = None
    #: --export-batch: records per export message (1: schema v1; more: v2 batches)
    export_batch: int = 1
    #: --hook auto|xdp|tc and --direction ingress|egress (TC only): where the classifier runs
    hook: str = DEFAULT_HOOK
    direction: str = DEFAULT_DIRECTION
    #: --backlog: candidate records the agent holds when behind; past it the oldest are shed
    backlog: int = DEFAULT_BACKLOG
    #: --vol-sample: the kernel's volume arrays count 1 in this many non-candidates (1: exact)
    vol_sample: int = DEFAULT_VOL_SAMPLE
    #: the forgery guard (docs/dataplane.md, "Forged signals"): --pairing, --pair-window,
    #: --cap (signal bursts/s per client; None: default_cap(p); 0: no cap)
    pairing: bool = True
    pair_window: float = DEFAULT_PAIR_WINDOW
    cap: float | None = None
    #: --group: who may read the API socket and the history besides root (live/access.py);
    #: None: the group ``iqn`` if it exists
    group: str | None = None
    #: --mitigate EGRESS and its --boost-* knobs (iqn_ctl.live.mitigate); None: no boost
    mitigate: MitigateConfig | None = None
    #: serve this interface's own API socket; False under a supervisor
    #: (iqn_ctl.live.supervisor), which serves one socket for all its interfaces
    api: bool = True

    def guard(self) -> Guard:
        """The data plane's forgery guard as configured."""
        cap = default_cap(self.params.p) if self.cap is None else self.cap
        return Guard(self.pairing, self.pair_window, pair_credits(self.params.n), cap)

    def validate(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise AgentError(
                f"unknown --estimator {self.estimator!r}; choose one of {', '.join(sorted(ESTIMATORS))}"
            )
        if self.key_mode not in KEY_MODES:
            raise AgentError(f"--key must be one of {', '.join(KEY_MODES)}, got {self.key_mode!r}")
        problem = dataplane_problem(self.xdp_mode, self.max_flows, self.ring_pages,
                                    self.vol_sample) or hook_problem(self.hook, self.direction)
        if problem:
            raise AgentError(problem)
        if not 0 <= self.bulk_ratio < 1e6:
            raise AgentError(f"--bulk-ratio must be >= 0, got {self.bulk_ratio}")
        if not 0 <= self.source_rate < 1e9:
            raise AgentError(f"--source-rate must be a number >= 0, got {self.source_rate}")
        if isinstance(self.backlog, bool) or not 1 <= self.backlog <= MAX_BACKLOG:
            raise AgentError(f"--backlog must be in 1..{MAX_BACKLOG} records, got {self.backlog}")
        if not 0 < self.slot <= 86400:
            raise AgentError(f"--slot must be in (0, 86400] seconds, got {self.slot}")
        g = self.guard()
        problem = guard_problem(g.window, g.cap, g.credits)
        if problem:
            raise AgentError(problem)
        if self.metrics_port is not None and not 0 < self.metrics_port <= 65535:
            raise AgentError(f"--metrics-port must be in 1..65535, got {self.metrics_port}")
        check_export(self.export, self.router_id, self.export_replicas, self.export_batch)
        problem = self.mitigate.problem() if self.mitigate is not None else None
        if problem:
            raise AgentError(problem)


def need_root(what: str) -> None:
    """Capabilities, not uid 0: the agent may run as its own user (live/caps.py)."""
    msg = caps.problem(what)
    if msg:
        raise AgentError(msg)


def check_iface(iface: str) -> None:
    check_iface_name(iface)
    try:
        socket.if_nametoindex(iface)
    except OSError:
        raise AgentError(f"no such interface: {iface} (see 'ip link')") from None


def poll_timeout_ms(due: float | None, now: float) -> int:
    """How long the loop may sleep in the kernel: until the engine's next
    deadline, and never longer than :data:`IDLE_POLL_MS`."""
    if due is None:
        return IDLE_POLL_MS
    return max(0, min(IDLE_POLL_MS, math.ceil((due - now) * 1000)))


def _iso(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Agent:
    """One interface's agent. ``start()`` attaches, ``run()`` loops until the
    stop event is set, ``shutdown()`` removes everything it created."""

    def __init__(self, cfg: AgentConfig, wall: Callable[[], float] = time.time) -> None:
        """``wall`` is the wall clock, read only to turn the monotonic times the
        inference runs on into the epoch seconds shown; tests pass one that steps."""
        cfg.validate()
        self.cfg = cfg
        self.lock = InterfaceLock(cfg.run_dir, cfg.iface)
        self._redactor = Redactor() if cfg.redact else None
        self.flows = LiveFlows(cfg.params, cfg.estimator, cfg.key_mode, cfg.max_flows, reorder=cfg.reorder,
                               source_rate=cfg.source_rate)
        self._wall = wall
        self._started_mono = 0.0
        self.dp: Datapath | None = None
        self.api: ApiServer | None = None
        self.metrics: AgentMetrics | None = None
        self.history: History | None = None
        self.started_at = 0.0
        self.stalls_started = 0
        self.stalls_ended = 0
        self.stalls_discarded = 0
        #: --bulk-ratio: the kernel counters of each stall's connections at its start and end
        self._judge: BulkJudge[bytes] = BulkJudge(cfg.bulk_ratio, cfg.filt.max_size)
        #: the start (epoch) each open stall was written with: its end replaces that row
        self._open: dict[Hashable, float] = {}
        self._state = threading.Lock()
        self._counters: dict[str, int] = {"packets": 0, "candidates": 0, "parse_errors": 0, "lost": 0,
                                          "unpaired": 0, "capped": 0, "client_packets": 0, "bursts": 0}
        self._lost_logged = 0
        self._unpaired_warned = False
        #: how far behind the loop is: last and largest time from a poll's oldest
        #: candidate to its events being handled (s), and polls over LAG_BUDGET
        self.lag = 0.0
        self.lag_max = 0.0
        self.polls_late = 0
        #: records drained from the ring and not yet fed (oldest first), the most
        #: ever held, records shed (dropped oldest first past --backlog) and when last
        self._backlog = Backlog(cfg.backlog)
        self.backlog_max = 0
        self.shed = 0
        self._shed_at = -math.inf
        #: the last round found the ring empty and nothing waiting: caught up, whatever the last lag
        self._caught_up = True
        #: when the stall history was last committed (monotonic)
        self._flushed_at = -math.inf
        #: the loop's waits for ``_state`` longer than API_WAIT_NOTED, and the longest (s)
        self.api_waits = 0
        self.api_wait_max = 0.0
        #: bumped whenever the flow view may have changed; keys the cached flows answer
        self._version = 0
        #: the last flows answer: (request options, made at, version, answer)
        self._flows_cache: tuple[tuple[Any, ...], float, int, RawJson] | None = None
        #: watched time of the clients that signal (docs/qos.md, "From the ISP agent")
        self.sessions: Sessions | None = None
        #: --export: ships the history's finished records to JetStream (docs/export.md)
        self.exporter: Exporter | None = None
        #: --mitigate: boosts stalling viewers at the egress (docs/agent.md, "Mitigation")
        self.boost: Booster | None = None

    # -- lifecycle --

    def start(self) -> str:
        """Attach and start serving; returns the XDP mode used. On failure
        everything already set up is torn down again."""
        cfg = self.cfg
        need_root("attach")
        check_iface(cfg.iface)
        self.lock.acquire()
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise
        return self.mode

    def _start(self) -> None:
        from iqn_ctl.live.datapath import (
            PROG_NAME,
            Datapath,
            remove_egress,
            remove_tc,
            remove_xdp,
            xdp_program_on,
        )

        cfg = self.cfg
        self.access = resolve_access(cfg.group)
        ensure_private_dir(cfg.state_dir, "state dir")  # the history and the daemon's log live here
        self.history = History(cfg.state_dir, cfg.history_rows)
        died = self.history.mark_interrupted(cfg.iface)
        self.sessions = Sessions(cfg.iface, self.history.path, cfg.slot, router=cfg.router_id)
        self._start_export()
        if died:
            log.warning("%s: %d stall(s) left open by an agent that died marked interrupted in %s",
                        cfg.iface, died, self.history.path)
        present = xdp_program_on(cfg.iface)
        if present is not None and present[1] == PROG_NAME:
            # we hold the interface lock, so no live agent owns it: a dead agent's leftover
            remove_xdp(cfg.iface)
            log.warning("%s: removed a stale IQN program (id %d) left by an agent that died",
                        cfg.iface, present[0])
        if remove_tc(cfg.iface):
            log.warning("%s: removed a stale IQN TC classifier left by an agent that died", cfg.iface)
        if remove_egress(cfg.iface):  # the same dead agent's pairing classifier
            log.warning("%s: removed a stale IQN pairing classifier left by an agent that died", cfg.iface)
        self.dp = Datapath(
            cfg.iface, cfg.filt, max_flows=cfg.max_flows, xdp_mode=cfg.xdp_mode, force=cfg.force,
            ring_pages=cfg.ring_pages, n=cfg.params.n, hook=cfg.hook, direction=cfg.direction,
            guard=cfg.guard(), vol_sample=cfg.vol_sample,
        )
        self.dp.attach()
        # the kernel counts 1 in vol_sample non-candidate datagrams (each as vol_sample): the
        # bulk rule needs its verdict to hold beyond the estimate's spread (engine/discard.py)
        self._judge.sample = self.dp.vol_sample
        self._start_boost()
        self.started_at = self._wall()
        self._started_mono = time.monotonic()
        if cfg.api:
            self.api = ApiServer(sock_path(cfg.run_dir, cfg.iface), self._handle, self.access).start()
        self._share_access()
        if cfg.metrics_port is not None:
            self.add_metrics(self.scrape).serve(cfg.metrics_port, cfg.metrics_addr)
        p, f, g = cfg.params, cfg.filt, cfg.guard()
        log.info(
            "%s: attached (%s, %s device); p=%g n=%d sizes %d..%d port %d key %s estimator %s; history %s%s",
            cfg.iface, self.dp.describe(), self.dp.device.link, p.p, p.n, f.min_size, f.max_size, f.port,
            cfg.key_mode, cfg.estimator,
            self.history.path, f"; metrics on {cfg.metrics_addr}:{cfg.metrics_port}" if self.metrics else "",
        )
        log.info("%s: forgery guard: pairing %s%s, cap %s", cfg.iface, "on" if g.pairing else "off",
                 f" (window {g.window:g} s, TC {self.dp.pair_direction})" if g.pairing else "",
                 f"{g.cap:g} bursts/s per client" if g.cap else "off")

    def _share_access(self) -> None:
        """Open the run dir, the state dir and the history (with its WAL files,
        there once the history is open) to the access group; the socket already is."""
        if self.access.gid is None or self.history is None:
            return
        share_dir(self.cfg.run_dir, self.access)
        share_history(self.history.path, self.access)
        log.info("%s: API socket and stall history readable by group %s", self.cfg.iface, self.access.name)

    def shutdown(self) -> None:
        """Remove the XDP program, socket, metrics server and pid file; idempotent."""
        self._stop_boost()
        attached = bool(self.mode)  # the data plane forgets its hook once closed
        if self.dp is not None:
            try:
                self.dp.close()  # detaches our program and frees maps and the ring buffer
            except Exception as e:  # keep cleaning up the rest
                log.error("%s: removing the XDP program failed: %s", self.cfg.iface, e)
        if self.api is not None:
            self.api.close()
            self.api = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.sessions is not None:
            self.sessions.finish(None, time.monotonic(), self.wall_offset())  # no-op after run()'s
            self.sessions.close()
            self.sessions = None
        if self.history is not None:
            if not self.history.flush(force=True):
                log.error("%s: %d stall record(s) could not be written to %s and are lost: %s",
                          self.cfg.iface, self.history.pending, self.history.path, self.history.last_error)
            self.history.close()
            self.history = None
        if self.exporter is not None:
            self.exporter.stop()  # after the last records were written: they go too, if the broker answers
            self.exporter = None
        if self.dp is not None:
            self.dp = None
            if attached:
                log.info("%s: detached", self.cfg.iface)
        self.lock.release()

    def _start_export(self) -> None:
        cfg = self.cfg
        if cfg.export and self.history is not None:
            from iqn_ctl.live.export import start_exporter

            self.exporter = start_exporter(self.history.path, cfg.iface, cfg.export, cfg.router_id,
                                           cfg.export_replicas, late=lambda: self.polls_late,
                                           records_per_msg=cfg.export_batch)

    def _start_boost(self) -> None:
        """--mitigate: remove what a dead agent on this interface left (we hold
        its lock), then shape the egress (iqn_ctl.live.mitigate)."""
        if self.cfg.mitigate is None:
            return
        from iqn_ctl.live.mitigate import Booster, MitigateError, cleanup

        try:
            for what in cleanup(self.cfg.run_dir, self.cfg.iface):
                log.warning("%s: removed %s left by an agent that died", self.cfg.iface, what)
            self.boost = Booster(self.cfg.mitigate, self.cfg.run_dir, self.cfg.iface,
                                 self._redactor.client if self._redactor is not None else None)
            self.boost.start()
        except MitigateError as e:
            self.boost = None
            raise AgentError(str(e)) from None

    def _stop_boost(self) -> None:
        if self.boost is not None:
            try:
                self.boost.close()
            except Exception as e:  # keep cleaning up the rest
                log.error("%s: removing the boost failed: %s", self.cfg.iface, e)
            self.boost = None

    def boost_stats(self) -> dict[str, Any] | None:
        """The boosts (``status``' ``boost``, the metrics), None without --mitigate."""
        b = self.boost
        return b.stats(time.monotonic()) if b is not None else None

    def export_stats(self) -> dict[str, Any] | None:
        """The exporter's state (``status``' ``export``, the metrics), None without --export."""
        return self.exporter.stats() if self.exporter is not None else None

    def add_metrics(self, snapshot: Snapshot, hub: MetricsHub | None = None,
                    attach: Callable[[], str] | None = None) -> AgentMetrics:
        """This interface's metrics, in ``hub`` (a supervisor's, shared by its
        interfaces) or in a hub of their own (one agent: the caller serves it).
        ``snapshot``: the counters (:meth:`scrape`, or with a watchdog's its
        slot's); ``attach``: the watchdog's state. The data-plane labels are
        read at scrape time, so they follow a re-attach (another hook or mode)."""
        from iqn_ctl.live.metrics import AgentMetrics

        self.metrics = AgentMetrics(self.cfg.iface, snapshot, self.export_stats, self.hook_info, hub=hub,
                                    attach=attach, boost=self.boost_stats)
        return self.metrics

    @property
    def mode(self) -> str:
        """Where the classifier runs now: "native"/"skb" (XDP), "tc", "" when not
        attached. Read from the data plane each time: the watchdog moves it from TC
        to XDP while the agent runs, and a copy taken at attach went stale then."""
        return (self.dp.mode or "") if self.dp is not None else ""

    def hook_info(self) -> dict[str, str]:
        """Where the classifier runs, for status and the metrics: hook ("xdp"/"tc"),
        XDP mode ("native"/"skb"; "" on TC), direction, link ("ethernet"/"l3": the
        first parser) and the device type's name and ARPHRD number."""
        dp = self.dp
        if dp is None or dp.hook is None:
            return {}
        return {"hook": dp.hook, "xdp_mode": (dp.mode or "") if dp.hook == "xdp" else "",
                "direction": dp.direction, "link": dp.device.link, "dev_type": dp.device.name,
                "arphrd": str(dp.device.arphrd)}

    def _hook_status(self) -> dict[str, Any]:
        info: dict[str, Any] = dict(self.hook_info())
        if "arphrd" in info:
            info["arphrd"] = int(info["arphrd"])
        return info

    # -- event loop --

    def run(self, stop: threading.Event) -> None:
        assert self.dp is not None, "start() first"
        dp = self.dp
        next_counters = 0.0
        due: float | None = None
        polled = -math.inf  # when the last poll that returned records returned
        while not stop.is_set():
            if not self._backlog:
                rest = polled + ROUND_MIN - time.monotonic()
                if rest > 0:
                    stop.wait(rest)  # let records gather: a round's cost is mostly per round
            now = time.monotonic()  # the kernel's clock: inference never sees a wall-clock step
            timeout = poll_timeout_ms(due, now)
            snap = None
            if now >= next_counters:
                # the kernel's counters, lost records included (counted where they are dropped);
                # this round polls without sleeping so reading them never delays records
                next_counters = now + COUNTER_PERIOD
                snap = dp.counters()
                timeout = 0
            if self._backlog:
                timeout = 0  # work waits: only drain what the ring holds
            evs = self._take(dp.poll_bursts(timeout))
            polled = time.monotonic() if len(evs) else -math.inf
            self._caught_up = not len(evs) and not self._backlog
            now = time.monotonic()
            with self._state:
                self._note_wait(time.monotonic() - now)
                size = len(self.flows.table)
                out = self.flows.ingest_bursts(evs) if len(evs) else []
                # while records wait in the backlog the engine's clock is the oldest of
                # them: advancing to now would end stalls whose candidates are waiting
                waiting = self._backlog.oldest()
                out.extend(self.flows.advance(now if waiting is None else min(now, waiting)))
                # the engine says when it next has something to do (held arrivals to
                # release, a stall to end): wake up then, so a stall shows within a few ms
                due = self.flows.table.next_deadline()
                if len(evs) or out or size != len(self.flows.table):
                    self._version += 1
            if out:
                self._on_events(out)
            if self.boost is not None:
                self.boost.tick(now)  # a boost past --boost-max ends even while its stall goes on
            if len(evs) and self.flows.oldest is not None:
                self._note_lag(time.monotonic() - self.flows.oldest)
            if snap is not None:
                self._read_counters(snap)
                if self.sessions is not None:
                    self.sessions.tick(dp, now, self.wall_offset())
                self._flush_history()  # batches held while behind; retries what a failing disk refused
        while self._backlog:  # what was drained is fed before the ends at close
            evs = self._take(empty_batch(BURST_MAX))
            with self._state:
                out = self.flows.ingest_bursts(evs)
            if out:
                self._on_events(out)
        with self._state:
            out = self.flows.close()
        if out:
            self._on_events(out, closing=True)
        if self.sessions is not None:
            self.sessions.finish(dp, time.monotonic(), self.wall_offset())
        snap = dp.counters()
        dp.poll_bursts(0)
        self._read_counters(snap)

    def _take(self, batch: BurstBatch) -> BurstBatch:
        """Add a drained batch to the backlog, shed its oldest candidates past
        ``--backlog`` (counted, logged once per episode) and return the oldest
        records, at most :data:`CHUNK` candidates, to feed now. Shedding drops
        raw candidates, never an engine event: every stall the engine ends is
        still recorded."""
        q = self._backlog
        over = q.push(batch)
        if over > 0:
            if time.monotonic() - self._shed_at > SHED_HOLD:
                log.warning("%s: the agent is overloaded: dropping the oldest %d candidate records "
                            "(backlog %d, --backlog); newest kept", self.cfg.iface, over, len(q))
            self.shed += over
            self._shed_at = time.monotonic()
        self.backlog_max = max(self.backlog_max, q.held_max)
        got = q.take(min(CHUNK, self.cfg.backlog))
        return batch if got is None else got

    def load(self) -> str:
        """``shedding`` (records dropped in the last SHED_HOLD s), ``behind``
        (the last lag over the budget, and the ring not found empty since) or ``ok``."""
        if time.monotonic() - self._shed_at < SHED_HOLD:
            return "shedding"
        return "behind" if self.lag > LAG_BUDGET and not self._caught_up else "ok"

    def _flush_history(self) -> None:
        """Commit the staged history writes: every round while the agent keeps
        up, in batches of at most one commit per :data:`HISTORY_BATCH` s while
        it is behind (nothing is dropped: they wait in memory, bounded by
        ``History``, ended stalls last)."""
        h = self.history
        if h is None or not h.pending:
            return
        now = time.monotonic()
        if (self._backlog or self.lag > LAG_BUDGET) and now - self._flushed_at < HISTORY_BATCH:
            return
        h.flush()  # failures are held, counted and retried, never stop inference
        self._flushed_at = now

    def _note_wait(self, waited: float) -> None:
        """Count the loop's waits for the API or metrics thread to let go of
        ``_state``: they must hold it only to copy (``api_waits``, ``api_wait_max_ms``)."""
        if waited > API_WAIT_NOTED:
            self.api_waits += 1
        self.api_wait_max = max(self.api_wait_max, waited)

    def _note_lag(self, lag: float) -> None:
        """Say when the loop falls behind rather than let it show only as late stalls."""
        was_behind, self.lag = self.lag > LAG_BUDGET, lag
        self.lag_max = max(self.lag_max, lag)
        if lag > LAG_BUDGET:
            if not was_behind:  # log the change, not every late poll
                log.warning("%s: the agent is behind: candidates waited %.0f ms (budget %.0f ms)",
                            self.cfg.iface, 1000 * lag, 1000 * LAG_BUDGET)
            self.polls_late += 1

    def _read_counters(self, c: dict[str, int]) -> None:
        """Note kernel counters and log new loss. The kernel counts a record
        lost when the ring has no room for it (``CNT_LOST`` in iqn_xdp.c), so
        the count is exact and needs no later event to show up."""
        lost = max(c.get("lost", 0), self._lost_logged)
        self._counters = {**c, "lost": lost}
        if lost > self._lost_logged:
            log.warning(
                "%s: %d candidate events lost (total %d): the agent is not keeping up or the ring "
                "is too small (--ring-pages), stalls may be missed",
                self.cfg.iface, lost - self._lost_logged, lost,
            )
            self._lost_logged = lost
        self._warn_one_way(c)

    def _warn_one_way(self, c: dict[str, int]) -> None:
        """Pairing on an interface that never sees the client's side (a mirror
        port, asymmetric routing) keeps every candidate back: say so once,
        with the fix, rather than silently infer nothing."""
        if (self.cfg.pairing and not self._unpaired_warned and c.get("client_packets", 0) == 0
                and c.get("unpaired", 0) >= 4 * self.cfg.params.n):
            log.warning(
                "%s: %d candidates unpaired and no client-to-server packets to port %d seen leaving "
                "%s: if this interface carries only the server-to-client direction (a mirror port), "
                "attach with --pairing off",
                self.cfg.iface, c["unpaired"], self.cfg.filt.port, self.cfg.iface)
            self._unpaired_warned = True

    def _shown(self, label: str, client: str) -> tuple[str, str]:
        """A flow's label and client as log lines show them (hashed with --redact)."""
        if self._redactor is None:
            return label, client
        return self._redactor.label(label, client), self._redactor.client(client)

    def wall_offset(self) -> float:
        """Wall-clock minus monotonic seconds, now: the engine's times plus this
        are the epoch seconds shown. Read at output time, so after a clock step
        every time shown moves with the clock while durations stay monotonic."""
        return self._wall() - time.monotonic()

    def _on_events(self, events: list[Event], closing: bool = False) -> None:
        """Log, count and record stall events. A stall is written when it starts
        (state ``open``) and that row is replaced when it ends, or deleted when it
        is discarded, so an agent killed mid-stall leaves it in the history; all
        of one poll round's writes go in one transaction (:meth:`History.flush`)."""
        iface = self.cfg.iface
        off = self.wall_offset()
        h = self.history
        lookup = self._batch_lookup(events)
        lines = START_LINES
        quiet: list[float] = []  # starts (epoch) of the stalls not logged one by one
        for e in events:
            if h is not None and h.pending >= HISTORY_BATCH_ROWS:
                h.flush()  # a failing disk: held, retried no sooner than History.RETRY_EVERY
                self._flushed_at = time.monotonic()
            info = self.flows.info(e.flow)
            if isinstance(e, StallStarted):
                if lookup is not None:  # without one the judge notes nothing: no connections to list
                    self._judge.started(e.flow, self.flows.raws(e.flow), lookup)
                if self.boost is not None:
                    self.boost.stall_started(e.flow, info.client, time.monotonic())
                self.stalls_started += 1
                if self.sessions is not None:
                    self.sessions.stall_started(e.flow, info.client, info.server, e.start + off)
                if self.history is not None:
                    t = e.detected_at + off  # the stall is known to go on at least until now
                    self._open[e.flow] = e.start + off
                    self.history.stage_open(iface, info.label, info.client, info.server, e.start + off, t,
                                            self.cfg.estimator)
                if self.metrics:
                    self.metrics.stall_started()
                if lines > 0:
                    lines -= 1
                    label, client = self._shown(info.label, info.client)  # as the log names them
                    log.info("%s: stall start flow=%s client=%s start=%s", iface, label, client,
                             _iso(e.start + off),
                             extra=_fields("stall_start", iface, label, client, e.start + off))
                else:
                    quiet.append(e.start + off)
            elif isinstance(e, StallEnded):
                label, client = self._shown(info.label, info.client)
                check, bulk, other = self._bulk(e, lookup)
                if self.boost is not None:
                    self.boost.stall_ended(e.flow, time.monotonic())
                rec = StallRecord(
                    iface, info.label, info.client, info.server, e.start + off, e.end + off, e.candidates,
                    e.detected_at + off, e.truncated, self.cfg.estimator, bulk_check=check,
                )
                if self.history is not None:
                    self.history.stage("drop" if bulk else "end", rec, self._open.pop(e.flow, None))
                if self.sessions is not None:
                    self.sessions.stall_ended(e.flow, info.client, info.server, e.start + off, e.end + off,
                                              kept=not bulk, detected=e.detected_at + off)
                if bulk:
                    self.stalls_discarded += 1
                    log.info("%s: stall discarded flow=%s client=%s start=%s duration=%.3fs: %s",
                             iface, label, client, _iso(e.start + off), e.duration, bulk,
                             extra=_fields("stall_discarded", iface, label, client, e.start + off,
                                           e.duration))
                    continue
                self.stalls_ended += 1
                if self.metrics:
                    self.metrics.stall_ended(e.duration)
                why = " (agent stopping)" if closing else (" (flow evicted/expired)" if e.truncated else "")
                log.info(
                    "%s: stall end flow=%s client=%s start=%s end=%s duration=%.3fs candidates=%d%s",
                    iface, label, client, _iso(e.start + off), _iso(e.end + off), e.duration, e.candidates,
                    why + ("" if check != "unknown" else " (bulk check unknown: kernel counters evicted)")
                    + ("" if other is None else f" other_per_candidate={other:.2f}"),
                    extra=_fields("stall_end", iface, label, client, e.start + off, e.duration, e.candidates),
                )
        if quiet:
            log.info("%s: stall start of %d more flows (starts %s to %s), not logged one by one: "
                     "%d starts this round; each is in the history and the flow view",
                     iface, len(quiet), _iso(min(quiet)), _iso(max(quiet)), len(quiet) + START_LINES,
                     extra={"event": "stall_starts", "iface": iface, "count": len(quiet),
                            "start": min(quiet), "last_start": max(quiet)})
        self._flush_history()

    def _counter_lookup(self) -> Callable[[list[bytes]], dict[bytes, Counters | None]] | None:
        return self.dp.flow_counters if self.dp is not None else None

    def _batch_lookup(self, events: list[Event]) -> CountersLookup | None:
        """The kernel counters of every connection of this round's stall starts
        and ends, read in one vectorised pass over the mapped array (one call
        per stall cost ~20 us: 1 s of a core when an outage starts 50,000 stalls
        at once); connections not gathered here (noted at a stall's start and
        forgotten since) are read on demand. The same instant for all: the
        round's events are handled in microseconds of each other."""
        lookup = self._counter_lookup()
        if lookup is None or self.cfg.bulk_ratio <= 0 or len(events) < 2:
            return lookup
        raws = list(dict.fromkeys(
            r for e in events if isinstance(e, (StallStarted, StallEnded)) for r in self.flows.raws(e.flow)))
        got = lookup(raws) if raws else {}

        def cached(want: list[bytes]) -> dict[bytes, Counters | None]:
            miss = [r for r in want if r not in got]
            if miss:
                got.update(lookup(miss))
            return {r: got[r] for r in want}

        return cached

    def _bulk(self, e: StallEnded, lookup: CountersLookup | None = None) -> Verdict:
        """(what the check could tell, why this stall is bulk traffic rather
        than a signal or "", the ratio it judged by): :class:`~iqn_ctl.engine.discard.BulkJudge` on the
        kernel counters of the stall's connections (several with --key client)
        at its start and end; "unknown" goes into the stall's record."""
        return self._judge.ended(e.flow, self.flows.raws(e.flow), lookup or self._counter_lookup())

    # -- API --

    def snapshot(self) -> dict[str, int]:
        c = dict(self._counters)
        c["flows"] = len(self.flows.table)
        c["flows_in_stall"] = self.stalls_started - self.stalls_ended - self.stalls_discarded
        h = self.history
        c["history_failures"] = h.failures if h else 0
        c["history_pending"] = h.pending if h else 0
        c["history_dropped"] = h.dropped if h else 0
        c["lag_us"] = round(1e6 * self.lag)
        c["polls_late"] = self.polls_late
        c["shed"] = self.shed
        c["backlog"] = len(self._backlog)
        return c

    def engine_counters(self) -> dict[str, int]:
        """The engine's counters, read under ``_state``: the loop grows and
        reorders the table's arrays and dicts while other threads ask, and
        each of these is a cheap read (one vectorised sum at most)."""
        fl = self.flows
        with self._state:
            return {"flows": len(fl.table), "events": fl.events_in, "late": fl.table.late,
                    "evicted": fl.table.evicted, "expired": fl.table.expired,
                    "refused": fl.refused, "refused_events": fl.refused_events}

    def scrape(self) -> dict[str, int]:
        """:meth:`snapshot` with the kernel's totals read now (packets, candidates,
        lost records), not as the loop last copied them: ``status`` and the
        metrics show the same numbers at any moment."""
        snap = self.snapshot()
        if self.dp is not None:
            c = self.dp.counters()
            snap.update(c, lost=max(c.get("lost", 0), self._lost_logged))
        return snap

    def status(self) -> dict[str, Any]:
        """Runs on the API thread: the engine is read only through
        :meth:`engine_counters`, never iterated."""
        snap = self.scrape()
        eng = self.engine_counters()
        cfg = self.cfg
        s: dict[str, Any] = {
            "iface": cfg.iface,
            "pid": os.getpid(),
            "xdp_mode": self.mode,
            **self._hook_status(),
            **snap,
            "flows": eng["flows"],
            "stalls_started": self.stalls_started,
            "stalls_ended": self.stalls_ended,
            "stalls_discarded": self.stalls_discarded,
            "events": eng["events"],
            "late": eng["late"],
            "lag_ms": round(1000 * self.lag, 3),
            "lag_max_ms": round(1000 * self.lag_max, 3),
            "load": self.load(),
            "backlog_max": self.backlog_max,
            "backlog_limit": cfg.backlog,
            "api_waits": self.api_waits,
            "api_wait_max_ms": round(1000 * self.api_wait_max, 3),
            "evicted": eng["evicted"],
            "refused": eng["refused"],
            "refused_events": eng["refused_events"],
            "source_rate": cfg.source_rate,
            "pairing": "on" if cfg.pairing else "off",
            "pair_window": cfg.pair_window,
            "cap": cfg.guard().cap,
            "expired": eng["expired"],
            "started_at": self.started_at,
            "uptime": time.monotonic() - self._started_mono,
            "key": cfg.key_mode,
            "estimator": cfg.estimator,
            "p": cfg.params.p,
            "n": cfg.params.n,
            "min_size": cfg.filt.min_size,
            "max_size": cfg.filt.max_size,
            "port": cfg.filt.port,
            "max_flows": cfg.max_flows,
            "ring_pages": cfg.ring_pages,
            # burst records waiting in the ring that wake the agent
            "wakeup_records": self.dp.wakeup_events if self.dp is not None else 0,
            # candidates per burst in the kernel: the signal's n (--n), at most BURST_MAX
            "burst_n": self.dp.burst_n if self.dp is not None else burst_cap(cfg.params.n),
            # the kernel's volume arrays count 1 in this many non-candidate datagrams (each as this many)
            "vol_sample": self.dp.vol_sample if self.dp is not None else None,
            "state_dir": str(cfg.state_dir),
            "metrics_port": cfg.metrics_port,
            "export": self.export_stats(),
            "boost": self.boost_stats(),
        }
        return s

    def _flows_answer(self, req: dict[str, Any]) -> RawJson:
        """``flows``, built on the API thread from a copy taken under ``_state``
        (a few array copies, no Python step per flow): with 65k flows building
        the rows takes a second, and the loop must not wait for it. An answer
        younger than :data:`FLOWS_REUSE` is served again, to any poller: under a
        flood the table changes every poll, so a version key alone never hits."""
        stalling, limit = req.get("stalling", False), req.get("limit")
        if not isinstance(stalling, bool):
            raise ApiError("flows: 'stalling' must be true or false")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ApiError(f"flows: 'limit' must be a whole number >= 1, got {limit!r}")
        kernel = bool(req.get("kernel", True)) and self.dp is not None
        off = self.wall_offset()
        # a wall-clock step changes the times shown: it is part of the key
        key = (kernel, stalling, limit, round(off, 2))
        now = time.monotonic()
        cached = self._flows_cache
        if cached is not None and cached[0] == key and (
            now - cached[1] < FLOWS_REUSE or (not kernel and cached[2] == self._version)
        ):
            return cached[3]
        with self._state:
            version, snap = self._version, self.flows.snapshot()
        stats: Any = ()
        if kernel and self.dp is not None:
            # raw key -> flow: the loop adds to or clears this map, so it is copied in one C
            # call, during which the GIL lets no other thread run (keys are bytes)
            known = list(snap.fids.items())
            # the kernel's volume of the tracked flows' connections: one read of a mapped array
            live = set(snap.cols.keys)
            stats = self.dp.flow_stats([raw for raw, fid in known if fid in live])
        raw = RawJson(json.dumps(snap.rows(stats, off, stalling=stalling, limit=limit)).encode())
        self._flows_cache = (key, now, version, raw)
        return raw

    def _handle(self, req: dict[str, Any]) -> Any:
        cmd = req["cmd"]
        if cmd == "status":
            return self.status()
        if cmd == "flows":
            return self._flows_answer(req)
        if cmd == "ping":
            return {"iface": self.cfg.iface, "pid": os.getpid()}
        raise ApiError(f"unknown request {cmd!r}")


#: full collections once per this many collections of the middle generation
#: (Python's default: 10): with 65k flows' trackers and names a full collection
#: walks every one of them on the loop's thread (80-1134 ms in the soak)
GC_FULL_EVERY = 1000


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """The event loop's garbage collection: the objects made at start-up (bcc's
    compiler, numpy, sqlite) frozen out of every collection, and full
    collections made rare. Why not off: the loop makes no cyclic garbage per
    flow (its objects go with their reference counts), but a rare full
    collection still frees what an odd cycle leaves. Restored on exit (tests
    and the bench run agents in their own process)."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(before[0], before[1], GC_FULL_EVERY)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[str], None]) -> Iterator[None]:
    """Inside, SIGINT and SIGTERM call ``stop`` with the signal's name (the caller
    logs it and ends its loop); the previous handlers are back afterwards."""
    def _handler(signum: int, _frame: object) -> None:
        stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def serve(
    cfg: AgentConfig, on_ready: Callable[[Agent], None] | None = None, wall: Callable[[], float] = time.time
) -> None:
    """Attach, run until SIGINT/SIGTERM, then detach cleanly (``wall``: see :class:`Agent`)."""
    agent = Agent(cfg, wall)
    stop = threading.Event()

    def _stop(name: str) -> None:
        log.info("%s: %s received, detaching", cfg.iface, name)
        stop.set()

    with stop_on_signals(_stop):
        try:
            agent.start()
            if on_ready is not None:
                on_ready(agent)
            with quiet_gc():
                agent.run(stop)
        finally:
            agent.shutdown()


# -- detach (works without the agent) ------------------------------------------------


def detach(iface: str, run_dir: Path = DEFAULT_RUN_DIR, timeout: float = 10.0) -> str:
    """Stop the agent on ``iface`` (if any), remove any IQN XDP program left on
    it and clean up stale socket/pid files. Returns what was done, for people."""
    need_root("detach")
    lock = InterfaceLock(run_dir, iface)  # refuses a name like '../x' before any file is touched
    done = []
    pid = lock.holder()
    if pid is not None and pid > 0:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while lock.holder() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        if lock.holder() is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 5.0
            while lock.holder() is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            done.append(f"killed agent pid {pid} (it ignored SIGTERM for {timeout:g} s)")
        else:
            done.append(f"stopped agent pid {pid}")
    exists = True
    try:
        socket.if_nametoindex(iface)
    except OSError:
        exists = False
    if exists:
        from iqn_ctl.live.datapath import remove_egress, remove_tc, remove_xdp

        if remove_xdp(iface):
            done.append("removed the IQN XDP program" + ("" if pid else " (agent was not running)"))
        if remove_tc(iface):
            done.append("removed the IQN TC classifier" + ("" if pid else " (agent was not running)"))
        if remove_egress(iface):
            done.append("removed the IQN egress classifier" + ("" if pid else " (agent was not running)"))
    if lock.holder() is None:  # --mitigate: what the state file names (a SIGKILLed agent's too)
        from iqn_ctl.live.mitigate import cleanup

        done.extend(f"removed {what}" for what in cleanup(run_dir, iface))
    for path in (sock_path(run_dir, iface), pid_path(run_dir, iface)):
        if lock.holder() is None:
            try:
                path.unlink()
                if not done or "stale" not in done[-1]:
                    done.append("removed stale agent files")
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
    if not exists and not done:
        raise AgentError(f"no such interface: {iface} (and no agent files for it)")
    return "; ".join(done) if done else f"nothing attached to {iface}"
