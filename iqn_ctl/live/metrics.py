"""Prometheus exposition of one agent (opt-in with ``--metrics-port``).

Why Prometheus: ISPs aggregate many routers with the monitoring they already
run; every agent serves its own ``/metrics`` and the ISP's Prometheus scrapes
them. Kernel-side totals (packets, candidates, lost events) are read at scrape
time from the agent's snapshot rather than mirrored into counters, so the
numbers are exactly what ``iqn-ctl status`` shows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: stall durations are 0.4 s to minutes; buckets follow the paper's range
DURATION_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 60.0, 120.0, 300.0)

Snapshot = Callable[[], dict[str, int]]
#: the exporter's state (``Exporter.stats``), None when the agent does not export
ExportSnapshot = Callable[[], "dict[str, Any] | None"]


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


class _AgentCollector(Collector):
    def __init__(self, iface: str, snapshot: Snapshot, export: ExportSnapshot | None = None,
                 info: dict[str, str] | None = None, boost: ExportSnapshot | None = None) -> None:
        self.boost = boost
        self.iface = iface
        self.snapshot = snapshot
        self.export = export
        self.info = dict(info or {})

    def collect(self) -> Iterator[Metric]:
        if self.export is not None:
            yield from export_metrics(self.iface, self.export())
        if self.boost is not None:
            yield from boost_metrics(self.iface, self.boost())
        if self.info:
            names = sorted(self.info)
            dp = GaugeMetricFamily("iqn_dataplane_info",
                                   "where the classifier runs: hook (xdp/tc), XDP mode, direction, "
                                   "link (ethernet/l3) and device type; always 1",
                                   labels=["iface", *names])
            dp.add_metric([self.iface, *(self.info[k] for k in names)], 1.0)
            yield dp
        s = self.snapshot()
        for name, key, doc in (
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
        ):
            c = CounterMetricFamily(name, doc, labels=["iface"])
            c.add_metric([self.iface], float(s.get(key, 0)))
            yield c
        for name, key, doc in (
            ("iqn_flows", "flows", "flows tracked by the agent"),
            ("iqn_flows_in_stall", "flows_in_stall", "flows currently in a stall"),
            ("iqn_history_pending", "history_pending", "history writes held in memory, not yet on disk"),
            ("iqn_backlog", "backlog", "candidate records drained from the ring, not yet fed to the engine"),
        ):
            g = GaugeMetricFamily(name, doc, labels=["iface"])
            g.add_metric([self.iface], float(s.get(key, 0)))
            yield g
        lag = GaugeMetricFamily("iqn_poll_lag_seconds",
                                "time from the last poll's oldest candidate to its events being handled",
                                labels=["iface"])
        lag.add_metric([self.iface], s.get("lag_us", 0) / 1e6)
        yield lag


class AgentMetrics:
    """The metrics of one agent; ``stall_started`` / ``stall_ended`` are called
    from the event loop, the rest is read at scrape time."""

    def __init__(self, iface: str, snapshot: Snapshot, export: ExportSnapshot | None = None,
                 info: dict[str, str] | None = None, boost: ExportSnapshot | None = None) -> None:
        """``info``: labels of ``iqn_dataplane_info`` (the agent's hook_info());
        ``boost``: the agent's boost_stats() (--mitigate)."""
        self.iface = iface
        self.registry = CollectorRegistry()
        self.registry.register(_AgentCollector(iface, snapshot, export, info, boost))
        self._started = Counter(
            "iqn_stalls_started", "stalls inferred to have started", ["iface"], registry=self.registry
        ).labels(iface)
        self._ended = Counter(
            "iqn_stalls_ended", "stalls inferred to have ended", ["iface"], registry=self.registry
        ).labels(iface)
        self._duration = Histogram(
            "iqn_stall_duration_seconds", "inferred stall durations", ["iface"],
            buckets=DURATION_BUCKETS, registry=self.registry,
        ).labels(iface)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def stall_started(self) -> None:
        self._started.inc()

    def stall_ended(self, duration: float) -> None:
        self._ended.inc()
        self._duration.observe(max(duration, 0.0))

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve /metrics on a background thread; raises OSError if the port is taken.

        Loopback by default: anyone who reaches the port reads the agent's
        numbers, so exposing them is an explicit ``--metrics-addr``. The labels
        name only the interface, never a client (so ``--redact`` has nothing to hide here).
        """
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
