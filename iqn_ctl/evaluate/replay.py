"""Offline sources driven through the same engine as the live agent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from iqn_ctl.engine.flowtable import FlowTable
from iqn_ctl.engine.params import CandidateFilter, SignalParams
from iqn_ctl.engine.tracker import StallEnded, StallTracker
from iqn_ctl.evaluate.traces import Stall, read_timestamp_log


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
    msg = log.warning(path)
    if msg and warn:
        warn(msg)
    ended = infer_times(log.times, params, estimator)
    return [Stall(e.start, e.end) for e in ended]


def replay_flows(
    flow_ids: np.ndarray,
    times: np.ndarray,
    labels: list[tuple[str, str]],
    params: SignalParams,
    estimator: str,
) -> list[Stall]:
    """Candidates of many flows: ``flow_ids[i]`` indexes ``labels`` ((flow, client)).

    Every flow's arrivals go to its tracker as one batch, so a capture with a
    million candidates costs a handful of numpy calls per flow.
    """
    table = FlowTable(params, estimator, max_flows=max(len(labels), 1))
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
    path: str | Path, params: SignalParams, estimator: str, filt: CandidateFilter
) -> list[Stall]:
    from iqn_ctl.capture.pcap import read_candidates

    cands = read_candidates(path, filt)
    return replay_flows(cands.flow_ids, cands.times, cands.labels, params, estimator)
