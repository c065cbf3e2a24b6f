"""Burst records in, the same stalls out: feeding the engine the data plane's
burst records gives the same events at the same times as feeding the
candidates they came from, in every estimator and flow table; the Python
twin of the kernel's grouping (engine/bursts.py) agrees with itself (vectorised
and slot by slot); and the user-space burst taker passes every candidate on
exactly once whether it comes from the ring or from the mapped table.

The kernel's grouping itself is held to the twin in tests/test_burst_kernel.py.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iqn_ctl.engine.bursts import GAP_NS, burst_cap, group, group_seconds, group_slots
from iqn_ctl.engine.estimators import ESTIMATORS
from iqn_ctl.engine.flowtable import FlowTable
from iqn_ctl.engine.params import BURST_MAX, SignalParams
from iqn_ctl.engine.tracker import StallTracker
from iqn_ctl.engine.vector import VectorFlowTable
from iqn_ctl.live.bursttable import BurstTaker, open_at_places
from iqn_ctl.live.layout import BURST_DTYPE

MS = 1_000_000
T0 = 5_000_000_000_000  # a CLOCK_MONOTONIC-like origin (ns)


@st.composite
def signals(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """Candidates of up to 4 flows: bursts of 1..6 candidates, a few ms or
    exactly the gap apart inside, bursts 0.05..1.2 s apart: signals, cut
    bursts, stalls that end and restart. (flow, t_ns, n)."""
    n = draw(st.integers(1, 6))
    flows, times = [], []
    for f in range(draw(st.integers(1, 4))):
        t = T0 + draw(st.integers(0, 400)) * MS
        for _ in range(draw(st.integers(1, 14))):
            for _ in range(draw(st.integers(1, 6))):
                flows.append(f)
                times.append(t)
                t += draw(st.sampled_from([0, 1, 137_000, MS, 3 * MS, GAP_NS, GAP_NS + 1, 6 * MS]))
            t += draw(st.integers(50, 1200)) * MS
    return np.array(flows, np.int64), np.array(times, np.int64), n


def _polls(f: np.ndarray, t: np.ndarray, n: int, k: int):
    """The input as ``k`` polls: (raw flows, raw times in s, bursts) each, a
    burst never split between polls, as the agent reads them. The raw side is
    the original candidates (each placed in its burst's poll), not the bursts'
    own expansion."""
    b = group(f, t, n)
    poll_of = np.empty(len(b), np.int64)
    for j, chunk in enumerate(np.array_split(np.arange(len(b)), k)):
        poll_of[chunk] = j
    # each original candidate's burst: a flow's candidates in time order fill its
    # bursts in time order (by rank, not by time: two candidates at the same
    # instant may fall in two bursts)
    by_flow = np.lexsort((b.first, b.flow))
    owner = np.empty(t.size, np.int64)
    owner[np.lexsort((t, f))] = np.repeat(by_flow, b.count[by_flow])
    assert (b.flow[owner] == f).all()
    for j in range(k):
        sel = np.flatnonzero(poll_of == j)
        if not sel.size:
            continue
        mine = poll_of[owner] == j
        ff, tt = f[mine], t[mine]
        o = np.lexsort((ff, tt))
        yield ff[o], tt[o] / 1e9, b.select(sel)


@settings(max_examples=150, deadline=None)
@given(signals(), st.integers(1, 4), st.sampled_from(sorted(ESTIMATORS)), st.sampled_from([0.0, 0.005]))
def test_tables_fed_bursts_equal_tables_fed_candidates(
    sig: tuple[np.ndarray, np.ndarray, int], k: int, est: str, reorder: float
) -> None:
    f, t, n = sig
    prm = SignalParams(0.2, n)
    keys = [f"flow{i}" for i in range(4)]
    for make in (VectorFlowTable, FlowTable):
        raw, bur = make(prm, est, reorder=reorder), make(prm, est, reorder=reorder)
        got_raw, got_bur = [], []
        for ff, tt, bb in _polls(f, t, n, k):
            got_raw += raw.feed_many([keys[i] for i in ff.tolist()], tt)
            got_bur += bur.feed_bursts(keys, bb)
            now = float(tt.max()) + 0.003
            got_raw += raw.advance(now)
            got_bur += bur.advance(now)
        got_raw += raw.close()
        got_bur += bur.close()
        if make is FlowTable:
            # FlowTable.advance visits its busy flows in a set's order, which depends on the
            # insertion history: equal as multisets, in order within each flow
            def canon(evs: list) -> list:  # type: ignore[type-arg]
                return sorted(evs, key=lambda e: (str(e.flow), e.detected_at, type(e).__name__, e.start))

            assert canon(got_bur) == canon(got_raw), make.__name__
        else:
            assert got_bur == got_raw, make.__name__
        assert sum(v.candidates for v in bur) == t.size


@settings(max_examples=100, deadline=None)
@given(signals(), st.sampled_from(sorted(ESTIMATORS)))
def test_tracker_fed_bursts_equals_tracker_fed_candidates(
    sig: tuple[np.ndarray, np.ndarray, int], est: str
) -> None:
    f, t, n = sig
    one = f == 0
    prm = SignalParams(0.2, n)
    a, b = StallTracker(prm, est), StallTracker(prm, est)
    assert b.feed_bursts(group(f[one], t[one], n)) + b.close() == a.feed(np.sort(t[one]) / 1e9) + a.close()


@settings(max_examples=150, deadline=None)
@given(signals())
def test_grouping_rule_and_the_slot_twin_agree(sig: tuple[np.ndarray, np.ndarray, int]) -> None:
    """Every candidate in exactly one burst; a burst holds at most min(n,
    BURST_MAX) of one flow, each within the gap of the one before, and the
    next candidate of its flow is either beyond the gap or the burst is full.
    With a slot of its own per flow, the kernel-order twin builds the same."""
    f, t, n = sig
    b = group(f, t, n)
    cap = burst_cap(n)
    assert int(b.count.sum()) == t.size and (b.count >= 1).all() and (b.count <= cap).all()
    bid, tt = b.candidates()
    assert sorted(zip(b.flow[bid].tolist(), tt.tolist(), strict=True)) == sorted(
        zip(f.tolist(), t.tolist(), strict=True))
    for i in range(len(b)):
        c = int(b.count[i])
        assert (np.diff(b.off[i, :c]) <= GAP_NS).all() and (np.diff(b.off[i, :c]) >= 0).all()
    # a burst that is not full ends because its flow's next candidate came after the gap
    order = np.lexsort((b.first, b.flow))
    for x, y in zip(order[:-1], order[1:], strict=True):
        if b.flow[x] == b.flow[y] and b.count[x] < cap:
            assert b.first[y] - b.last[x] > GAP_NS
    o = np.lexsort((t, f))  # a flow's candidates in time order, flows one after another
    twin, slots = group_slots(f[o].tolist(), t[o].tolist(), f[o].tolist(), n)
    assert sorted(zip(twin.flow.tolist(), twin.first.tolist(), twin.count.tolist(), strict=True)) == sorted(
        zip(b.flow.tolist(), b.first.tolist(), b.count.tolist(), strict=True))
    assert len(slots) == len(twin)


def test_a_colliding_flow_closes_the_open_burst_of_its_slot() -> None:
    b, slots = group_slots([0, 0, 1, 0, 0], [0, 10, 20, 30, 40], [7, 7, 7, 7, 7], 4)
    assert b.count.tolist() == [2, 1, 2] and b.flow.tolist() == [0, 1, 0] and slots == [7, 7, 7]


def test_capture_times_in_seconds_become_kernel_like_ns() -> None:
    t = np.array([1.7e9 + 0.1, 1.7e9 + 0.1015, 1.7e9 + 0.9])
    b = group_seconds(np.zeros(3, np.int64), t, 4)
    assert b.count.tolist() == [2, 1] and b.origin == np.floor(t.min())
    assert np.allclose(b.seconds(), t, rtol=0, atol=1e-6)


# -- the user-space taker: ring records and open slots, each candidate once ---------


def _table(rows: int) -> np.ndarray:
    return np.zeros(rows, BURST_DTYPE)


def _put(tab: np.ndarray, slot: int, gen: int, first: int, offs: list[int]) -> None:
    r = tab[slot]
    r["key"] = bytes([slot]) * 40
    r["first_ns"], r["last_ns"], r["count"] = first, first + offs[-1], len(offs)
    r["slot"], r["gen"], r["lock"] = slot, gen, 2 * gen
    o = np.zeros(BURST_MAX, np.uint32)
    o[: len(offs)] = offs
    r["off"] = o


def _times(batch) -> list[int]:
    return sorted(batch.times_ns()[1].tolist())


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.data())
def test_a_due_bursts_other_slices_are_found_alike_by_sort_and_by_mask(ncpu: int, per: int, data) -> None:
    """``open_at_places``: the open rows at a due row's place in every CPU's slice,
    sorted, whether it sorts (few due rows) or masks the table (many)."""
    rows = ncpu * per
    due = np.asarray(sorted(data.draw(st.sets(st.integers(0, rows - 1), max_size=rows))), np.int64)
    is_open = np.asarray(data.draw(st.lists(st.booleans(), min_size=rows, max_size=rows)), np.bool_)
    places = {int(d) % per + k * per for d in due for k in range(ncpu)}
    want = sorted(places & set(np.flatnonzero(is_open).tolist()))
    assert open_at_places(due, per, is_open).tolist() == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63) | st.just(10**6), st.integers(1, 6), st.integers(1, 4)),
                min_size=1, max_size=300))
def test_taker_notes_each_slots_last_record_alike_by_sort_and_by_scatter(
        recs: list[tuple[int, int, int]]) -> None:
    """``BurstTaker._note`` finds each slot's last record of a poll with a sort for a
    small batch and with a scatter for a large one (records x 8 >= table rows): both
    note the same bursts, and each slot's is its last record's (slot 10**6: out of
    the table, ignored)."""
    arr = np.zeros(len(recs), BURST_DTYPE)
    arr["slot"], arr["gen"], arr["count"] = zip(*recs, strict=True)

    def note(rows: int) -> tuple[np.ndarray, np.ndarray]:
        tk = BurstTaker(_table(rows), GAP_NS)
        tk._note(arr)
        return tk.taken_gen[:64].copy(), tk.taken_cnt[:64].copy()

    sorted_gen, sorted_cnt = note(4096)  # 300 records x 8 < 4096: always the sort
    gen, cnt = note(64)  # 8 records or more: the scatter
    assert (gen == sorted_gen).all() and (cnt == sorted_cnt).all()
    last = {s: (g, c) for s, g, c in recs}
    for s in range(1, 64):  # (slot 0 shares its index with the out-of-table records)
        assert (int(gen[s, 0]), int(cnt[s, 0])) == last.get(s, (0, 0)), s


def test_taker_sweeps_a_short_burst_once_and_only_the_new_tail_of_its_record() -> None:
    tab = _table(4)
    tk = BurstTaker(tab, GAP_NS)
    _put(tab, 2, 1, 1_000 * MS, [0, MS])
    # gap not over yet: nothing taken
    assert len(tk.take(tab[:0].copy(), 1_000 * MS + 2 * MS)) == 0
    got = tk.take(tab[:0].copy(), 1_000 * MS + GAP_NS + 3 * MS)
    assert _times(got) == [1_000 * MS, 1_001 * MS]
    # swept again: nothing new
    assert len(tk.take(tab[:0].copy(), 2_000 * MS)) == 0
    # the kernel extends the same burst after all (a stamp that raced the sweep) and emits it
    _put(tab, 2, 1, 1_000 * MS, [0, MS, 2 * MS])
    rec = tab[2:3].copy()
    tab[2]["count"] = 0
    got = tk.take(rec, 2_000 * MS)
    assert _times(got) == [1_002 * MS]
    # the slot's next burst (gen 2) arrives whole through the ring
    _put(tab, 2, 2, 3_000 * MS, [0, 1, 2, 3])
    rec = tab[2:3].copy()
    tab[2]["count"] = 0
    assert _times(tk.take(rec, 3_000 * MS)) == [3_000 * MS + i for i in range(4)]


def test_taker_passes_a_burst_once_when_its_record_and_its_open_slot_show_in_one_poll() -> None:
    """The kernel writes a burst's record, then zeroes the slot's count: a poll
    that reads the record and sweeps the table in between sees the burst
    twice (the live --key client test once counted a candidate twice)."""
    tab = _table(2)
    tk = BurstTaker(tab, GAP_NS)
    _put(tab, 1, 5, 10 * MS, [0, MS])
    rec = tab[1:2].copy()  # written to the ring; count not zeroed yet
    assert _times(tk.take(rec, 10_000 * MS)) == [10 * MS, 11 * MS]
    tab[1]["count"] = 0
    assert len(tk.take(tab[:0].copy(), 20_000 * MS)) == 0


def test_taker_remembers_a_slots_previous_burst() -> None:
    """A record of a slot's swept burst, read after the slot moved on (a record
    held up behind another CPU's: the ring is not drained), is still
    recognised; the slot's next burst is swept once the first one's fate is
    known (its record read), so the lost count stays exact."""
    tab = _table(2)
    tk = BurstTaker(tab, GAP_NS)
    _put(tab, 0, 1, 10 * MS, [0])
    old = tab[0:1].copy()
    assert _times(tk.take(tab[:0].copy(), 100 * MS)) == [10 * MS]  # swept
    _put(tab, 0, 2, 200 * MS, [0])
    assert len(tk.take(tab[:0].copy(), 300 * MS, drained=False)) == 0  # the first one's record may come
    assert _times(tk.take(old, 400 * MS)) == [200 * MS]  # it came, late: nothing again; the next one swept
    assert tk.overcounted == 0


def test_taker_counts_a_swept_burst_once_however_late_its_record_comes() -> None:
    """A slot's records can wait in the ring behind another CPU's record still being
    written, while the slot moves on and its next bursts are swept. The taker
    remembers two bursts a slot; a third swept before the late record is read
    used to push the first out, and its record then passed its candidates on a
    second time (the agent fed 158 candidates more than the kernel counted in an
    overloaded bench). A slot is now swept at most one burst ahead of its records,
    and a late record never pushes a newer burst out of the memory."""
    tab = _table(2)
    tk = BurstTaker(tab, GAP_NS)
    recs = []
    got = []
    for gen in (1, 2, 3, 4):
        _put(tab, 0, gen, gen * 1_000 * MS, [0, MS])
        recs.append(tab[0:1].copy())  # its record, when the slot moves on: held up in the ring
        got += _times(tk.take(tab[:0].copy(), gen * 1_000 * MS + 500 * MS, drained=False))
    # the first was swept; the others wait for the ring (the first one's record may come)
    assert got == [1_000 * MS, 1_001 * MS]
    seen = list(got)
    for rec in recs[:3]:  # the held-up records arrive, oldest first; the slot's 4th burst is open
        seen += _times(tk.take(rec, 9_000 * MS, drained=False))
    seen += _times(tk.take(recs[3], 10_000 * MS))
    assert sorted(seen) == sorted(g * 1_000 * MS + d for g in (1, 2, 3, 4) for d in (0, MS))


def test_taker_counts_what_it_swept_from_a_burst_whose_record_the_ring_dropped() -> None:
    """The kernel counts all of a record's candidates lost when the ring has no
    room for it, also those the taker had already swept from the table: those
    reached the engine. The taker finds them out (``overcounted``) once the
    burst's fate shows, whichever way it shows."""
    # 1. the slot moved on and the ring, read to its end, never brought the record
    tab = _table(2)
    tk = BurstTaker(tab, GAP_NS)
    _put(tab, 0, 1, 10 * MS, [0, MS])
    assert _times(tk.take(tab[:0].copy(), 100 * MS)) == [10 * MS, 11 * MS]
    assert tk.unsettled_written() == 0  # not written out yet: the kernel has counted nothing
    _put(tab, 0, 2, 200 * MS, [0])  # the kernel wrote burst 1 out (no room) and opened burst 2
    assert tk.unsettled_written() == 2  # maybe counted lost: subtracted until its fate shows
    assert len(tk.take(tab[:0].copy(), 300 * MS)) == 0  # burst 2 waits: burst 1's record may be on its way
    assert tk.overcounted == 0
    assert _times(tk.take(tab[:0].copy(), 400 * MS)) == [200 * MS]  # drained: not written
    assert (tk.overcounted, tk.unsettled_written()) == (2, 0)
    # 2. a later record of the slot arrives instead of its own
    tab = _table(2)
    tk = BurstTaker(tab, GAP_NS)
    _put(tab, 1, 7, 10 * MS, [0])
    assert _times(tk.take(tab[:0].copy(), 100 * MS)) == [10 * MS]
    _put(tab, 1, 8, 150 * MS, [0, 1, 2, 3])
    rec = tab[1:2].copy()
    tab[1]["count"] = 0
    assert _times(tk.take(rec, 160 * MS, drained=False)) == [150 * MS + i for i in range(4)]
    assert tk.overcounted == 1
    # 3. the swept burst grew (a stamp racing the sweep) and its full record found no room:
    #    the slot's count is zeroed, its generation unchanged
    tab = _table(2)
    tk = BurstTaker(tab, GAP_NS)
    _put(tab, 0, 3, 10 * MS, [0, MS])
    assert tk.take(tab[:0].copy(), 100 * MS).candidates == 2
    _put(tab, 0, 3, 10 * MS, [0, MS, 2 * MS, 3 * MS])
    tab[0]["count"] = 0
    assert len(tk.take(tab[:0].copy(), 200 * MS)) == 0  # seen written out
    assert len(tk.take(tab[:0].copy(), 300 * MS)) == 0
    assert tk.overcounted == 2  # the kernel counted 4 lost: 2 of them were passed on
    # 4. its own record arrives: nothing over-counted
    tab = _table(2)
    tk = BurstTaker(tab, GAP_NS)
    _put(tab, 0, 1, 10 * MS, [0])
    assert tk.take(tab[:0].copy(), 100 * MS).candidates == 1
    _put(tab, 0, 1, 10 * MS, [0, 2 * MS])
    rec = tab[0:1].copy()
    tab[0]["count"] = 0
    assert _times(tk.take(rec, 200 * MS)) == [12 * MS]
    assert len(tk.take(tab[:0].copy(), 300 * MS)) == 0
    assert (tk.overcounted, tk.unsettled_written()) == (0, 0)


class _KernelTwin:
    """iqn_xdp.c's burst table and ring, one CPU, in Python: ``burst_add`` and
    ``burst_emit`` on the same rows the taker reads, a ring of ``room``
    records that counts a record's candidates lost when it is full."""

    def __init__(self, rows: int, n: int, room: int) -> None:
        self.tab, self.n, self.room = _table(rows), n, room
        self.ring: list[np.ndarray] = []
        self.lost = 0

    def emit(self, row: int) -> None:
        b = self.tab[row]
        if len(self.ring) < self.room:
            self.ring.append(self.tab[row:row + 1].copy())
        else:
            self.lost += int(b["count"])
        b["count"] = 0

    def add(self, flow: int, now: int) -> None:
        row = flow % self.tab.shape[0]
        b = self.tab[row]
        key = bytes([flow + 1]) * 40
        c = int(b["count"])
        if c:
            if (c < self.n and c < BURST_MAX and now - int(b["last_ns"]) <= GAP_NS
                    and b["key"].tobytes() == key):
                b["off"][c] = now - int(b["first_ns"])
                b["last_ns"], b["count"] = now, c + 1
                if c + 1 >= self.n:
                    self.emit(row)
                return
            self.emit(row)
        b["key"], b["first_ns"], b["last_ns"] = key, now, now
        b["off"] = np.zeros(BURST_MAX, np.uint32)
        b["slot"], b["gen"], b["count"] = row, int(b["gen"]) + 1, 1
        b["lock"] += 2
        if self.n <= 1:
            self.emit(row)

    def read(self, k: int) -> tuple[np.ndarray, bool]:
        got, self.ring = self.ring[:k], self.ring[k:]
        return (np.concatenate(got) if got else self.tab[:0].copy()), not self.ring


@settings(max_examples=80, deadline=None)
@given(signals(), st.integers(1, 3), st.integers(1, 4),
       st.lists(st.tuples(st.integers(0, 400), st.integers(0, 3)), max_size=30))
def test_taker_and_a_full_ring_account_for_every_candidate_exactly(
    sig: tuple[np.ndarray, np.ndarray, int], rows: int, room: int, polls: list[tuple[int, int]],
) -> None:
    """Candidates of colliding flows through the kernel twin with a small ring,
    polls at random moments reading some or all of the ring: every candidate
    is passed on at most once, and passed on + (the kernel's lost count -
    ``overcounted`` - ``unsettled_written``) = all candidates, at the end and
    never above it on the way (the agent's lost counter only ever rises)."""
    f, t, n = sig
    order = np.argsort(t, kind="stable")
    f, t = f[order], t[order]
    k = _KernelTwin(rows, n, room)
    tk = BurstTaker(k.tab, GAP_NS)
    at = {i % max(len(t), 1): r for i, r in polls}
    fed: list[int] = []

    def poll(now: int, take: int, sent: int) -> None:
        recs, drained = k.read(take)
        fed.extend(tk.take(recs, now, drained).times_ns()[1].tolist())
        lost = k.lost - tk.unsettled_written() - tk.overcounted
        assert len(fed) + lost <= sent

    for i, (ff, tt) in enumerate(zip(f.tolist(), t.tolist(), strict=True)):
        k.add(ff, tt)
        if i in at:
            poll(tt + MS, at[i] or 1_000_000, i + 1)
    end = int(t.max()) + 10 * GAP_NS
    for j in range(4):
        poll(end + j * GAP_NS, 1_000_000, len(t))
    # nothing passed on twice (or made up): the candidates passed on are some of those sent
    assert not (collections.Counter(fed) - collections.Counter(t.tolist()))
    assert len(fed) + k.lost - tk.overcounted - tk.unsettled_written() == len(t)


def test_taker_sweeps_a_slot_whose_records_were_lost_once_the_ring_is_drained() -> None:
    """A full ring drops records (counted lost): the slot's older generations never
    come. Once the ring is found empty, its open burst is swept all the same."""
    tab = _table(2)
    tk = BurstTaker(tab, GAP_NS)
    _put(tab, 0, 5000, 1_000 * MS, [0])  # 4,999 bursts before it, their records lost
    assert len(tk.take(tab[:0].copy(), 2_000 * MS, drained=False)) == 0  # records may still come
    assert _times(tk.take(tab[:0].copy(), 2_000 * MS)) == [1_000 * MS]  # the ring is empty: taken


def test_taker_leaves_a_burst_begun_after_the_ring_read_while_its_predecessor_may_be_unread() -> None:
    """The kernel writes a slot's burst to the ring, then begins the next one. A
    reader descheduled between its ring read and its look at the table (more
    than the gap, on a loaded box) finds the next burst due, while the first
    one's record waits unread in the ring: taking it would put its candidates
    before older ones (test_ringbuf saw a 9 ms step back). Such a burst waits
    for a poll whose ring read began after it; one whose predecessor's record
    was read goes at once."""
    tab = _table(2)
    tk = BurstTaker(tab, GAP_NS)
    _put(tab, 0, 8, 1_000 * MS, [0, MS])  # begun at 1,000 ms; burst 7's record not read
    assert len(tk.take(tab[:0].copy(), 1_100 * MS, read_ns=999 * MS)) == 0
    assert _times(tk.take(tab[:0].copy(), 1_200 * MS, read_ns=1_150 * MS)) == [1_000 * MS, 1_001 * MS]
    tab = _table(2)
    tk = BurstTaker(tab, GAP_NS)
    _put(tab, 0, 7, 900 * MS, [0, 1, 2, 3])
    rec = tab[0:1].copy()
    _put(tab, 0, 8, 1_000 * MS, [0])
    assert tk.take(rec, 1_100 * MS, read_ns=999 * MS).candidates == 5  # burst 7's record read: 8 follows


def test_taker_skips_a_slot_the_kernel_is_writing() -> None:
    tab = _table(2)
    tk = BurstTaker(tab, GAP_NS)
    _put(tab, 1, 1, 10 * MS, [0])
    tab[1]["lock"] += 1  # odd: mid-write
    assert len(tk.take(tab[:0].copy(), 10_000 * MS)) == 0
    tab[1]["lock"] += 1
    assert _times(tk.take(tab[:0].copy(), 10_000 * MS)) == [10 * MS]


def test_taker_takes_a_flows_open_bursts_on_other_cpus_with_its_due_one() -> None:
    """One flow's candidates alternate between two CPUs: each CPU's slice holds
    an open burst of it, interleaved in time. When the first one's gap has
    passed, the other is taken in the same poll (not a poll later, when its
    earlier candidates would reach the engine late); another flow's open
    burst waits for its own gap."""
    tab = _table(8)  # 2 CPUs x 4 slots
    tk = BurstTaker(tab, GAP_NS)
    _put(tab, 1, 1, 1_000 * MS, [0, 2 * MS])  # CPU 0: t1, t3
    _put(tab, 5, 1, 1_001 * MS, [0, 2 * MS])  # CPU 1: t2, t4
    tab[5]["key"] = tab[1]["key"]
    _put(tab, 6, 1, 1_003 * MS, [0])  # another flow, as recent as t4
    now = 1_002 * MS + GAP_NS + 1_500_000  # row 1's gap (+ margin) over, row 5's not yet
    got = tk.take(tab[:0].copy(), now)
    assert _times(got) == [1_000 * MS, 1_001 * MS, 1_002 * MS, 1_003 * MS]
    assert _times(tk.take(tab[:0].copy(), 10_000 * MS)) == [1_003 * MS]  # the other flow, later


def _raw(server: int, port: int) -> bytes:
    return (bytes([198, 18, 0, server]) + bytes(12) + bytes([198, 18, 1, 2]) + bytes(12)
            + (443).to_bytes(2, "big") + port.to_bytes(2, "big") + bytes([4, 17, 0, 0]))


@settings(max_examples=60, deadline=None)
@given(signals(), st.integers(1, 3), st.sampled_from([0.0, 1.0, 2.0]))
def test_live_flows_fed_burst_records_equal_live_flows_fed_candidates(
    sig: tuple[np.ndarray, np.ndarray, int], k: int, rate: float
) -> None:
    """The agent's input path: LiveFlows.ingest_bursts (raw kernel keys, the
    per-source limit refusing some new flows) against ingest of the same
    candidates one tuple each: same events, counters and refusals."""
    from iqn_ctl.live.bursttable import BurstBatch
    from iqn_ctl.live.flows import LiveFlows

    f, t, n = sig
    raws = [_raw(1 + i % 2, 40000 + i) for i in range(4)]
    prm = SignalParams(0.2, n)
    a = LiveFlows(prm, reorder=0.0, source_rate=rate)
    b = LiveFlows(prm, reorder=0.0, source_rate=rate)
    got_a, got_b = [], []
    for ff, tt, bb in _polls(f, t, n, k):
        got_a += a.ingest([(raws[i], x, 1250) for i, x in zip(ff.tolist(), tt.tolist(), strict=True)])
        got_b += b.ingest_bursts(BurstBatch([raws[i] for i in bb.flow.tolist()], bb.first, bb.count, bb.off))
        now = float(tt.max()) + 0.003
        got_a += a.advance(now)
        got_b += b.advance(now)
    assert got_b + b.close() == got_a + a.close()
    assert (b.events_in, b.refused, b.refused_events) == (a.events_in, a.refused, a.refused_events)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.sampled_from([1, 2, 4]),
       st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 20)), max_size=16),
       st.lists(st.integers(0, 40), min_size=1, max_size=4))
def test_taker_sliced_per_cpu_takes_what_a_look_at_every_row_takes(
    ncpu: int, per: int, bursts: list[tuple[int, int, int]], polls: list[int],
) -> None:
    """Told the kernel's slicing (row cpu * slots + hash), the taker looks for a
    due burst's flow only at its place in the other CPUs' slices; on tables laid
    out that way (a key always at one place in a slice, two flows sharing it
    now and then) it takes the same bursts, poll by poll, as when it looks at
    every open row."""
    tab = _table(ncpu * per)
    for cpu, variant, at in bursts:
        row = (cpu % ncpu) * per + at % per
        _put(tab, row, 1, 1_000 * MS + at * MS, [0, MS])
        tab[row]["key"] = bytes([at % per, variant]) * 20  # a key is always at one place
    sliced, flat = BurstTaker(tab.copy(), GAP_NS, per), BurstTaker(tab.copy(), GAP_NS)
    now = 1_000 * MS
    for dt in sorted(polls):
        t = now + dt * MS + GAP_NS
        assert _times(sliced.take(tab[:0].copy(), t)) == _times(flat.take(tab[:0].copy(), t))
    with pytest.raises(ValueError):
        BurstTaker(_table(6), GAP_NS, 4)


def _records_per_burst(flows: int, slots: int, seconds: float = 0.6) -> float:
    """Records the kernel's grouping (the twin, slot by slot) writes per burst
    sent when ``flows`` flows all signal at once on one CPU (a veth's traffic):
    a burst of 4, 2 ms apart, every 0.2 s per flow from a random phase,
    interleaved in time as bench/bench_scale.py's sender sends them."""
    from iqn_ctl.live.layout import flow_hashes

    rng = np.random.default_rng(flows)
    raws = [bytes(rng.integers(0, 256, 36, np.uint8)) + bytes([4, 17, 0, 0]) for _ in range(flows)]
    slot = (flow_hashes(raws) & np.uint64(slots - 1)).astype(np.int64)
    bursts = int(seconds / 0.2)
    start = rng.integers(0, 200 * MS, flows)[:, None, None] + 200 * MS * np.arange(bursts)[None, :, None]
    t = (start + 2 * MS * np.arange(4)[None, None, :]).ravel()
    flow = np.repeat(np.arange(flows), bursts * 4)
    o = np.argsort(t, kind="stable")
    got, _ = group_slots(flow[o].tolist(), t[o].tolist(), slot[flow[o]].tolist(), 4)
    return len(got.count) / (flows * bursts)


def test_default_burst_table_keeps_an_outages_bursts_whole() -> None:
    """Why the data plane's burst table is 16,384 slots, not 1,024 per CPU
    (datapath.default_burst_slots): another flow's candidate on an open
    burst's slot writes that burst out early, and at outage scale that
    multiplied the records the agent handles per burst (bench_scale, 10,000
    stalling flows on one CPU: 1.95 records per burst with 1,024 slots)."""
    from iqn_ctl.live.datapath import BURST_SLOTS, BURST_SLOTS_TOTAL, default_burst_slots

    per = {n: default_burst_slots(n) for n in (1, 2, 3, 4, 8, 16, 64, 256)}
    assert all(p & (p - 1) == 0 and BURST_SLOTS <= p <= BURST_SLOTS_TOTAL for p in per.values())
    assert [n * per[n] for n in (1, 2, 4, 8, 16)] == [BURST_SLOTS_TOTAL] * 5  # shared out
    assert 3 * per[3] <= BURST_SLOTS_TOTAL
    assert per[64] == per[256] == BURST_SLOTS  # never fewer than before
    few, many = _records_per_burst(10_000, BURST_SLOTS), _records_per_burst(10_000, default_burst_slots(2))
    assert few > 1.5
    assert many < 1.2
