"""One process for the agents of many interfaces: ``iqn-ctl attach eth0 eth1 ...``
(or the interfaces of a config file, :mod:`iqn_ctl.live.config`).

Why one process: a router with N ports ran N agents, N metrics ports and N
scrape targets. Here each interface keeps its own :class:`~iqn_ctl.live.agent.Agent`
(its data plane, flow table, history connection, exporter and event loop, in
a thread of its own: the loops sleep in the kernel, so they do not contend
for the interpreter), and the process adds what is shared:

* one ``/metrics`` (:class:`~iqn_ctl.live.metrics.MetricsHub`): every series
  labelled ``iface``, default address 127.0.0.1;
* one API socket. It is bound once and hard-linked as ``<run dir>/<iface>.sock``
  for every interface, so every tool that finds an agent by its interface's
  socket (``iqn-ctl flows --iface``, ``status``, the lab) still does; a request
  says which interface it means (``"iface"``), and one without it is answered
  for the only interface, or refused when there are several (``ping`` and
  ``agents`` excepted);
* one pid file (lock) per interface, as before, all held by this process, so
  ``iqn-ctl detach IFACE`` finds it: it asks the socket to drop that one
  interface (``"cmd": "detach"``) and the others go on;
* the attach watchdog (:mod:`iqn_ctl.live.watchdog`), every ``--watchdog`` s.

The single-interface ``iqn-ctl attach eth0`` is this with one interface: the
same socket path, pid file, metrics and JSON as before, plus the watchdog.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iqn_ctl.live.agent import Agent, AgentConfig, InterfaceLock, need_root, quiet_gc, stop_on_signals
from iqn_ctl.live.agent import detach as detach_one
from iqn_ctl.live.api import DEFAULT_RUN_DIR, ApiError, ApiServer, request, sock_path
from iqn_ctl.live.settings import AgentError
from iqn_ctl.live.watchdog import DEFAULT_PERIOD, Watch

log = logging.getLogger("iqn.agent")


@dataclass
class Shared:
    """What the interfaces of one process share (process-wide keys of the config file)."""

    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    run_dir: Path = DEFAULT_RUN_DIR
    #: seconds between two looks of the attach watchdog; 0: no watchdog
    watchdog: float = DEFAULT_PERIOD

    def validate(self) -> None:
        if self.metrics_port is not None and not 0 < self.metrics_port <= 65535:
            raise AgentError(f"--metrics-port must be in 1..65535, got {self.metrics_port}")
        if not (self.watchdog == 0 or 0.05 <= self.watchdog <= 3600):
            raise AgentError(f"--watchdog must be 0 (off) or in 0.05..3600 seconds, got {self.watchdog}")


@dataclass
class Slot:
    """One interface's agent in the process, its loop's thread and its watchdog."""

    agent: Agent
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    watch: Watch | None = None
    #: held while the watchdog looks at or repairs the interface, and while it is detached
    busy: threading.Lock = field(default_factory=threading.Lock)
    error: BaseException | None = None

    @property
    def iface(self) -> str:
        return self.agent.cfg.iface

    def watched_state(self) -> str:
        """The watchdog's state of the interface (for the metrics; only when watched)."""
        assert self.watch is not None
        return self.watch.state

    def metrics_snapshot(self) -> dict[str, int]:
        """The agent's status counters plus the engine's and the watchdog's, for /metrics."""
        a = self.agent
        snap = a.scrape()
        eng = a.engine_counters()
        snap.update({k: eng[k] for k in ("late", "evicted", "expired")},
                    stalls_discarded=a.stalls_discarded,
                    reattaches=self.watch.reattaches if self.watch is not None else 0,
                    moves_to_xdp=self.watch.moves_to_xdp if self.watch is not None else 0)
        return snap


class Supervisor:
    """``start()`` attaches every interface (all or none), ``run()`` loops until
    the stop event is set, ``shutdown()`` removes everything it created."""

    def __init__(self, cfgs: list[AgentConfig], shared: Shared,
                 wall: Callable[[], float] = time.time) -> None:
        if not cfgs:
            raise AgentError("no interface to attach to")
        names = [c.iface for c in cfgs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise AgentError(f"interface {dup[0]} named twice")
        boosted = [c.mitigate.egress for c in cfgs if c.mitigate is not None]
        twice = sorted({e for e in boosted if boosted.count(e) > 1})
        if twice:  # each agent owns the HTB it puts on its --mitigate interface
            raise AgentError(f"--mitigate {twice[0]} given to more than one interface")
        shared.validate()
        self.shared = shared
        self._cfgs = [dataclasses.replace(c, api=False, metrics_port=None, run_dir=shared.run_dir)
                      for c in cfgs]
        for c in self._cfgs:
            c.validate()
        self._wall = wall
        self.slots: dict[str, Slot] = {}
        self._slots_lock = threading.Lock()
        self.stop = threading.Event()
        self.api: ApiServer | None = None
        self._sock_ino: int | None = None
        self.hub: Any = None

    # -- lifecycle --

    def start(self) -> None:
        need_root("attach")
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> None:
        from iqn_ctl.live.metrics import MetricsHub

        sh = self.shared
        if sh.metrics_port is not None:
            self.hub = MetricsHub()
            self.hub.serve(sh.metrics_port, sh.metrics_addr)
        for cfg in self._cfgs:
            agent = Agent(cfg, self._wall)
            slot = Slot(agent)
            with self._slots_lock:
                self.slots[cfg.iface] = slot
            agent.start()
            assert agent.dp is not None
            if sh.watchdog:
                from iqn_ctl.live.watchdog import ifindex

                index = ifindex(cfg.iface)
                slot.watch = Watch(agent.dp, index if index is not None else -1)
            if self.hub is not None:
                agent.add_metrics(slot.metrics_snapshot, self.hub,
                                  attach=slot.watched_state if slot.watch is not None else None)
        self._serve_api()
        ifaces = list(self.slots)
        log.info("agent pid %d on %s%s%s", os.getpid(), ", ".join(ifaces),
                 f"; metrics on {sh.metrics_addr}:{self.hub.port}" if self.hub is not None else "",
                 f"; watchdog every {sh.watchdog:g} s" if sh.watchdog else "; watchdog off")

    def _serve_api(self) -> None:
        """One socket, one name per interface (hard links of it)."""
        run_dir = self.shared.run_dir
        first, *others = list(self.slots)
        access = getattr(self.slots[first].agent, "access", None)  # --group: every agent resolved the same
        self.api = ApiServer(sock_path(run_dir, first), self._handle, access).start()
        self._sock_ino = sock_path(run_dir, first).stat().st_ino
        for iface in others:
            path = sock_path(run_dir, iface)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a dead agent's (we hold the interface's lock)
            os.link(sock_path(run_dir, first), path)

    def _unlink_name(self, iface: str) -> None:
        """Remove ``<iface>.sock`` if it still names our socket (not a later agent's)."""
        path = sock_path(self.shared.run_dir, iface)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == self._sock_ino:
                path.unlink()

    def run(self) -> None:
        """Every interface's event loop in its thread; the watchdog in this one."""
        for slot in list(self.slots.values()):
            slot.thread = threading.Thread(target=self._loop, args=(slot,), name=f"iqn-loop:{slot.iface}",
                                           daemon=True)
            slot.thread.start()
        period = self.shared.watchdog or 0.5
        while not self.stop.wait(period):
            if self.shared.watchdog:
                self._watch()
        for slot in list(self.slots.values()):
            slot.stop.set()
        for slot in list(self.slots.values()):
            if slot.thread is not None:
                slot.thread.join()
        failed = [s for s in self.slots.values() if s.error is not None]
        if failed:
            e = failed[0].error
            raise AgentError(f"{failed[0].iface}: the event loop failed: {type(e).__name__}: {e}")

    def _loop(self, slot: Slot) -> None:
        try:
            slot.agent.run(slot.stop)
        except BaseException as e:  # one interface's failure stops the process (systemd restarts it)
            log.exception("%s: the event loop failed; stopping the agent", slot.iface)
            slot.error = e
            self.stop.set()

    def _watch(self) -> None:
        for slot in list(self.slots.values()):
            if slot.watch is None or slot.stop.is_set():
                continue
            with slot.busy:
                if slot.stop.is_set():
                    continue
                try:
                    slot.watch.check()
                except Exception:  # the watchdog must never take the agent down
                    log.exception("%s: the attach watchdog failed", slot.iface)

    def drop(self, iface: str) -> None:
        """Stop and detach one interface; the others go on."""
        with self._slots_lock:
            slot = self.slots.pop(iface)
        with slot.busy:
            slot.stop.set()
            if slot.thread is not None:
                slot.thread.join()
            slot.agent.shutdown()  # detaches, releases its lock and pid file, its metrics
        self._unlink_name(iface)
        log.info("%s: detached on request; the agent goes on with %s", iface, ", ".join(self.slots))

    def shutdown(self) -> None:
        """Detach every interface and remove the socket's names; idempotent."""
        for slot in list(self.slots.values()):
            slot.stop.set()
        for slot in list(self.slots.values()):
            t = slot.thread
            if t is not None and t.is_alive() and t is not threading.current_thread():
                t.join()
        if self.api is not None:
            self.api.close(unlink=False)
            self.api = None
        for iface, slot in list(self.slots.items()):
            try:
                slot.agent.shutdown()
            finally:
                self._unlink_name(iface)
        if self.hub is not None:
            self.hub.close()
            self.hub = None

    # -- API --

    def _pick(self, iface: Any, cmd: str) -> Slot:
        with self._slots_lock:
            slots = dict(self.slots)
        if iface is None:
            if len(slots) == 1:
                return next(iter(slots.values()))
            raise ApiError(f"{cmd}: this agent serves {', '.join(slots)}: name one ('iface')")
        if not isinstance(iface, str) or iface not in slots:
            raise ApiError(f"{cmd}: this agent does not serve {iface!r} (it serves {', '.join(slots)})")
        return slots[iface]

    def status(self, slot: Slot) -> dict[str, Any]:
        st = slot.agent.status()
        w = slot.watch
        st.update(
            metrics_port=self.hub.port if self.hub is not None else None,
            interfaces=list(self.slots),
            watchdog=self.shared.watchdog,
            **(w.view() if w is not None else {"attach_state": None, "attach_note": "", "attach_since": None,
                                               "reattaches": 0, "moves_to_xdp": 0}),
        )
        return st

    def _handle(self, req: dict[str, Any]) -> Any:
        cmd, iface = req["cmd"], req.get("iface")
        if cmd == "agents":  # every interface's status (or the one named)
            return [self.status(s) for name, s in list(self.slots.items()) if iface in (None, name)]
        if cmd == "ping" and iface is None:
            return {"iface": next(iter(self.slots), None), "pid": os.getpid(), "interfaces": list(self.slots)}
        slot = self._pick(iface, cmd)
        if cmd == "ping":
            return {"iface": slot.iface, "pid": os.getpid(), "interfaces": list(self.slots)}
        if cmd == "status":
            return self.status(slot)
        if cmd == "detach":
            if len(self.slots) == 1:
                log.info("%s: detach requested; stopping", slot.iface)
                self.stop.set()
                return {"iface": slot.iface, "stopping": True}
            # not on the API thread: dropping joins the loop and closes what it served
            threading.Thread(target=self.drop, args=(slot.iface,), name="iqn-drop", daemon=True).start()
            return {"iface": slot.iface, "stopping": False}
        return slot.agent._handle(req)


def serve(cfgs: list[AgentConfig], shared: Shared, on_ready: Callable[[Supervisor], None] | None = None,
          wall: Callable[[], float] = time.time) -> None:
    """Attach every interface, run until SIGINT/SIGTERM (or the last one is
    detached), then detach cleanly."""
    sup = Supervisor(cfgs, shared, wall)

    def _stop(name: str) -> None:
        log.info("%s received, detaching %s", name, ", ".join(sup.slots))
        sup.stop.set()

    with stop_on_signals(_stop):
        try:
            sup.start()
            if on_ready is not None:
                on_ready(sup)
            with quiet_gc():
                sup.run()
        finally:
            sup.shutdown()


def detach(iface: str, run_dir: Path = DEFAULT_RUN_DIR, timeout: float = 10.0) -> str:
    """``iqn-ctl detach IFACE``: an agent that serves other interfaces too drops
    this one and goes on; otherwise as :func:`iqn_ctl.live.agent.detach` (stop
    the agent, remove what is left of ours, clean stale files)."""
    need_root("detach")
    lock = InterfaceLock(run_dir, iface)
    pid = lock.holder()
    if pid is None or pid <= 0:
        return detach_one(iface, run_dir, timeout)
    try:
        got = request(sock_path(run_dir, iface), "detach", iface=iface, timeout=timeout)
    except ApiError:  # an agent from before supervisors ("unknown request"), or not answering
        got = None
    if not isinstance(got, dict) or got.get("stopping", True):
        return detach_one(iface, run_dir, timeout)
    deadline = time.monotonic() + timeout
    while lock.holder() is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    if lock.holder() is not None:
        raise AgentError(f"the agent (pid {pid}) did not detach {iface} within {timeout:g} s")
    rest = detach_one(iface, run_dir, timeout)  # whatever is left: nothing, normally
    done = f"detached it from agent pid {pid}, which goes on with its other interfaces"
    return done if rest.startswith("nothing attached") else f"{done}; {rest}"
