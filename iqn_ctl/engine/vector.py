"""Many flows at once, costed per poll rather than per flow: the stall state
machine of :class:`~iqn_ctl.engine.tracker.StallTracker` kept as arrays.

Why: in an outage thousands of viewers stall together, each sending a burst of
n candidates every p. ``FlowTable`` pays a tracker call (tens of microseconds of
Python) per flow per poll, so it falls behind at a few thousand stalling flows
per core. Here the per-flow state is a struct of arrays (the last n arrivals,
in-stall flag, segment counters, watermarks), a poll's arrivals are grouped by
flow with one sort, and the window tests run as array comparisons over all of
them. Python runs only for flows whose state changes (a stall starts or ends),
for new flows, and for evictions.

Why the last n arrivals are enough: every window test of the tracker asks
whether the arrival n-1 places back lies inside a window of the current one
(the n-th newest arrival leaving w_end, n arrivals within w_start), and when a
stall starts its triggering window holds exactly n arrivals (the arrival before
did not trigger) unless the previous stall's last arrival cuts it shorter.

``StallTracker`` and ``FlowTable`` stay the reference:
``tests/test_engine_vector.py`` holds this table to the same events, times,
order and counters on random multi-flow inputs. The API mirrors ``FlowTable``
(same eviction of the least recently seen flow not in a stall, idle expiry,
reorder watermark, ``late`` counting); two choices the reference leaves to a
``set``'s iteration order are fixed here: :meth:`advance` visits busy flows
least recently fed first, and flows whose stall it ended rejoin the
not-in-stall eviction order in that order.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt

from iqn_ctl.engine.bursts import Bursts
from iqn_ctl.engine.estimators import DEFAULT_ESTIMATOR, Segment, make_estimator
from iqn_ctl.engine.flowtable import table_settings
from iqn_ctl.engine.params import DEFAULT_MAX_FLOWS, SignalParams
from iqn_ctl.engine.tracker import DEFAULT_REORDER, Event, StallEnded, StallStarted

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
_INITIAL_CAPACITY = 1024
#: slots per block of quiet-time minima (time-driven ends): a poll costs about
#: slots/_QBLOCK plus _QBLOCK per flow it changed (capacities are powers of two)
_QBLOCK = 16
#: an event with what orders it: (detected_at, group or LRU rank, sequence)
_Tagged = tuple[float, int, int, Event]


@dataclass(frozen=True, slots=True)
class FlowView:
    """A snapshot of one flow's counters, named like ``StallTracker``'s."""

    flow: Hashable
    in_stall: bool
    busy: bool
    candidates: int
    stalls: int
    late: int
    last_seen: float | None
    stall_start: float | None
    last_duration: float | None


@dataclass(frozen=True, slots=True)
class FlowColumns:
    """A copy of a :class:`VectorFlowTable`'s per-flow columns
    (:meth:`VectorFlowTable.copy_columns`), indexed by slot; owned by the reader."""

    keys: list[Hashable | None]
    live: npt.NDArray[np.bool_]
    stamp: IntArray
    in_stall: npt.NDArray[np.bool_]
    cands: IntArray
    stalls: IntArray
    last_seen: FloatArray
    stall_start: FloatArray
    last_dur: FloatArray

    def slots(self, stalling: bool = False) -> list[int]:
        """The live slots (only those in a stall if ``stalling``), least
        recently fed first, as the table iterates."""
        live = np.flatnonzero(self.live & self.in_stall if stalling else self.live)
        return live[np.argsort(self.stamp[live], kind="stable")].tolist()  # type: ignore[no-any-return]


def _opt(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


class VectorFlowTable:
    """``FlowTable``'s API and results over struct-of-arrays state."""

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
        self._est = make_estimator(estimator)
        self._td = self._est.time_driven_end
        self.max_flows = max_flows
        self.reorder = reorder
        self.evicted = 0
        self.expired = 0
        self._slot: dict[Hashable, int] = {}
        self._key: list[Hashable] = []
        self._free: list[int] = []
        #: the global clock of "least recently fed": stamps only grow
        self._clock = 0
        self._serials = 0
        #: the groups' slots after the last _feed_groups (None: it fed them one by one)
        self._fed: IntArray | None = None
        self._pend_slot: IntArray = np.empty(0, np.int64)
        self._pend_t: FloatArray = np.empty(0)
        #: advance() calls so far, and the watermark each raised busy flows to, kept as
        #: a stack of (call, value) with values falling: the largest raise since call j
        #: is the first entry from j on (one entry while the clock only moves forward).
        #: Why: advance() raises every busy flow's watermark; applied lazily
        #: (:meth:`_settle_wm`), a poll costs what it touches, not one pass per flow
        self._advances = 0
        self._adv_k: list[int] = []
        self._adv_v: list[float] = []
        #: time-driven ends: which slots' quiet times (``_qv``) changed since the
        #: per-block minima (``_bmin``, blocks of _QBLOCK slots) were last brought up
        #: to date: next_deadline() and advance() look at the blocks' minima and at
        #: the slots of the blocks that may be due, not at every flow. With
        #: ``_due_now`` (slots whose quiet time had passed their watermark when
        #: processed) they yield the flows advance() may end
        self._bdirty: npt.NDArray[np.bool_] = np.zeros(0, np.bool_)
        self._bmin: FloatArray = np.zeros(0)
        self._due_now: set[int] = set()
        #: (slots, their stamps) in the order they were fed: the least recently fed
        #: live flow is the first entry whose stamp is still the slot's (_oldest)
        self._lru: list[tuple[IntArray, IntArray]] = []
        self._lru_off = 0
        self._lru_len = 0
        self._cap = 0
        self._grow(min(_INITIAL_CAPACITY, max_flows))

    # -- state arrays --------------------------------------------------------

    def _grow(self, cap: int) -> None:
        n, old = self.params.n, self._cap

        def ext(name: str, fill: float | bool, dtype: type, shape: tuple[int, ...] = ()) -> Any:
            new: Any = np.full((cap, *shape), fill, dtype=dtype)
            if old:
                new[:old] = getattr(self, name)
            return new

        #: the last n processed arrivals, oldest first (-inf: fewer so far)
        self._ring = ext("_ring", -np.inf, np.float64, (n,))
        self._live = ext("_live", False, np.bool_)
        self._in_stall = ext("_in_stall", False, np.bool_)
        self._seg_first = ext("_seg_first", 0.0, np.float64)
        self._seg_trigger = ext("_seg_trigger", 0.0, np.float64)
        self._seg_count = ext("_seg_count", 0, np.int64)
        self._prev_last = ext("_prev_last", -np.inf, np.float64)
        self._prev_end = ext("_prev_end", -np.inf, np.float64)
        self._cands = ext("_cands", 0, np.int64)
        self._stalls = ext("_stalls", 0, np.int64)
        self._late = ext("_late", 0, np.int64)
        self._max_seen = ext("_max_seen", -np.inf, np.float64)
        self._wm = ext("_wm", -np.inf, np.float64)
        self._last_seen = ext("_last_seen", np.nan, np.float64)
        self._stall_start = ext("_stall_start", np.nan, np.float64)
        self._last_dur = ext("_last_dur", np.nan, np.float64)
        self._npend = ext("_npend", 0, np.int64)
        #: when the flow was last fed (its place in least-recently-seen order)
        self._stamp = ext("_stamp", 0, np.int64)
        #: its place in the order of flows not in a stall (eviction order)
        self._calm_stamp = ext("_calm_stamp", 0, np.int64)
        #: which flow holds the slot: a number never given twice (0: free), so a
        #: caller's remembered (slot, serial) says whether the slot is still that flow's
        self._serial = ext("_serial", 0, np.int64)
        #: the first advance() whose watermark raise the slot's ``_wm`` does not hold yet
        self._wm_from = ext("_wm_from", 0, np.int64)
        #: time-driven ends: the slot's quiet time while it stalls, else inf
        nb = -(-cap // _QBLOCK)  # whole blocks: the slots past cap stay inf
        qv = np.full(nb * _QBLOCK, np.inf)
        if old:
            prev: FloatArray = self._qv
            qv[:prev.size] = prev
        self._qv: FloatArray = qv
        self._bmin = np.concatenate((self._bmin, np.full(nb - self._bmin.size, np.inf)))
        self._bdirty = np.concatenate((self._bdirty, np.zeros(nb - self._bdirty.size, np.bool_)))
        self._key.extend([None] * (cap - old))
        self._free.extend(range(cap - 1, old - 1, -1))
        self._cap = cap

    def _new_slots(self, keys: list[Hashable]) -> IntArray:
        """Slots for new flows, their state reset in one array assignment per
        column (an outage brings thousands of new flows in one poll)."""
        while len(self._free) < len(keys):
            if self._cap >= self.max_flows:
                raise AssertionError("no free slot")  # the caller evicted first: unreachable
            self._grow(min(self._cap * 2, self.max_flows))
        free = self._free
        got = [free.pop() for _ in keys]
        for k, sl in zip(keys, got, strict=True):
            self._slot[k] = sl
            self._key[sl] = k
        s = np.asarray(got, np.int64)
        self._live[s] = True
        self._ring[s] = -np.inf
        self._in_stall[s] = False
        self._seg_first[s] = self._seg_trigger[s] = 0.0
        self._seg_count[s] = self._cands[s] = self._stalls[s] = self._late[s] = 0
        self._prev_last[s] = self._prev_end[s] = -np.inf
        self._max_seen[s] = self._wm[s] = -np.inf
        self._last_seen[s] = self._stall_start[s] = self._last_dur[s] = np.nan
        self._npend[s] = 0
        self._wm_from[s] = self._advances
        self._qv[s] = np.inf
        self._bdirty[s // _QBLOCK] = True
        self._serial[s] = self._serials + 1 + np.arange(s.size)
        self._serials += s.size
        return s

    def _drop(self, s: int) -> None:
        del self._slot[self._key[s]]
        self._key[s] = None
        self._live[s] = False
        self._serial[s] = 0
        self._free.append(s)

    # -- the FlowTable API ---------------------------------------------------

    def __len__(self) -> int:
        return len(self._slot)

    def __iter__(self) -> Iterator[FlowView]:
        """Flows least recently fed first, as ``FlowTable`` iterates."""
        live = np.flatnonzero(self._live)
        for s in live[np.argsort(self._stamp[live], kind="stable")].tolist():
            yield self._view(s)

    def get(self, flow: Hashable) -> FlowView | None:
        s = self._slot.get(flow)
        return None if s is None else self._view(s)

    def copy_columns(self) -> FlowColumns:
        """Every tracked flow's counters, copied: memcpy-speed array copies and
        one list copy, with no Python step per flow. Why: a reader on another
        thread (the agent's flows API) holds the loop's lock only for this and
        builds its per-flow rows from the copy after letting go."""
        return FlowColumns(
            list(self._key), self._live.copy(), self._stamp.copy(), self._in_stall.copy(),
            self._cands.copy(), self._stalls.copy(), self._last_seen.copy(),
            self._stall_start.copy(), self._last_dur.copy(),
        )

    def _view(self, s: int) -> FlowView:
        return FlowView(
            self._key[s], bool(self._in_stall[s]), bool(self._in_stall[s] or self._npend[s]),
            int(self._cands[s]), int(self._stalls[s]), int(self._late[s]),
            _opt(self._last_seen[s]), _opt(self._stall_start[s]), _opt(self._last_dur[s]),
        )

    def feed(self, flow: Hashable, times: float | npt.ArrayLike) -> list[Event]:
        """Arrivals of one flow."""
        t = np.atleast_1d(np.asarray(times, dtype=np.float64))
        return self._feed_groups([flow], np.zeros(t.size, np.int64), t, by_time=False)

    def feed_many(
        self, flows: Sequence[Hashable] | npt.NDArray[np.integer], times: npt.ArrayLike  # type: ignore[type-arg]
    ) -> list[Event]:
        """Arrivals of many flows (parallel sequences); events come out in order
        of detection time, ties in order of each flow's first arrival in the
        call, as ``FlowTable.feed_many``. An integer array of flow ids is
        grouped without a Python step per arrival."""
        t = np.asarray(times, dtype=np.float64).ravel()
        if len(flows) != t.size:
            raise ValueError("flows and times differ in length")
        if t.size == 0:
            return []
        if isinstance(flows, np.ndarray):
            uniq, first, inv = np.unique(flows, return_index=True, return_inverse=True)
            rank = np.argsort(first, kind="stable")
            group_of = np.empty(rank.size, np.int64)
            group_of[rank] = np.arange(rank.size)
            return self._feed_groups(uniq[rank].tolist(), group_of[inv.ravel()], t)
        groups: dict[Hashable, int] = {}
        gid = np.fromiter((groups.setdefault(f, len(groups)) for f in flows), np.int64, t.size)
        return self._feed_groups(list(groups), gid, t)

    def feed_bursts(
        self, keys: Sequence[Hashable], bursts: Bursts, hint: tuple[IntArray, IntArray] | None = None
    ) -> list[Event]:
        """Burst records (:mod:`iqn_ctl.engine.bursts`), burst ``i`` of flow
        ``keys[bursts.flow[i]]``: the data plane's unit of input. The same events
        at the same times as :meth:`feed_many` on the candidates they carry
        (tests/test_bursts.py); the work is array operations per batch, the
        only Python step is one per distinct flow.

        ``hint``: (slot, serial) of each key as :meth:`locate` (or an earlier
        call) gave them; where :meth:`holds` still confirms them the key is not
        looked up (a dict look-up hashes the key: the costly step per flow when
        keys are dataclasses), the rest are looked up as without a hint. The
        fed keys' entries are then set to where they are now."""
        if not len(bursts):
            return []
        bid, _ = bursts.candidates()
        ids = bursts.flow[bid]
        uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
        rank = np.argsort(first, kind="stable")
        group_of = np.empty(rank.size, np.int64)
        group_of[rank] = np.arange(rank.size)
        pick = uniq[rank]
        flows = list(map(keys.__getitem__, pick.tolist()))
        if hint is None:
            return self._feed_groups(flows, group_of[inv.ravel()], bursts.seconds())
        slots = np.where(self.holds(hint[0][pick], hint[1][pick]), hint[0][pick], -1)
        events = self._feed_groups(flows, group_of[inv.ravel()], bursts.seconds(), slots=slots)
        # the hint, refreshed in place: where each fed key is now (-1, 0: evicted again)
        got = self._fed
        if got is None:  # fed group by group: later groups may have evicted earlier ones
            got = np.fromiter((self._slot.get(k, -1) for k in flows), np.int64, len(flows))
        hint[0][pick] = got
        hint[1][pick] = np.where(got >= 0, self._serial[np.maximum(got, 0)], 0)
        return events

    def locate(self, flow: Hashable) -> tuple[int, int]:
        """(slot, serial) of a tracked flow, (-1, 0) for others: a hint for
        :meth:`feed_bursts`, valid while :meth:`holds` says so."""
        s = self._slot.get(flow)
        return (-1, 0) if s is None else (s, int(self._serial[s]))

    def holds(self, slots: IntArray, serials: IntArray) -> npt.NDArray[np.bool_]:
        """Whether each slot still holds the flow it held when :meth:`locate`
        gave its serial (slots < 0, and serial 0, never do)."""
        ok = (slots >= 0) & (slots < self._cap) & (serials > 0)
        out = np.zeros(slots.size, np.bool_)
        out[ok] = self._serial[slots[ok]] == serials[ok]
        return out

    def feed_groups(self, keys: Sequence[Hashable], times: Sequence[Sequence[float]]) -> list[Event]:
        """Arrivals already grouped by flow: distinct ``keys`` in order of first
        arrival, one sequence of times each. The same as ``feed_many`` on the
        flattened input, without a Python step per arrival to group it again
        (the live agent groups per raw key anyway). Empty groups are ignored."""
        if len(keys) != len(times):
            raise ValueError("keys and times differ in length")
        kept = [(k, ts) for k, ts in zip(keys, times, strict=True) if len(ts)]
        if not kept:
            return []
        ks = [k for k, _ in kept]
        if len(set(ks)) != len(ks):
            raise ValueError("feed_groups needs distinct keys")
        sizes = np.fromiter((len(ts) for _, ts in kept), np.int64, len(kept))
        t = np.fromiter(chain.from_iterable(ts for _, ts in kept), np.float64, int(sizes.sum()))
        return self._feed_groups(ks, np.repeat(np.arange(len(ks)), sizes), t)

    def __contains__(self, flow: object) -> bool:
        return flow in self._slot

    @property
    def late(self) -> int:
        """Late arrivals of the flows tracked now (``sum(v.late for v in table)``)."""
        return int(self._late[self._live].sum())

    def advance(self, now: float) -> list[Event]:
        """The clock reached ``now``: release held arrivals, end stalls whose end
        window has passed, forget flows idle for longer than ``idle_timeout``.

        Every busy flow's watermark rises to ``now - reorder``, recorded once
        here and applied to a flow when it is next looked at (:meth:`_settle_wm`);
        the flows visited are those with held arrivals and, time-driven, those
        whose quiet time has passed (:meth:`_due`): the others would do nothing."""
        v = now - self.reorder
        calls, vals = self._adv_k, self._adv_v
        while vals and vals[-1] <= v:
            calls.pop()
            vals.pop()
        calls.append(self._advances)
        vals.append(v)
        self._advances += 1
        busy = self._due(v)
        tagged: list[_Tagged] = []
        if busy.size:
            self._settle_wm(busy)
            was_stalled = self._in_stall[busy].copy()
            per = self._release_and_process(busy)
            if self._td:
                st = busy[self._in_stall[busy]]
                quiet = self._ring[st, 0] + self.params.w_end
                for s in st[quiet <= self._wm[st]].tolist():
                    per.setdefault(s, []).append(
                        self._end(s, float(self._ring[s, 0] + self.params.w_end),
                                  float(self._wm[s]), float(self._ring[s, -1]))
                    )
            for s, evs in per.items():
                rank = int(self._stamp[s])
                tagged.extend((0.0, rank, k, e) for k, e in enumerate(evs))
            # flows whose stall just ended rejoin the eviction order, least recent first
            calmed = busy[was_stalled & ~self._in_stall[busy]]
            for s in calmed[np.argsort(self._stamp[calmed], kind="stable")].tolist():
                self._clock += 1
                self._calm_stamp[s] = self._clock
            if self._td:
                self._note_quiet(busy)  # due flows still stalling: quiet time and due state again
        tagged.sort(key=lambda x: (x[1], x[2]))
        events = [e for *_, e in tagged]
        events.extend(self._expire(now - self.idle_timeout))
        return events

    def _due(self, v: float) -> IntArray:
        """The busy flows an advance to watermark ``v`` may change (sorted
        slots): those holding arrivals, and (time-driven) the stalling ones
        whose quiet time is at most ``v`` or was at most their own watermark.
        A superset is harmless (advance tests each exactly); every flow the
        full pass over busy flows would change is in it."""
        parts = [self._pend_slot]
        if self._td:
            if self._due_now:
                parts.append(np.fromiter(self._due_now, np.int64, len(self._due_now)))
                self._due_now.clear()
            blocks = np.flatnonzero(self._quiet_minima() <= v)
            if blocks.size:
                got = (blocks[:, None] * _QBLOCK + np.arange(_QBLOCK)).ravel()
                parts.append(got[self._qv[got] <= v])
        cand = np.unique(np.concatenate(parts))
        if not cand.size:
            return cand
        return cand[self._live[cand] & (self._in_stall[cand] | (self._npend[cand] > 0))]  # type: ignore[no-any-return]

    def _settle_wm(self, slots: IntArray) -> None:
        """Apply to ``slots`` the watermark raises of the advances since they were
        last looked at, for those busy meanwhile (a slot's busy state changes
        only while it is looked at, so it is still what it was then)."""
        if not slots.size:
            return
        fr = self._wm_from[slots]
        lag = fr < self._advances
        if lag.any():
            s, f = slots[lag], fr[lag]
            busy = self._in_stall[s] | (self._npend[s] > 0)
            s, f = s[busy], f[busy]
            if s.size:
                vals = self._adv_v
                # one raise on the stack (the clock only moved forward): the largest of all
                raised = (vals[0] if len(vals) == 1
                          else np.asarray(vals)[np.searchsorted(np.asarray(self._adv_k), f)])
                self._wm[s] = np.maximum(self._wm[s], raised)
        self._wm_from[slots] = self._advances

    def _quiet_minima(self) -> FloatArray:
        """Each block's earliest quiet time, the blocks changed since brought up to date."""
        d = np.flatnonzero(self._bdirty)
        if d.size:
            self._bmin[d] = self._qv.reshape(-1, _QBLOCK)[d].min(axis=1)
            self._bdirty[d] = False
        return self._bmin

    def _note_quiet(self, slots: IntArray) -> None:
        """Time-driven ends, after ``slots`` were processed (their watermarks
        settled): the quiet times of those that stall, and those whose quiet
        time has passed their watermark into ``_due_now``."""
        st = slots[self._in_stall[slots]]
        if not st.size:
            return
        q = self._ring[st, 0] + self.params.w_end
        self._qv[st] = q
        self._bdirty[st // _QBLOCK] = True
        due = q <= self._wm[st]
        if due.any():
            self._due_now.update(st[due].tolist())

    def next_deadline(self) -> float | None:
        """The earliest clock time at which :meth:`advance` may emit an event or
        forget a flow, or None when nothing is due without a new arrival."""
        dues: list[float] = []
        if self._pend_t.size:
            dues.append(float(self._pend_t.min()) + self.reorder)
        if self._td:
            m = self._quiet_minima().min() if self._bmin.size else np.inf
            if m < np.inf:
                dues.append(float(m) + self.reorder)
        oldest = self._oldest()
        if oldest is not None and not np.isnan(self._last_seen[oldest]):
            dues.append(float(self._last_seen[oldest]) + self.idle_timeout)
        return min(dues) if dues else None

    def close(self) -> list[Event]:
        """End of input: close every open stall (flows stay, as in ``FlowTable``)."""
        live = np.flatnonzero(self._live)
        return self._close(live[np.argsort(self._stamp[live], kind="stable")])

    # -- feeding ---------------------------------------------------------------

    def _oldest(self) -> int | None:
        """The least recently fed live flow: the first entry of the feeding log
        still current (entries before it are dropped), not a pass over all flows."""
        lru = self._lru
        while lru:
            slots, stamps = lru[0]
            off = self._lru_off
            if off < slots.size:  # most calls: the entry found last time is still current
                s0 = int(slots[off])
                if self._live[s0] and self._stamp[s0] == stamps[off]:
                    return s0
            width = 16
            while off < slots.size:  # windows growing, so a long stale run costs few steps
                s, t = slots[off:off + width], stamps[off:off + width]
                ok = self._live[s] & (self._stamp[s] == t)
                if ok.any():
                    i = int(np.argmax(ok))
                    self._lru_off = off + i
                    return int(s[i])
                off += s.size
                width *= 4
            lru.pop(0)
            self._lru_len -= slots.size
            self._lru_off = 0
        return None

    def _log_fed(self, slots: IntArray) -> None:
        """Note that ``slots`` were just stamped (for :meth:`_oldest`); a log grown
        past a few entries per flow is rebuilt from the live flows' stamps."""
        self._lru.append((slots.copy(), self._stamp[slots]))
        self._lru_len += slots.size
        if self._lru_len > 4 * len(self._slot) + 4096:
            live = np.flatnonzero(self._live)
            live = live[np.argsort(self._stamp[live], kind="stable")]
            self._lru, self._lru_off, self._lru_len = [(live, self._stamp[live])], 0, live.size

    def _victims(self, need: int, touched: IntArray, groups: int) -> list[int] | None:
        """The flows FlowTable would evict for ``need`` new flows, if they do not
        depend on this batch's feeding (None: feed group by group instead)."""
        calm = np.flatnonzero(self._live & ~self._in_stall)
        if calm.size >= need:
            pick = calm[np.argsort(self._calm_stamp[calm], kind="stable")[:need]]
            if not np.isin(pick, touched).any():
                return [int(s) for s in pick]
            return None
        if groups == 1 and calm.size == 0:  # every flow stalls: the least recent of all
            oldest = self._oldest()
            return [oldest] if oldest is not None else None
        return None

    def _feed_groups(
        self, keys: list[Hashable], gid: IntArray, t: FloatArray, by_time: bool = True,
        slots: IntArray | None = None,
    ) -> list[Event]:
        """Arrivals ``t`` of flow ``keys[gid]``; groups in order of first arrival.
        Events by detection time (``feed_many``) or as they came (``feed``: an
        evicted flow's close, then the flow's own). ``slots``: each group's
        slot where the caller knows it (checked with :meth:`holds`), -1 where
        it is to be looked up by key."""
        if t.size and not np.all(np.isfinite(t)):
            raise ValueError("arrival times must be finite numbers")
        if slots is None:
            slot_arr = np.fromiter((self._slot.get(k, -1) for k in keys), np.int64, len(keys))
        else:
            slot_arr = slots.astype(np.int64, copy=True)
            for g in np.flatnonzero(slot_arr < 0).tolist():
                slot_arr[g] = self._slot.get(keys[g], -1)
        new = np.flatnonzero(slot_arr < 0).tolist()
        need = len(self._slot) + len(new) - self.max_flows
        victims: list[int] = []
        if need > 0:
            got = self._victims(need, slot_arr[slot_arr >= 0], len(keys))
            if got is None:
                if len(keys) == 1:
                    raise AssertionError("no flow to evict")  # max_flows >= 1: unreachable
                events = self._feed_one_by_one(keys, gid, t)
                self._fed = None  # after: each group's own call set it to its one slot
                return events
            victims = got
        tagged: list[_Tagged] = []
        # evictions belong to the new flows that need the room, in group order
        evicting = new[len(new) - len(victims):] if victims else []
        for g, v in zip(evicting, victims, strict=True):
            evs = self._close(np.array([v], np.int64))
            self._drop(v)
            self.evicted += 1
            tagged.extend((e.detected_at, g, k, e) for k, e in enumerate(evs))
        if new:
            slot_arr[new] = self._new_slots([keys[g] for g in new])
        self._settle_wm(slot_arr)
        self._stamp[slot_arr] = self._clock + 1 + np.arange(slot_arr.size)
        self._calm_stamp[slot_arr] = self._stamp[slot_arr]
        self._clock += slot_arr.size
        self._log_fed(slot_arr)
        if t.size:
            s_of = slot_arr[gid]
            cnt = np.bincount(gid, minlength=slot_arr.size)
            top = np.full(slot_arr.size, -np.inf)
            np.maximum.at(top, gid, t)
            fed = slot_arr[cnt > 0]
            self._cands[slot_arr] += cnt
            self._max_seen[slot_arr] = np.maximum(self._max_seen[slot_arr], top)
            self._last_seen[fed] = self._max_seen[fed]
            self._wm[fed] = np.maximum(self._wm[fed], self._max_seen[fed] - self.reorder)
            self._pend_slot = np.concatenate((self._pend_slot, s_of))
            self._pend_t = np.concatenate((self._pend_t, t))
            self._npend[slot_arr] += cnt
            per = self._release_and_process(fed)
            if per:
                # each slot's group: slots are distinct, so a search in the sorted slots
                by_slot = np.argsort(slot_arr)
                ps = np.fromiter(per, np.int64, len(per))
                gs = by_slot[np.searchsorted(slot_arr[by_slot], ps)].tolist()
                # one comprehension, not a generator per group: an outage's onset has 50,000
                tagged += [(e.detected_at, g, 1_000_000 + k, e)
                           for g, evs in zip(gs, per.values(), strict=True) for k, e in enumerate(evs)]
        if by_time:
            # (time, group, place) is unique (a group's own events and its victim's are
            # numbered apart), so the tuples sort as their first three: no key function
            # called per event (an outage's onset starts 50,000 stalls within one p)
            tagged.sort()
        else:
            tagged.sort(key=lambda x: (x[1], x[2]))
        self._fed = slot_arr
        return [x[3] for x in tagged]

    def _feed_one_by_one(self, keys: list[Hashable], gid: IntArray, t: FloatArray) -> list[Event]:
        """Evictions that depend on the batch's own feeding: FlowTable's order, one group at a time."""
        order = np.argsort(gid, kind="stable")
        bounds = np.searchsorted(gid[order], np.arange(len(keys) + 1))
        tagged: list[_Tagged] = []
        for g, k in enumerate(keys):
            sel = order[bounds[g]:bounds[g + 1]]
            evs = self._feed_groups([k], np.zeros(sel.size, np.int64), t[sel])
            tagged.extend((e.detected_at, g, i, e) for i, e in enumerate(evs))
        tagged.sort(key=lambda x: (x[0], x[1], x[2]))
        return [e for *_, e in tagged]

    # -- the state machine ---------------------------------------------------

    def _release_and_process(self, slots: IntArray) -> dict[int, list[Event]]:
        """Release the held arrivals of ``slots`` that the watermark passed, and run
        the state machine over them; events per slot, in order."""
        if not self._pend_t.size or not slots.size:
            return {}
        ps, pt = self._pend_slot, self._pend_t
        due = pt <= self._wm[ps]
        mine = np.zeros(self._cap, np.bool_)
        mine[slots] = True
        due &= mine[ps]
        if not due.any():
            return {}
        rs, rt = ps[due], pt[due]
        self._pend_slot, self._pend_t = ps[~due], pt[~due]
        np.subtract.at(self._npend, rs, 1)
        return self._process(rs, rt)

    def _process(self, s_in: IntArray, t_in: FloatArray) -> dict[int, list[Event]]:
        """Arrivals of many flows, each after everything its flow has processed:
        the window tests over all at once, a Python walk only where a stall starts or ends."""
        p, n = self.params, self.params.n
        w_s, w_e = p.w_start, p.w_end
        order = np.lexsort((t_in, s_in))
        s, t = s_in[order], t_in[order]
        us, start, cnt = np.unique(s, return_index=True, return_counts=True)
        seg = np.repeat(np.arange(us.size), cnt)
        # older than what the flow already processed: counted late, placed at its newest
        newest = self._ring[us, -1][seg]
        late = t < newest
        if late.any():
            self._late[us] += np.bincount(seg[late], minlength=us.size)
            t = np.where(late, newest, t)
        # per flow: its last n processed arrivals, then the new ones
        a_start = start + n * np.arange(us.size)
        a = np.empty(t.size + n * us.size)
        pos = np.arange(t.size) + n * (seg + 1)
        a[pos] = t
        ring_pos = (a_start[:, None] + np.arange(n)).ravel()
        a[ring_pos] = self._ring[us].ravel()
        back = a[pos - n + 1]
        start_ok = back > t - w_s
        if self._td:
            # the gap before new arrival q ends a stall iff a[q] >= a[q - n] + w_e
            end_ok = t >= a[pos - n] + w_e
        else:
            end_ok = back <= t - w_e
        has_start = np.logical_or.reduceat(start_ok, start)
        has_end = np.logical_or.reduceat(end_ok, start)
        stalled = self._in_stall[us]
        walk = (stalled & has_end) | (~stalled & has_start)
        quiet_stall = stalled & ~walk
        self._seg_count[us[quiet_stall]] += cnt[quiet_stall]
        a_end = a_start + n + cnt
        self._ring[us] = a[a_end[:, None] - n + np.arange(n)]
        out: dict[int, list[Event]] = {}
        ks = np.flatnonzero(walk)
        started = self._starts_only(ks[~stalled[ks]], us, start, cnt, a, a_start, a_end, pos,
                                    start_ok, end_ok)
        for k, sl in zip(ks.tolist(), us[ks].tolist(), strict=True):
            got = started.get(k)
            out[sl] = [got] if got is not None else self._walk(sl, a[a_start[k]:a_end[k]].tolist())
        if self._td:
            self._note_quiet(us)
        return out

    def _starts_only(
        self, ks: IntArray, us: IntArray, start: IntArray, cnt: IntArray, a: FloatArray,
        a_start: IntArray, a_end: IntArray, pos: IntArray, start_ok: BoolArray, end_ok: BoolArray,
    ) -> dict[int, Event]:
        """:meth:`_walk` as array operations for the flows ``ks`` (not in a stall,
        a window reaching n among their new arrivals) whose stall starts and does
        not end within them: every flow's first stall when an outage starts
        thousands at once (the walks were an eighth of a cProfile of 50,000 flows'
        onset in the live flow view). The same state and
        event as the walk, value for value; flows whose stall also ends here are
        left to the walk (not in the result)."""
        if not ks.size:
            return {}
        n, p = self.params.n, self.params
        seg_end = start[ks] + cnt[ks]
        oks = np.flatnonzero(start_ok)
        q = oks[np.searchsorted(oks, start[ks])]  # each flow's first window reaching n
        ends = np.flatnonzero(end_ok)
        simple = np.searchsorted(ends, seg_end) == np.searchsorted(ends, q, side="right")
        ks, q = ks[simple], q[simple]
        if not ks.size:
            return {}
        s = us[ks]
        gi = pos[q]  # the trigger's place in ``a``
        window = a[gi[:, None] - n + 1 + np.arange(n)]
        first = np.minimum(gi - n + 1 + (window <= self._prev_last[s][:, None]).sum(axis=1), gi)
        t_first, t_trig = a[first], a[gi]
        est = self._est.start(t_first, t_trig, p)  # type: ignore[arg-type]  # elementwise
        prev_end = self._prev_end[s]
        begin = np.where(prev_end > est, prev_end, est)  # max(est, prev_end) as Python's max
        self._in_stall[s] = True
        self._seg_first[s] = t_first
        self._seg_trigger[s] = t_trig
        self._seg_count[s] = a_end[ks] - first
        self._stall_start[s] = begin
        keys = self._key
        return {k: StallStarted(keys[sl], b, t)
                for k, sl, b, t in zip(ks.tolist(), s.tolist(), begin.tolist(), t_trig.tolist(), strict=True)}

    def _walk(self, s: int, a: list[float]) -> list[Event]:
        """StallTracker._process for one flow: ``a`` is its last n processed
        arrivals then the new ones (sorted)."""
        p, n = self.params, self.params.n
        w_s, w_e = p.w_start, p.w_end
        td = self._td
        size = len(a)
        events: list[Event] = []
        pos = count_from = n
        search_from = n - 1 if td else n
        while True:
            if not self._in_stall[s]:
                i = next((i for i in range(pos, size) if a[i - n + 1] > a[i] - w_s), -1)
                if i < 0:
                    break
                prev_last = float(self._prev_last[s])
                first_i = i - n + 1 + sum(1 for x in a[i - n + 1:i + 1] if x <= prev_last)
                first_i = min(first_i, i)
                self._in_stall[s] = True
                self._seg_first[s] = a[first_i]
                self._seg_trigger[s] = a[i]
                self._seg_count[s] = i - first_i + 1
                begin = max(self._est.start(a[first_i], a[i], p), float(self._prev_end[s]))
                self._stall_start[s] = begin
                events.append(StallStarted(self._key[s], begin, a[i]))
                count_from = i + 1
                search_from = i if td else i + 1
            if td:
                j = next((j for j in range(search_from, size - 1) if a[j + 1] >= a[j - n + 1] + w_e), -1)
            else:
                j = next((j for j in range(search_from, size) if a[j - n + 1] <= a[j] - w_e), -1)
            if j < 0:
                self._seg_count[s] += size - count_from
                break
            if td:
                self._seg_count[s] += j + 1 - count_from
                events.append(self._end(s, a[j - n + 1] + w_e, a[j + 1], a[j]))
                pos = j + 1
            else:
                self._seg_count[s] += j - count_from
                events.append(self._end(s, a[j], a[j], a[j - 1]))
                pos = j
            count_from = pos
        return events

    def _end(self, s: int, quiet: float | None, detected: float, last: float,
             truncated: bool = False) -> StallEnded:
        seg = Segment(float(self._seg_first[s]), float(self._seg_trigger[s]), last,
                      int(self._seg_count[s]), quiet)
        start, end = self._est.finish(seg, self.params)
        start = max(start, float(self._prev_end[s]))
        end = max(end, start)
        self._prev_end[s] = end
        self._in_stall[s] = False
        self._qv[s] = np.inf
        self._bdirty[s // _QBLOCK] = True
        self._prev_last[s] = last
        self._stalls[s] += 1
        self._stall_start[s] = np.nan
        self._last_dur[s] = end - start
        return StallEnded(self._key[s], start, end, detected, seg.count, truncated, quiet)

    def _close(self, slots: IntArray) -> list[Event]:
        """StallTracker.close for ``slots``, events slot by slot in that order."""
        if not slots.size:
            return []
        self._settle_wm(slots)
        self._wm[slots] = np.inf
        per = self._release_and_process(slots)
        events: list[Event] = []
        for s in slots.tolist():
            events.extend(per.get(s, []))
            if self._in_stall[s]:
                last = float(self._ring[s, -1])
                if self._td:
                    quiet = float(self._ring[s, 0] + self.params.w_end)
                    events.append(self._end(s, quiet, quiet, last, truncated=True))
                else:
                    events.append(self._end(s, None, last, last, truncated=True))
        return events

    def _expire(self, horizon: float) -> list[Event]:
        """Forget flows, least recently fed first, while idle beyond the horizon."""
        oldest = self._oldest()
        if oldest is None or not self._last_seen[oldest] < horizon:
            return []
        live = np.flatnonzero(self._live)
        lru = live[np.argsort(self._stamp[live], kind="stable")]
        keep = ~(self._last_seen[lru] < horizon)  # NaN (never fed) stops it, like None
        stop = int(np.argmax(keep)) if keep.any() else lru.size
        gone = lru[:stop]
        events = self._close(gone)
        for s in gone.tolist():
            self._drop(s)
        self.expired += int(gone.size)
        return events
