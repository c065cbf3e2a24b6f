"""The live flow view, sans-I/O: the data plane's candidate events (raw
kernel key, time, length) -> the engine's :class:`FlowTable`, with the names
(flow label, client, server) the flow view and the history need.

No sockets, no bcc, no clock: the agent's loop feeds it, tests feed it event
tuples exactly as ``Datapath.poll`` returns them. It lives beside the loader
rather than in the engine because its keys are the kernel's key bytes
(:mod:`iqn_ctl.live.layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from iqn_ctl.engine.estimators import DEFAULT_ESTIMATOR
from iqn_ctl.engine.flowkey import FlowKey
from iqn_ctl.engine.flowtable import FlowTable
from iqn_ctl.engine.params import DEFAULT_MAX_FLOWS, SignalParams
from iqn_ctl.engine.tracker import DEFAULT_REORDER, Event
from iqn_ctl.live.layout import decode_key
from iqn_ctl.live.settings import AgentError

KEY_MODES = ("5tuple", "client")


@dataclass(slots=True)
class FlowInfo:
    """How a flow is named to people: the flow label, its client and server."""

    label: str
    client: str
    server: str


class LiveFlows:
    """Candidate events (raw key, time, length) -> FlowTable, with the names
    the flow view and the history need. ``decode`` turns the data plane's raw
    key bytes into a :class:`~iqn_ctl.engine.flowkey.FlowKey`; it runs once per raw
    key, not per event."""

    def __init__(
        self,
        params: SignalParams,
        estimator: str = DEFAULT_ESTIMATOR,
        key_mode: str = "5tuple",
        max_flows: int = DEFAULT_MAX_FLOWS,
        decode: Callable[[bytes], FlowKey] | None = None,
        reorder: float = DEFAULT_REORDER,
    ) -> None:
        if key_mode not in KEY_MODES:
            raise AgentError(f"--key must be one of {', '.join(KEY_MODES)}, got {key_mode!r}")
        if decode is None:
            decode = decode_key
        self.table = FlowTable(params, estimator, max_flows=max_flows, reorder=reorder)
        self.key_mode = key_mode
        self.max_flows = max_flows
        self._decode = decode
        self._fid: dict[bytes, Hashable] = {}
        self._info: dict[Hashable, FlowInfo] = {}
        self.events_in = 0

    def flow_id(self, raw: bytes) -> Hashable:
        fid = self._fid.get(raw)
        if fid is not None:
            return fid
        if len(self._fid) >= 4 * self.max_flows:
            self._fid.clear()  # bounded cache; refilled from the live flows on demand
        k = self._decode(raw)
        if self.key_mode == "client":
            fid = k.client
            info = FlowInfo(k.client, k.client, k.server)
        else:
            fid = k
            info = FlowInfo(k.label, k.client, k.server)
        self._fid[raw] = fid
        old = self._info.get(fid)
        if old is None or old.server != info.server:
            self._info[fid] = info  # client mode: the server shown is the latest one seen
        if len(self._info) > 2 * self.max_flows + 1024:
            self._info = {tr.flow: self._info[tr.flow] for tr in self.table if tr.flow in self._info}
            self._info[fid] = info
        return fid

    def raws(self, fid: Hashable) -> list[bytes]:
        """The data plane's keys of one flow (several with --key client)."""
        return [raw for raw, f in self._fid.items() if f == fid]

    def info(self, fid: Hashable) -> FlowInfo:
        got = self._info.get(fid)
        if got is not None:
            return got
        return FlowInfo(str(fid), str(fid), "")

    def ingest(self, events: Sequence[tuple[bytes, float, int]]) -> list[Event]:
        """Feed one poll's events; each flow's tracker gets one sorted batch."""
        if not events:
            return []
        self.events_in += len(events)
        by_raw: dict[bytes, list[float]] = {}
        for raw, t, _length in events:
            g = by_raw.get(raw)
            if g is None:
                by_raw[raw] = [t]
            else:
                g.append(t)
        groups: dict[Hashable, list[float]] = {}
        for raw, ts in by_raw.items():
            fid = self._fid.get(raw)
            if fid is None:
                fid = self.flow_id(raw)
            if fid in groups:  # --key client: several connections of one client
                groups[fid].extend(ts)
            else:
                groups[fid] = ts
        out: list[Event] = []
        for fid, ts in groups.items():
            ts.sort()
            out.extend(self.table.feed(fid, ts))
        return out

    def advance(self, now: float) -> list[Event]:
        return self.table.advance(now)

    def close(self) -> list[Event]:
        return self.table.close()

    def flows(self, stats: Iterable[tuple[bytes, dict[str, int]]] = ()) -> list[dict[str, Any]]:
        """The flow objects of docs/contracts.md, plus kernel packet/byte counts when given."""
        per: dict[Hashable, dict[str, int]] = {}
        for raw, st in stats:
            fid = self._fid.get(raw)
            if fid is None:
                try:
                    fid = self.flow_id(raw)
                except Exception:  # a key the decoder rejects is just not shown
                    continue
            acc = per.setdefault(fid, {"packets": 0, "bytes": 0})
            acc["packets"] += int(st.get("packets", 0))
            acc["bytes"] += int(st.get("bytes", 0))
        out = []
        for tr in self.table:
            info = self.info(tr.flow)
            rec: dict[str, Any] = {
                "flow": info.label,
                "client": info.client,
                "server": info.server,
                "state": "stall" if tr.in_stall else "normal",
                "candidates": tr.candidates,
                "stalls": tr.stalls,
                "stall_start": tr.stall_start,
                "last_duration": tr.last_duration,
                "last_seen": tr.last_seen,
                "key": self.key_mode,
            }
            k = per.get(tr.flow)
            if k is not None:
                rec.update(k)
            out.append(rec)
        return out
