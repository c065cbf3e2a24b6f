"""Many flows at once: one :class:`StallTracker` per flow key, bounded and expiring.

Still sans-I/O: keys are whatever the caller uses (a 5-tuple, a client
address, ``"trace"``). A router sees far more flows than ever signal, so the
table is bounded and idle flows expire. When it is full, the least recently
seen flow that is *not* in a stall goes first: otherwise a flood of one-packet
flows (65,536 take about a second to send) pushes a viewer's tracker out in the
middle of its stall and cuts the stall short. Only when every tracked flow is
in a stall is the least recent one of them closed, with its evidence so far
(``truncated``), rather than dropped silently.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from iqn_ctl.engine.bursts import Bursts
from iqn_ctl.engine.estimators import DEFAULT_ESTIMATOR, make_estimator
from iqn_ctl.engine.params import DEFAULT_MAX_FLOWS, SignalParams
from iqn_ctl.engine.tracker import DEFAULT_REORDER, Event, StallTracker

#: a flow that sent nothing for this many stall-end windows is forgotten
IDLE_WINDOWS = 150.0  # 150 x 4p = 120 s at p = 0.2


def table_settings(
    params: SignalParams | None, estimator: str, max_flows: int, idle_timeout: float | None, reorder: float
) -> tuple[SignalParams, float]:
    """Check the arguments both flow tables take (this one and the vectorised
    :class:`~iqn_ctl.engine.vector.VectorFlowTable`) and fill in the defaults:
    returns the signal parameters and the idle timeout."""
    if max_flows < 1:
        raise ValueError("max_flows must be at least 1")
    if reorder < 0:
        raise ValueError("reorder tolerance must be >= 0")
    make_estimator(estimator)  # fail early on a bad name
    params = params or SignalParams()
    return params, idle_timeout if idle_timeout is not None else IDLE_WINDOWS * params.w_end


class FlowTable:
    """Stall trackers keyed by flow."""

    def __init__(
        self,
        params: SignalParams | None = None,
        estimator: str = DEFAULT_ESTIMATOR,
        max_flows: int = DEFAULT_MAX_FLOWS,
        idle_timeout: float | None = None,
        reorder: float = DEFAULT_REORDER,
    ) -> None:
        self.params, self.idle_timeout = table_settings(params, estimator, max_flows, idle_timeout, reorder)
        self.estimator = estimator
        self.max_flows = max_flows
        self.reorder = reorder
        self._flows: OrderedDict[Hashable, StallTracker] = OrderedDict()
        #: flows that may emit an event on advance(): in a stall or holding arrivals
        self._active: set[Hashable] = set()
        #: the flows not in a stall, least recently seen first: evicted before any stall
        self._calm: OrderedDict[Hashable, None] = OrderedDict()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[StallTracker]:
        return iter(self._flows.values())

    def get(self, flow: Hashable) -> StallTracker | None:
        return self._flows.get(flow)

    def _tracker(self, flow: Hashable, events: list[Event]) -> StallTracker:
        tr = self._flows.get(flow)
        if tr is None:
            while len(self._flows) >= self.max_flows:
                self._evict(events)
            tr = StallTracker(self.params, self.estimator, flow, self.reorder)
            self._flows[flow] = tr
            self._calm[flow] = None
        else:
            self._flows.move_to_end(flow)
            if flow in self._calm:
                self._calm.move_to_end(flow)
        return tr

    def _evict(self, events: list[Event]) -> None:
        """Make room for one flow: the least recently seen one not in a stall,
        or, when every flow is in a stall, the least recently seen of all. O(1)."""
        if self._calm:
            old_key = next(iter(self._calm))
            old = self._flows.pop(old_key)
        else:
            old_key, old = self._flows.popitem(last=False)
        self._forget(old_key)
        events.extend(old.close())
        self.evicted += 1

    def _forget(self, flow: Hashable) -> None:
        self._active.discard(flow)
        self._calm.pop(flow, None)

    def _note(self, flow: Hashable, tr: StallTracker) -> None:
        if tr.busy:
            self._active.add(flow)
        else:
            self._active.discard(flow)
        if tr.in_stall:
            self._calm.pop(flow, None)
        elif flow not in self._calm:
            self._calm[flow] = None  # its stall just ended: the newest of the calm flows

    def feed(self, flow: Hashable, times: float | npt.ArrayLike) -> list[Event]:
        """Arrivals of one flow."""
        events: list[Event] = []
        tr = self._tracker(flow, events)
        events.extend(tr.feed(times))  # type: ignore[arg-type]
        self._note(flow, tr)
        return events

    def feed_many(self, flows: list[Hashable], times: npt.ArrayLike) -> list[Event]:
        """Arrivals of many flows (parallel sequences), grouped so each tracker
        sees one batch; events come out in order of their detection time."""
        t = np.asarray(times, dtype=np.float64)
        if len(flows) != t.size:
            raise ValueError("flows and times differ in length")
        groups: dict[Hashable, list[int]] = {}
        for i, f in enumerate(flows):
            groups.setdefault(f, []).append(i)
        events: list[Event] = []
        for f, idx in groups.items():
            events.extend(self.feed(f, t[idx]))
        events.sort(key=lambda e: e.detected_at)
        return events

    def feed_bursts(self, keys: Sequence[Hashable], bursts: Bursts) -> list[Event]:
        """Burst records (:mod:`iqn_ctl.engine.bursts`) of many flows, burst
        ``i`` of flow ``keys[bursts.flow[i]]``: the same as :meth:`feed_many` on
        the candidates they carry."""
        bid, _ = bursts.candidates()
        return self.feed_many([keys[f] for f in bursts.flow[bid].tolist()], bursts.seconds())

    def advance(self, now: float) -> list[Event]:
        """The clock reached ``now``: end stalls whose end window has passed and
        forget flows idle for longer than ``idle_timeout``."""
        events: list[Event] = []
        for flow in list(self._active):
            tr = self._flows[flow]
            events.extend(tr.advance(now))
            self._note(flow, tr)
        horizon = now - self.idle_timeout
        while self._flows:
            flow, tr = next(iter(self._flows.items()))
            if tr.last_seen is None or tr.last_seen >= horizon:
                break
            del self._flows[flow]
            self._forget(flow)
            events.extend(tr.close())
            self.expired += 1
        return events

    def next_deadline(self) -> float | None:
        """The earliest clock time at which :meth:`advance` may emit an event or
        forget a flow, or None when nothing is due without a new arrival."""
        dues = [d for f in self._active if (d := self._flows[f].next_deadline()) is not None]
        if self._flows:
            oldest = next(iter(self._flows.values())).last_seen
            if oldest is not None:
                dues.append(oldest + self.idle_timeout)
        return min(dues) if dues else None

    def close(self) -> list[Event]:
        """End of input: close every open stall."""
        events: list[Event] = []
        for tr in self._flows.values():
            events.extend(tr.close())
        self._active.clear()
        return events
