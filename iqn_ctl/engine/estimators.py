"""How a detected run of signal bursts becomes a stall record (start, end).

The detector (``tracker.StallTracker``) finds *when* a flow is signalling; an
estimator turns what it saw into the stall's start and end. Both estimators
here see the same facts (:class:`Segment`), so they plug in behind one API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from iqn_ctl.engine.params import COUNT_OFFSET, SignalParams


@dataclass(frozen=True, slots=True)
class Segment:
    """What the detector knows about one signalling run when it ends.

    ``first`` is the earliest arrival of the window that started the stall,
    ``trigger`` the arrival that made that window reach n, ``last`` the last
    arrival before the stall-end condition held, ``count`` the arrivals from
    ``first`` to ``last`` inclusive, and ``quiet_at`` the instant the end
    condition first held (``None`` when the input ended with the stall open).
    """

    first: float
    trigger: float
    last: float
    count: int
    quiet_at: float | None


class Estimator(Protocol):
    name: str
    #: True: the stall ends the moment fewer than n arrivals lie in the last
    #: w_end (checked between arrivals too). False: only an arrival can end it,
    #: as in the paper's per-packet loop.
    time_driven_end: bool

    def start(self, first: float, trigger: float, params: SignalParams) -> float: ...

    def finish(self, seg: Segment, params: SignalParams) -> tuple[float, float]: ...


class PaperEstimator:
    """The paper's agent: start is the arrival that completes n candidates in
    w_start; end is the last arrival before a packet finds fewer than n in w_end.

    Both edges carry the path's jitter directly, which is where most of its error
    comes from.
    """

    name = "paper"
    time_driven_end = False

    def start(self, first: float, trigger: float, params: SignalParams) -> float:
        return trigger

    def finish(self, seg: Segment, params: SignalParams) -> tuple[float, float]:
        if seg.quiet_at is None:
            # The trace ended with the stall open: the paper's agent had no next
            # packet to close it. Closing at the last arrival + w_end + p (when its
            # polling would have given up) reproduces the published music figures
            # (206 / 266 ms); closing at the last arrival would give 205 / 264 ms.
            return seg.trigger, seg.last + params.w_end + params.p
        return seg.trigger, seg.last


class CountEstimator:
    """Duration from the number of signals, not from the window edges.

    The end-user agent sends one burst of n toggles per screenshot in which it
    sees the stall, one screenshot every p. So ``count / n`` bursts mean the stall
    lasted about ``count / n`` screenshot intervals, plus half an interval for the
    screenshot phase (the stall begins on average p/2 before the first screenshot
    that shows it). Counting is immune to path jitter, which only moves packets in
    time; a lost or spurious candidate moves the estimate by p/n only.

    The end-user agent's protocol ``edges`` (docs/user-agent.md) makes this
    exact: it times the stall itself, every p/5, and sends the toggle count C
    this formula turns back into that duration within p/n (a final burst of
    0..n-2 toggles carries the fraction of the last interval). So one decoder
    serves both protocols, and neither side has to know which the other speaks.

    The start is the first arrival of the triggering window (the first burst);
    the end is start + duration, but never after the moment the end condition
    held, so consecutive stalls never overlap and the estimate is final as soon
    as the stall-end window has passed. The end may fall before the last
    arrival: path jitter delays late bursts by up to a second on the paper's
    path, so the last arrival is a poor bound (clamping to it costs 24 ms MAE).
    """

    name = "count"
    time_driven_end = True

    def start(self, first: float, trigger: float, params: SignalParams) -> float:
        return first - params.p

    def finish(self, seg: Segment, params: SignalParams) -> tuple[float, float]:
        start = self.start(seg.first, seg.trigger, params)
        duration = (seg.count / params.n + COUNT_OFFSET) * params.p
        cap = seg.quiet_at if seg.quiet_at is not None else seg.last + params.w_end
        return start, min(start + duration, cap)


ESTIMATORS: dict[str, type[PaperEstimator] | type[CountEstimator]] = {
    "count": CountEstimator,
    "paper": PaperEstimator,
}
DEFAULT_ESTIMATOR = "count"


def make_estimator(name: str) -> PaperEstimator | CountEstimator:
    try:
        return ESTIMATORS[name]()
    except KeyError:
        raise ValueError(
            f"unknown estimator {name!r}; choose one of {', '.join(sorted(ESTIMATORS))}"
        ) from None
