"""Offline sources driven through the same engine as the live agent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from iqn_ctl.engine.flowtable import FlowTable
from iqn_ctl.engine.params import DEFAULT_MAX_FLOWS, CandidateFilter, SignalParams
from iqn_ctl.engine.tracker import StallEnded, StallTracker
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


def replay_flows(
    flow_ids: np.ndarray,
    times: np.ndarray,
    labels: list[tuple[str, str]],
    params: SignalParams,
    estimator: str,
    max_flows: int = DEFAULT_MAX_FLOWS,
) -> list[Stall]:
    """Candidates of many flows: ``flow_ids[i]`` indexes ``labels`` ((flow, client)).

    Every flow's arrivals go to its tracker as one batch, so a capture with a
    million candidates costs a handful of numpy calls per flow. The table is
    bounded like the live agent's (``max_flows``, least recent closed first):
    a flow is fed all its arrivals at once, so the one closed to make room is
    already complete and closing it early changes nothing - but a capture of a
    million one-packet flows no longer keeps a million trackers.
    """
    table = FlowTable(params, estimator, max_flows=max(min(len(labels), max_flows), 1))
    events = []
    order = np.argsort(flow_ids, kind="stable")
    ids = flow_ids[order]
    ts = times[order]
    bounds = np.flatnonzero(np.diff(ids)) + 1
    for chunk_ids, chunk_ts in zip(np.split(ids, bounds), np.split(ts, bounds), strict=True):
        if chunk_ids.size:
            events.extend(table.feed(int(chunk_ids[0]), chunk_ts))
    events.extend(table.close())
    out = []
    for e in events:
        if isinstance(e, StallEnded):
            flow, client = labels[int(e.flow)]  # type: ignore[call-overload]
            out.append(Stall(e.start, e.end, flow, client))
    out.sort(key=lambda s: (s.start, s.flow))
    return out


def replay_capture(
    path: str | Path,
    params: SignalParams,
    estimator: str,
    filt: CandidateFilter,
    warn: Warn | None = None,
    report: Warn | None = None,
) -> list[Stall]:
    """A capture's stalls. ``warn`` gets a line per oddity of the file (most
    packets undecodable, implausible times, garbled timestamp fields);
    ``report`` one line counting packets read, decoded and candidates, so an
    empty result can be told from an unreadable one."""
    from iqn_ctl.capture.pcap import read_candidates

    cands = read_candidates(path, filt, warn=warn)
    if report:
        flows = len(cands.labels)
        report(
            f"{path}: {cands.packets} packet(s) read, {cands.packets - cands.undecodable} decoded, "
            f"{cands.candidates} candidate(s) in {flows} flow(s)"
        )
    if warn:
        if cands.packets and 2 * cands.undecodable > cands.packets:
            warn(
                f"{path}: {cands.undecodable} of {cands.packets} packet(s) could not be decoded "
                "as IP over Ethernet (cut short, or not IP)"
            )
        msg = time_warning(cands.times, path)
        if msg:
            warn(msg)
    return replay_flows(cands.flow_ids, cands.times, cands.labels, params, estimator)
