"""Prometheus exposition of one agent (opt-in with ``--metrics-port``).

Why Prometheus: ISPs aggregate many routers with the monitoring they already
run; every agent serves its own ``/metrics`` and the ISP's Prometheus scrapes
them. Kernel-side totals (packets, candidates, lost events) are read at scrape
time from the agent's snapshot rather than mirrored into counters, so the
numbers are exactly what ``iqn-ctl status`` shows.

One process may run the agents of several interfaces
(:mod:`iqn_ctl.live.supervisor`): they share one :class:`MetricsHub`, so one
``/metrics`` carries every interface, each series labelled ``iface``, and every
metric family appears once (a family repeated per interface is invalid
exposition that Prometheus refuses).
"""

from __future__ import annotations

import contextlib
import platform
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from iqn_ctl.live.settings import AgentError

#: stall durations are 0.4 s to minutes; buckets follow the paper's range
DURATION_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 60.0, 120.0, 300.0)

Snapshot = Callable[[], dict[str, int]]
#: the exporter's state (``Exporter.stats``), None when the agent does not export
ExportSnapshot = Callable[[], "dict[str, Any] | None"]
#: the attach watchdog's states (:mod:`iqn_ctl.live.watchdog`), one series each in
#: ``iqn_attach_state``: 1 for the interface's current state, 0 for the others
ATTACH_STATES = ("attached", "replaced", "removed", "gone")


def build_version() -> str:
    """The installed ``iqn`` distribution's version ("unknown" from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iqn")
    except PackageNotFoundError:
        return "unknown"


def export_metrics(iface: str, st: dict[str, Any] | None) -> Iterator[Metric]:
    """The live export's metrics (``--export``; none without it): what waits,
    what went, what failed, and where to."""
    if st is None:
        return
    for name, value, doc in (
        ("iqn_export_records", None, "records acknowledged by JetStream, by type"),
        ("iqn_export_errors", st["errors"],
         "failed export attempts (connect, stream set-up, a batch not wholly acknowledged); retried"),
        ("iqn_export_retries", st["retries"], "records sent again after an attempt got no acknowledgement"),
    ):
        c = CounterMetricFamily(name, doc, labels=["iface", "type"] if value is None else ["iface"])
        if value is None:
            c.add_metric([iface, "stall"], float(st["exported_stalls"]))
            c.add_metric([iface, "session"], float(st["exported_sessions"]))
        else:
            c.add_metric([iface], float(value))
        yield c
    g = GaugeMetricFamily("iqn_export_backlog", "records in the history waiting to be exported",
                          labels=["iface"])
    g.add_metric([iface], float(st["backlog"]))
    yield g
    g = GaugeMetricFamily("iqn_export_last_success_timestamp_seconds",
                          "epoch of the last batch JetStream acknowledged (0: none yet)", labels=["iface"])
    g.add_metric([iface], float(st["last_export"] or 0.0))
    yield g
    g = GaugeMetricFamily("iqn_export_connected", "1 while connected to the broker (server: which one)",
                          labels=["iface", "server"])
    g.add_metric([iface, st["connected"] or ""], 1.0 if st["connected"] else 0.0)
    yield g


def boost_metrics(iface: str, st: dict[str, Any] | None) -> Iterator[Metric]:
    """The boosts of ``--mitigate`` (none without it): in force, given, seconds, bytes, refused."""
    if st is None:
        return
    g = GaugeMetricFamily("iqn_boosts_active", "clients boosted now (--mitigate)", labels=["iface"])
    g.add_metric([iface], float(st["active"]))
    yield g
    for name, key, doc in (
        ("iqn_boosts", "total", "boosts started (a stalling client's traffic put in the priority class)"),
        ("iqn_boost_seconds", "seconds", "seconds of boost given, all clients together"),
        ("iqn_boost_bytes", "bytes", "bytes the priority class carried to boosted clients"),
        ("iqn_boost_timeouts", "timeouts", "boosts ended by --boost-max while their stall went on"),
    ):
        c = CounterMetricFamily(name, doc, labels=["iface"])
        c.add_metric([iface], float(st[key]))
        yield c
    c = CounterMetricFamily("iqn_boosts_denied", "stalls not boosted: all slots taken (full) or the "
                            "client's episode spent its --boost-max (rate)", labels=["iface", "reason"])
    c.add_metric([iface, "full"], float(st["denied_full"]))
    c.add_metric([iface, "rate"], float(st["denied_rate"]))
    yield c


@dataclass
class _Source:
    """One interface's readings, as the hub's collector asks for them at scrape time."""

    iface: str
    snapshot: Snapshot
    export: ExportSnapshot | None
    #: the agent's hook_info, read at scrape time (None: no data-plane labels)
    info: Callable[[], dict[str, str]] | None
    attach: Callable[[], str] | None
    #: the agent's boost_stats() (--mitigate), None without it
    boost: ExportSnapshot | None = None


#: counters read from an interface's snapshot: (metric, snapshot key, help).
#: The engine's (late, evicted, expired) and the discarded stalls are in the
#: snapshot the supervisor gives (``Slot.metrics_snapshot``); a snapshot without
#: a key (a bare :class:`~iqn_ctl.live.agent.Agent`) leaves its series out.
COUNTERS = (
    ("iqn_packets", "packets", "packets the XDP program saw"),
    ("iqn_candidates", "candidates", "candidate packets (port and size match)"),
    ("iqn_lost_events", "lost", "candidate events lost between kernel and agent"),
    ("iqn_bursts", "bursts", "burst records the XDP program wrote to its ring buffer"),
    ("iqn_parse_errors", "parse_errors", "packets the XDP program could not parse"),
    ("iqn_unpaired_candidates", "unpaired",
     "candidates kept back: no recent client packet (or credit) on their flow (forgery guard)"),
    ("iqn_capped_candidates", "capped",
     "paired candidates kept back over their client's cap (--cap)"),
    ("iqn_client_packets", "client_packets",
     "client-to-server datagrams to the signalling port seen at egress (pairing)"),
    ("iqn_history_write_failures", "history_failures",
     "failed attempts to write the stall history (disk full, I/O error); retried"),
    ("iqn_history_dropped", "history_dropped",
     "stall history writes dropped because too many were held in memory"),
    ("iqn_polls_late", "polls_late",
     "polls whose oldest candidate waited more than 50 ms to be handled (the agent fell behind)"),
    ("iqn_shed_events", "shed",
     "candidate records the agent dropped, oldest first, because more than --backlog waited"),
    ("iqn_stalls_discarded", "stalls_discarded",
     "ended stalls discarded as bulk traffic by the --bulk-ratio rule (a video flow, not a signal)"),
    ("iqn_late_events", "late",
     "candidates that arrived behind their flow's watermark (clamped to it, still counted)"),
    ("iqn_evicted_flows", "evicted", "flows dropped from the engine's table to make room (--max-flows)"),
    ("iqn_expired_flows", "expired", "flows dropped from the engine's table after going silent"),
    ("iqn_reattaches", "reattaches",
     "times the attach watchdog put the classifier back (removed, replaced or interface re-created)"),
    ("iqn_moves_to_xdp", "moves_to_xdp",
     "times the attach watchdog moved the classifier from TC back to XDP (--hook auto, once the "
     "foreign XDP program it sat beside was gone)"),
)
GAUGES = (
    ("iqn_flows", "flows", "flows tracked by the agent"),
    ("iqn_flows_in_stall", "flows_in_stall", "flows currently in a stall"),
    ("iqn_history_pending", "history_pending", "history writes held in memory, not yet on disk"),
    ("iqn_backlog", "backlog", "candidate records drained from the ring, not yet fed to the engine"),
)


class _HubCollector(Collector):
    """Every metric family once, with one series per interface of the hub."""

    def __init__(self, hub: MetricsHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        sources = self.hub.sources()
        b = GaugeMetricFamily("iqn_build_info", "the running agent's version and Python; always 1",
                              labels=["version", "python"])
        b.add_metric([self.hub.version, platform.python_version()], 1.0)
        yield b
        if not sources:
            return
        families: dict[str, Metric] = {}
        for src in sources:
            for m in [*export_metrics(src.iface, src.export() if src.export is not None else None),
                      *boost_metrics(src.iface, src.boost() if src.boost is not None else None)]:
                if m.name in families:
                    families[m.name].samples.extend(m.samples)
                else:
                    families[m.name] = m
        yield from families.values()
        infos = [(src.iface, src.info() if src.info is not None else {}) for src in sources]
        names = sorted({k for _, info in infos for k in info})
        if names:
            dp = GaugeMetricFamily("iqn_dataplane_info",
                                   "where the classifier runs: hook (xdp/tc), XDP mode, direction, "
                                   "link (ethernet/l3) and device type; always 1",
                                   labels=["iface", *names])
            for iface, info in infos:
                if info:
                    dp.add_metric([iface, *(info.get(k, "") for k in names)], 1.0)
            yield dp
        watched = [src for src in sources if src.attach is not None]
        if watched:
            st = GaugeMetricFamily("iqn_attach_state",
                                   "the attach watchdog's view of the classifier on the interface: 1 for "
                                   "the current state (attached, replaced by a foreign XDP program, "
                                   "removed, interface gone), 0 for the others",
                                   labels=["iface", "state"])
            for src in watched:
                now = src.attach()  # type: ignore[misc]
                for state in ATTACH_STATES:
                    st.add_metric([src.iface, state], 1.0 if state == now else 0.0)
            yield st
        snaps = [(src.iface, src.snapshot()) for src in sources]
        for name, key, doc in COUNTERS:
            c = CounterMetricFamily(name, doc, labels=["iface"])
            for iface, s in snaps:
                if key in s:
                    c.add_metric([iface], float(s[key]))
            if c.samples:
                yield c
        for name, key, doc in GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["iface"])
            for iface, s in snaps:
                g.add_metric([iface], float(s.get(key, 0)))
            yield g
        lag = GaugeMetricFamily("iqn_poll_lag_seconds",
                                "time from the last poll's oldest candidate to its events being handled",
                                labels=["iface"])
        for iface, s in snaps:
            lag.add_metric([iface], s.get("lag_us", 0) / 1e6)
        yield lag


class MetricsHub:
    """One registry and one ``/metrics`` server for every interface of a process."""

    def __init__(self) -> None:
        self.version = build_version()
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._sources: dict[str, _Source] = {}
        self.registry.register(_HubCollector(self))
        self.started = Counter("iqn_stalls_started", "stalls inferred to have started", ["iface"],
                               registry=self.registry)
        self.ended = Counter("iqn_stalls_ended", "stalls inferred to have ended", ["iface"],
                             registry=self.registry)
        self.duration = Histogram("iqn_stall_duration_seconds", "inferred stall durations", ["iface"],
                                  buckets=DURATION_BUCKETS, registry=self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def add(self, src: _Source) -> None:
        with self._lock:
            self._sources[src.iface] = src

    def remove(self, iface: str) -> None:
        """An interface's series go with it (its agent was detached)."""
        with self._lock:
            self._sources.pop(iface, None)
        for metric in (self.started, self.ended, self.duration):
            with contextlib.suppress(KeyError):
                metric.remove(iface)

    def sources(self) -> list[_Source]:
        with self._lock:
            return sorted(self._sources.values(), key=lambda s: s.iface)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve /metrics on a background thread. A port that is taken or an
        address that is not this host's is the user's to fix: one line
        (:class:`AgentError`), the same for one agent and for many interfaces.

        Loopback by default: anyone who reaches the port reads the agent's
        numbers, so exposing them is an explicit ``--metrics-addr``. The labels
        name only the interface, never a client (so ``--redact`` has nothing to hide here).
        """
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise AgentError(f"cannot serve metrics on {addr}:{port}: {e.strerror or e}") from None

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class AgentMetrics:
    """The metrics of one interface's agent; ``stall_started`` / ``stall_ended`` are
    called from its event loop, the rest is read at scrape time. Without ``hub`` it
    has a hub (and server) of its own; with one it is that hub's interface."""

    def __init__(self, iface: str, snapshot: Snapshot, export: ExportSnapshot | None = None,
                 info: Callable[[], dict[str, str]] | None = None,
                 hub: MetricsHub | None = None, attach: Callable[[], str] | None = None,
                 boost: ExportSnapshot | None = None) -> None:
        """``info``: returns the labels of ``iqn_dataplane_info`` now (the agent's
        hook_info); ``attach``: the watchdog's state of the interface;
        ``boost``: the agent's boost_stats() (--mitigate)."""
        self.iface = iface
        self._own = hub is None
        self.hub = hub if hub is not None else MetricsHub()
        self.registry = self.hub.registry
        self.hub.add(_Source(iface, snapshot, export, info, attach, boost))
        self._started = self.hub.started.labels(iface)
        self._ended = self.hub.ended.labels(iface)
        self._duration = self.hub.duration.labels(iface)

    def stall_started(self) -> None:
        self._started.inc()

    def stall_ended(self, duration: float) -> None:
        self._ended.inc()
        self._duration.observe(max(duration, 0.0))

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve this agent's own hub (see :meth:`MetricsHub.serve`)."""
        self.hub.serve(port, addr)

    @property
    def port(self) -> int | None:
        return self.hub.port

    def close(self) -> None:
        """Take this interface's series out of the hub; the server too if the hub is its own."""
        self.hub.remove(self.iface)
        if self._own:
            self.hub.close()
