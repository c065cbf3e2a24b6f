"""Offline sources driven through the same engine as the live agent."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iqn_ctl.engine.bursts import group_seconds
from iqn_ctl.engine.discard import BulkJudge, CounterLookup, Counters
from iqn_ctl.engine.flowkey import KEY_MODES, flow_of
from iqn_ctl.engine.flowtable import FlowTable
from iqn_ctl.engine.params import DEFAULT_MAX_FLOWS, MAX_FRAME, CandidateFilter, ParamError, SignalParams
from iqn_ctl.engine.tracker import Event, StallEnded, StallStarted, StallTracker
from iqn_ctl.evaluate.traces import Stall, read_timestamp_log

#: the latest instant a time can be printed as a date (9999-12-31 23:59:59 UTC)
LAST_DATE = 253402300799.0
Warn = Callable[[str], None]


def time_warning(times: np.ndarray, name: str | Path) -> str | None:
    """One line when arrival times lie before 1970 or after year 9999: no
    capture was made then, so the file's clock (or the file) is garbled."""
    t = np.asarray(times, dtype=np.float64)
    early = int(np.count_nonzero(t < 0))
    late = int(np.count_nonzero(t > LAST_DATE))
    if not (early or late):
        return None
    parts = [f"{early} before 1970"] if early else []
    parts += [f"{late} after year 9999"] if late else []
    return f"{name}: {' and '.join(parts)} of {t.size} candidate time(s); is the clock garbled?"


def infer_times(
    times: np.ndarray, params: SignalParams, estimator: str, flow: str = "trace"
) -> list[StallEnded]:
    """One flow's arrival times (any order) to its stalls."""
    tr = StallTracker(params, estimator, flow)
    events = tr.feed(times) + tr.close()
    return [e for e in events if isinstance(e, StallEnded)]


def replay_timestamps(
    path: str | Path,
    params: SignalParams,
    estimator: str,
    warn: Callable[[str], None] | None = None,
) -> list[Stall]:
    """A timestamp file's stalls; ``warn`` gets a line when repeats were dropped."""
    log = read_timestamp_log(path)
    if warn:
        for msg in (log.warning(path), time_warning(log.times, path)):
            if msg:
                warn(msg)
    ended = infer_times(log.times, params, estimator)
    return [Stall(e.start, e.end) for e in ended]


def _flow_events(
    flow_ids: np.ndarray, times: np.ndarray, flows: int, params: SignalParams, estimator: str,
    max_flows: int = DEFAULT_MAX_FLOWS,
) -> list[Event]:
    """Every flow's arrivals to its tracker as one batch, so a capture with a
    million candidates costs a handful of numpy calls per flow. The candidates
    become burst records with the twin of the kernel's grouping
    (:func:`~iqn_ctl.engine.bursts.group_seconds`, on integer ns as the kernel
    stamps), and the engine takes those records as the live agent's does: one
    engine for both. The table is
    bounded like the live agent's (``max_flows``, least recent closed first):
    a flow is fed all its arrivals at once, so the one closed to make room is
    already complete and closing it early changes nothing - but a capture of a
    million one-packet flows no longer keeps a million trackers. Each flow's
    events come in their order."""
    table = FlowTable(params, estimator, max_flows=max(min(flows, max_flows), 1))
    events: list[Event] = []
    bursts = group_seconds(flow_ids, times, params.n)
    order = np.argsort(bursts.flow, kind="stable")
    ids = bursts.flow[order]
    keys = list(range(flows))
    bounds = np.flatnonzero(np.diff(ids)) + 1
    for chunk in np.split(order, bounds):
        if chunk.size:
            events.extend(table.feed_bursts(keys, bursts.select(chunk)))
    events.extend(table.close())
    return events


def replay_flows(
    flow_ids: np.ndarray,
    times: np.ndarray,
    labels: list[tuple[str, str]],
    params: SignalParams,
    estimator: str,
    max_flows: int = DEFAULT_MAX_FLOWS,
) -> list[Stall]:
    """Candidates of many flows: ``flow_ids[i]`` indexes ``labels`` ((flow, client))."""
    out = []
    for e in _flow_events(flow_ids, times, len(labels), params, estimator, max_flows):
        if isinstance(e, StallEnded):
            flow, client = labels[int(e.flow)]  # type: ignore[call-overload]
            out.append(Stall(e.start, e.end, flow, client, e.candidates))
    out.sort(key=lambda s: (s.start, s.flow))
    return out


@dataclass(slots=True)
class CaptureCounters:
    """The kernel's per-connection counters (``struct flow_stats``), rebuilt
    from a capture: every UDP packet from the signalling port, any size, as the
    XDP program counts it, so :class:`~iqn_ctl.engine.discard.BulkJudge` can
    read them at any instant. ``conns[i]`` holds connection i's packet times
    (sorted) and the running counts after each packet."""

    times: list[np.ndarray]
    cands: list[np.ndarray]
    nbytes: list[np.ndarray]

    @classmethod
    def build(cls, conn_ids: np.ndarray, times: np.ndarray, cand: np.ndarray, sizes: np.ndarray,
              conns: int) -> CaptureCounters:  # fmt: skip
        order = np.lexsort((times, conn_ids))
        ids, ts = conn_ids[order], times[order]
        cs, bs = cand[order].astype(np.int64), sizes[order].astype(np.int64)
        bounds = np.searchsorted(ids, np.arange(conns + 1))
        out = cls([], [], [])
        for i in range(conns):
            lo, hi = bounds[i], bounds[i + 1]
            out.times.append(ts[lo:hi])
            out.cands.append(np.cumsum(cs[lo:hi]))
            out.nbytes.append(np.cumsum(bs[lo:hi]))
        return out

    def at(self, t: float) -> CounterLookup[int]:
        """The look-up of the counters at instant ``t`` (packets at ``t`` included);
        None for a connection that had sent nothing yet (no kernel entry)."""

        def lookup(conns: list[int]) -> dict[int, Counters | None]:
            got: dict[int, Counters | None] = {}
            for c in conns:
                k = int(np.searchsorted(self.times[c], t, side="right"))
                got[c] = None if k == 0 else Counters(
                    k, int(self.cands[c][k - 1]), int(self.nbytes[c][k - 1]))
            return got

        return lookup


def noticed_at(e: Event) -> float:
    """When the live agent, driven by its clock, acts on an event: a stall's
    start at its trigger arrival, its end as soon as the end condition holds
    (``quiet``) rather than at the next arrival, which is when a batch feed
    learns it (``detected_at``)."""
    if isinstance(e, StallEnded) and e.quiet is not None:
        return min(e.detected_at, e.quiet)
    return e.detected_at


def post_process(
    events: list[Event], flow_conns: list[list[tuple[float, int]]], labels: list[tuple[str, str]],
    counters: CaptureCounters | None, judge: BulkJudge[int],
) -> tuple[list[Stall], list[Stall]]:  # fmt: skip
    """(kept, discarded) stalls of a replay: ``--bulk-ratio`` judged by the same
    :class:`~iqn_ctl.engine.discard.BulkJudge` as the live agent, on counters
    read when the agent would have read the kernel's. ``flow_conns[f]``: flow
    f's connections as (first candidate time, connection), sorted: the agent
    knows a connection of a flow once a candidate of it has arrived."""
    kept: list[Stall] = []
    dropped: list[Stall] = []
    for e in events:
        f = int(e.flow)  # type: ignore[call-overload]
        t = noticed_at(e)
        conns = [c for first, c in flow_conns[f] if first <= t]
        lookup = counters.at(t) if counters is not None else None
        if isinstance(e, StallStarted):
            judge.started(f, conns, lookup)
            continue
        check, why, _ = judge.ended(f, conns, lookup)
        flow, client = labels[f]
        st = Stall(e.start, e.end, flow, client, e.candidates, check)
        (dropped if why else kept).append(st)
    kept.sort(key=lambda s: (s.start, s.flow))
    dropped.sort(key=lambda s: (s.start, s.flow))
    return kept, dropped


@dataclass(slots=True)
class CaptureReplay:
    """A capture's stalls after the live agent's post-processing."""

    stalls: list[Stall]
    #: stalls --bulk-ratio found to be bulk traffic (not recorded by the agent either)
    discarded: list[Stall]


def replay_capture(
    path: str | Path,
    params: SignalParams,
    estimator: str,
    filt: CandidateFilter,
    warn: Warn | None = None,
    report: Warn | None = None,
    key_mode: str = "5tuple",
    bulk_ratio: float = 0.0,
) -> list[Stall]:
    """A capture's stalls (:func:`replay_capture_full` without the discarded ones)."""
    return replay_capture_full(path, params, estimator, filt, warn, report, key_mode, bulk_ratio).stalls


def replay_capture_full(
    path: str | Path,
    params: SignalParams,
    estimator: str,
    filt: CandidateFilter,
    warn: Warn | None = None,
    report: Warn | None = None,
    key_mode: str = "5tuple",
    bulk_ratio: float = 0.0,
) -> CaptureReplay:
    """A capture's stalls, post-processed as the live agent does with the same
    options: connections grouped into flows by ``key_mode``
    (:func:`~iqn_ctl.engine.flowkey.flow_of`), and with ``bulk_ratio`` > 0
    stalls of bulk flows discarded on counters rebuilt from every packet of
    the signalling port in the capture.

    ``warn`` gets a line per oddity of the file (most packets undecodable,
    implausible times, garbled timestamp fields); ``report`` one line counting
    packets read, decoded and candidates, so an empty result can be told from
    an unreadable one."""
    from iqn_ctl.capture.pcap import read_candidates

    if key_mode not in KEY_MODES:
        raise ParamError(f"--key must be one of {', '.join(KEY_MODES)}, got {key_mode!r}")
    if not 0 <= bulk_ratio < 1e6:
        raise ParamError(f"--bulk-ratio must be >= 0, got {bulk_ratio}")
    wide = bulk_ratio > 0
    read = CandidateFilter(filt.port, 0, MAX_FRAME) if wide else filt
    pkts = read_candidates(path, read, warn=warn)
    cand = (pkts.sizes >= filt.min_size) & (pkts.sizes <= filt.max_size) if wide else np.ones(
        pkts.times.size, np.bool_)
    conn_c, times_c = pkts.flow_ids[cand], pkts.times[cand]
    # connections that carried a candidate, grouped into flows by --key
    first_cand = np.full(len(pkts.keys), np.inf)
    np.minimum.at(first_cand, conn_c, times_c)
    fid_of: dict[Hashable, int] = {}
    labels: list[tuple[str, str]] = []
    conn_flow = np.full(len(pkts.keys), -1, np.int64)
    flow_conns: list[list[tuple[float, int]]] = []
    for c, k in enumerate(pkts.keys):
        if not np.isfinite(first_cand[c]):
            continue
        fid, info = flow_of(k, key_mode)
        f = fid_of.get(fid)
        if f is None:
            f = fid_of[fid] = len(labels)
            labels.append((info.label, info.client))
            flow_conns.append([])
        conn_flow[c] = f
        flow_conns[f].append((float(first_cand[c]), c))
    for fc in flow_conns:
        fc.sort()
    if report:
        report(
            f"{path}: {pkts.packets} packet(s) read, {pkts.packets - pkts.undecodable} decoded, "
            f"{int(cand.sum())} candidate(s) in {int(np.isfinite(first_cand).sum())} flow(s)"
        )
    if warn:
        if pkts.packets and 2 * pkts.undecodable > pkts.packets:
            warn(
                f"{path}: {pkts.undecodable} of {pkts.packets} packet(s) could not be decoded "
                "as IP over Ethernet (cut short, or not IP)"
            )
        msg = time_warning(times_c, path)
        if msg:
            warn(msg)
    events = _flow_events(conn_flow[conn_c], times_c, len(labels), params, estimator)
    counters = (CaptureCounters.build(pkts.flow_ids, pkts.times, cand, pkts.sizes, len(pkts.keys))
                if wide else None)  # fmt: skip
    kept, dropped = post_process(events, flow_conns, labels, counters, BulkJudge(bulk_ratio, filt.max_size))
    return CaptureReplay(kept, dropped)
