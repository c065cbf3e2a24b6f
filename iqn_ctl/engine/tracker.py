"""Per-flow stall inference, sans-I/O: arrival times in, stall events out.

The tracker knows nothing of bcc, pcaps or sockets (like h11 or aioquic's
``QuicConnection``): the live agent, pcap replay and trace replay all drive the
same object. It works on batches with numpy so that a replay of millions of
arrivals costs a few vector operations per batch and a Python step per *stall*,
not per arrival; feeding one arrival at a time gives identical results.

Arrivals may come slightly out of order (several CPUs writing, capture merges).
They are held back for ``reorder`` seconds behind the newest arrival (the
watermark) and processed in time order, so any reordering within that tolerance
leaves the result unchanged. An arrival older than the watermark is processed as
if it had arrived at the watermark and counted in ``late``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from iqn_ctl.engine.bursts import Bursts
from iqn_ctl.engine.estimators import DEFAULT_ESTIMATOR, Segment, make_estimator
from iqn_ctl.engine.params import SignalParams

FloatArray = npt.NDArray[np.float64]

#: Default reorder tolerance: toggles of one burst leave the player < 5 ms
#: apart, so this absorbs any reordering inside a burst's pair of neighbours
#: while adding only a few ms to the detection latency.
DEFAULT_REORDER = 0.005

_EMPTY: FloatArray = np.empty(0)


@dataclass(frozen=True, slots=True)
class StallStarted:
    flow: Hashable
    start: float
    detected_at: float


@dataclass(frozen=True, slots=True)
class StallEnded:
    flow: Hashable
    start: float
    end: float
    detected_at: float
    #: candidate arrivals attributed to the stall (about n per signal)
    candidates: int
    #: True when the input ended with the stall still open (replay only)
    truncated: bool = False
    #: when the stall-end condition first held (time-driven estimators; None
    #: otherwise): a clock-driven caller (the live agent) notices the end then,
    #: while a batch feed learns it only from the next arrival (``detected_at``).
    #: Replay reads its counters at min(detected_at, quiet) to see what the
    #: live agent saw (iqn_ctl.engine.discard.BulkJudge)
    quiet: float | None = field(default=None, compare=False)

    @property
    def duration(self) -> float:
        return self.end - self.start


Event = StallStarted | StallEnded


class StallTracker:
    """The stall-start / stall-end window state machine for one flow."""

    __slots__ = (
        "flow", "params", "estimator", "reorder", "_pending", "_hist", "_max_seen",
        "_watermark", "in_stall", "_seg_first", "_seg_trigger", "_seg_count",
        "_prev_last", "_prev_end", "candidates", "stalls", "late", "last_seen", "stall_start",
        "last_duration",
    )

    def __init__(
        self,
        params: SignalParams | None = None,
        estimator: str = DEFAULT_ESTIMATOR,
        flow: Hashable = "trace",
        reorder: float = DEFAULT_REORDER,
    ) -> None:
        if reorder < 0:
            raise ValueError("reorder tolerance must be >= 0")
        self.flow = flow
        self.params = params or SignalParams()
        self.estimator = make_estimator(estimator)
        self.reorder = reorder
        self._pending: FloatArray = _EMPTY
        #: processed arrivals still inside the longest window (sorted)
        self._hist: FloatArray = np.empty(0)
        self._max_seen = -np.inf
        self._watermark = -np.inf
        self.in_stall = False
        self._seg_first = 0.0
        self._seg_trigger = 0.0
        self._seg_count = 0
        #: last arrival of the previous stall: a new stall's first arrival comes after it
        self._prev_last = -np.inf
        #: end of the previous stall: an estimator that backdates a start (count
        #: starts p before the first signal) must not reach into it
        self._prev_end = -np.inf
        self.candidates = 0
        self.stalls = 0
        self.late = 0
        self.last_seen: float | None = None
        self.stall_start: float | None = None
        self.last_duration: float | None = None

    @property
    def busy(self) -> bool:
        """In a stall or holding arrivals: advance() may emit an event."""
        return self.in_stall or bool(self._pending.size)

    # -- input -------------------------------------------------------------

    def feed(self, times: float | Sequence[float] | FloatArray) -> list[Event]:
        """Arrivals (epoch seconds); returns the events they complete."""
        arr = np.atleast_1d(np.asarray(times, dtype=np.float64))
        if arr.size == 0:
            return []
        if not np.all(np.isfinite(arr)):
            raise ValueError("arrival times must be finite numbers")
        self.candidates += int(arr.size)
        top = float(arr.max())
        if top > self._max_seen:
            self._max_seen = top
        self.last_seen = self._max_seen
        if self.reorder == 0 and not self._pending.size:
            ready = arr if arr.size == 1 else np.sort(arr)
            self._watermark = max(self._watermark, self._max_seen)
            return self._process(ready)
        self._pending = np.concatenate((self._pending, arr)) if self._pending.size else arr.copy()
        return self._release(self._max_seen - self.reorder)

    def feed_bursts(self, bursts: Bursts) -> list[Event]:
        """This flow's burst records (:mod:`iqn_ctl.engine.bursts`): the same as
        :meth:`feed` on the candidates they carry, in nanoseconds as the kernel
        stamps them."""
        return self.feed(bursts.seconds())

    def advance(self, now: float) -> list[Event]:
        """The clock reached ``now`` with no new arrival: release held arrivals and
        end a stall whose end condition holds by then."""
        events = self._release(now - self.reorder)
        if self.in_stall and self.estimator.time_driven_end:
            quiet = self._quiet_at()
            if quiet is not None and quiet <= self._watermark:
                events.append(self._end(quiet, self._watermark))
        return events

    def next_deadline(self) -> float | None:
        """The earliest clock time at which :meth:`advance` may emit an event
        (release held arrivals, end the stall), or None while only a new
        arrival can change anything. Like aioquic's ``get_timer()``: the caller
        owns the clock and the waiting, the engine owns the timing."""
        due: float | None = None
        if self._pending.size:
            due = float(self._pending.min()) + self.reorder
        if self.in_stall and self.estimator.time_driven_end:
            quiet = self._quiet_at()
            if quiet is not None:
                due = quiet + self.reorder if due is None else min(due, quiet + self.reorder)
        return due

    def close(self) -> list[Event]:
        """End of input: process everything held and close an open stall."""
        events = self._release(np.inf)
        if self.in_stall:
            if self.estimator.time_driven_end:
                quiet = self._quiet_at()
                detected = quiet if quiet is not None else float(self._hist[-1])
                events.append(self._end(quiet, detected, truncated=True))
            else:
                events.append(self._end(None, float(self._hist[-1]), truncated=True))
        return events

    # -- internals ---------------------------------------------------------

    def _release(self, watermark: float) -> list[Event]:
        if watermark > self._watermark:
            self._watermark = watermark
        pend = self._pending
        if not pend.size:
            return []
        due = pend <= self._watermark
        if not due.any():
            return []
        if due.all():
            block, self._pending = pend, _EMPTY
        else:
            block, self._pending = pend[due], pend[~due]
        return self._process(np.sort(block))

    def _quiet_at(self) -> float | None:
        """When the stall-end condition holds given the arrivals so far: the n-th
        newest arrival leaving the w_end window."""
        n = self.params.n
        if self._hist.size < n:
            return float(self._hist[-1]) if self._hist.size else None
        return float(self._hist[-n]) + self.params.w_end

    def _end(self, quiet: float | None, detected: float, truncated: bool = False) -> StallEnded:
        last = float(self._hist[-1])
        seg = Segment(self._seg_first, self._seg_trigger, last, self._seg_count, quiet)
        start, end = self.estimator.finish(seg, self.params)
        start = max(start, self._prev_end)
        end = max(end, start)
        self._prev_end = end
        self.in_stall = False
        self._prev_last = last
        self.stalls += 1
        self.stall_start = None
        self.last_duration = end - start
        return StallEnded(self.flow, start, end, detected, self._seg_count, truncated, quiet)

    def _process(self, block: FloatArray) -> list[Event]:
        """Run the state machine over sorted arrivals that follow everything seen."""
        p = self.params
        n = p.n
        w_s, w_e = p.w_start, p.w_end
        h = self._hist
        if h.size and block[0] < h[-1]:
            # older than the watermark: too late to place; count it as arriving now
            too_late = block < h[-1]
            self.late += int(too_late.sum())
            block = np.where(too_late, h[-1], block)
            block.sort()
        a = np.concatenate((h, block)) if h.size else block
        base = h.size  # index of the first new arrival in a
        events: list[Event] = []
        time_driven = self.estimator.time_driven_end
        # arrivals in (t - w_s, t] for every new arrival t
        lo_s = np.searchsorted(a, a[base:] - w_s, side="right")
        starts_ok = (np.arange(base, a.size) - lo_s + 1) >= n
        if time_driven:
            # gap after arrival j ends the stall iff a[j+1] - a[j-n+1] >= w_e
            # (fewer than n arrivals in the window just before a[j+1]).
            js = np.arange(max(base - 1, 0), a.size - 1)
            back = js - n + 1
            quiet_t = np.where(back >= 0, a[np.maximum(back, 0)] + w_e, a[js])
            ends_ok = a[js + 1] >= quiet_t
            end_off = max(base - 1, 0)
        else:
            lo_e = np.searchsorted(a, a[base:] - w_e, side="right")
            ends_ok = (np.arange(base, a.size) - lo_e + 1) < n
            end_off = base
            quiet_t = a[base:]
        # absolute indices where a stall may start / where an open one ends;
        # the walk below then costs O(log N) per stall, not per arrival
        start_at = np.flatnonzero(starts_ok) + base
        end_at = np.flatnonzero(ends_ok) + end_off
        pos = base  # first arrival index not yet consumed by the state machine
        count_from = base  # arrivals from here on belong to the open stall
        # an open stall carried over may end in the gap before the first new arrival
        search_from = end_off if time_driven else base
        while True:
            if not self.in_stall:
                k = int(np.searchsorted(start_at, pos))
                if k == start_at.size:
                    break
                i = int(start_at[k])
                first_i = int(np.searchsorted(a, a[i] - w_s, side="right"))
                first_i = max(first_i, int(np.searchsorted(a, self._prev_last, side="right")))
                # an arrival equal to the previous stall's last one (a late one placed
                # at it) may trigger: it is then the first of its own stall
                first_i = min(first_i, i)
                self.in_stall = True
                self._seg_first = float(a[first_i])
                self._seg_trigger = float(a[i])
                self._seg_count = i - first_i + 1
                self.stall_start = max(
                    self.estimator.start(self._seg_first, self._seg_trigger, p), self._prev_end
                )
                events.append(StallStarted(self.flow, self.stall_start, float(a[i])))
                count_from = i + 1
                # time-driven: the gap right after the trigger may already end it
                search_from = i if time_driven else i + 1
            k = int(np.searchsorted(end_at, search_from))
            if k == end_at.size:
                self._seg_count += a.size - count_from
                break
            j = int(end_at[k])
            if time_driven:
                # quiet after arrival j: j is the stall's last arrival
                self._seg_count += j + 1 - count_from
                self._hist_set(a[: j + 1])
                events.append(self._end(float(quiet_t[j - end_off]), float(a[j + 1])))
                pos = j + 1
            else:
                # arrival j found fewer than n in w_end: j - 1 was the last one,
                # and j itself may start the next stall
                self._seg_count += j - count_from
                self._hist_set(a[:j])
                events.append(self._end(float(a[j]), float(a[j])))
                pos = j
            count_from = pos
        self._hist_set(a)
        return events

    def _hist_set(self, a: FloatArray) -> None:
        """Keep what the windows can still reach: the last n arrivals and all
        within the longest window of the newest."""
        keep_t = a[-1] - max(self.params.w_start, self.params.w_end)
        cut = min(int(np.searchsorted(a, keep_t, side="right")), max(a.size - self.params.n, 0))
        self._hist = a[cut:]
