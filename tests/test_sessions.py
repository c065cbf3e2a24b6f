"""Watched-time accounting (iqn_ctl.engine.watch) and its table (iqn_ctl.live.sessions).

The properties: 0 <= stalled <= watched <= slot length; slots are aligned and
partition time (summed over slots, watched time is exactly the measure of the
union of watched samples and stalls after the client became known, computed
here independently on a one-second grid); unknown clients, a client's first
(selecting) stall and discarded stalls count nowhere; an open stall counts up
to the slot's end and not again when it ends.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iqn_ctl.engine.watch import ACTIVE_MIN_BPS, WatchAccounting, WatchRecord, union_length
from iqn_ctl.live.history import History, StallRecord
from iqn_ctl.live.sessions import SessionStore

SLOT = 10.0
BIG = 10 * ACTIVE_MIN_BPS  # bytes a second: surely active


def cells(a: float, b: float) -> set[int]:
    """Whole seconds covered by [a, b) (integer ends only)."""
    return set(range(int(a), int(b)))


spans = st.lists(st.tuples(st.integers(0, 60), st.integers(1, 12)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(active=spans, stalls=spans, since=st.integers(0, 30), end=st.integers(72, 90))
def test_slots_partition_watched_time(
    active: list[tuple[int, int]], stalls: list[tuple[int, int]], since: int, end: int
) -> None:
    acc = WatchAccounting(SLOT, "r", "if0")
    acc.know("c", since)
    for a, d in active:  # one-second samples, as the agent takes them
        for t in range(a, a + d):
            acc.sample(t, t + 1, {("c", "media"): BIG})
    for i, (a, d) in enumerate(stalls):
        acc.stall_started(i, "c", "www", a)
        acc.stall_ended(i, "c", "www", a, a + d)
    recs = acc.close_all(end)
    watched_cells: set[int] = set()
    stalled_cells: set[int] = set()
    for a, d in active:
        watched_cells |= cells(max(a, since), a + d)
    sampled = set(watched_cells)
    for a, d in stalls:
        stalled_cells |= cells(max(a, since), a + d)
    watched_cells |= stalled_cells
    assert sum(r.watched_s for r in recs) == pytest.approx(len(watched_cells))
    assert sum(r.stalled_s for r in recs) == pytest.approx(len(stalled_cells))
    slots = [r.slot for r in recs]
    assert len(slots) == len(set(slots))  # one record per client and slot
    for r in recs:
        assert r.slot % SLOT == 0 and r.slot_s == SLOT
        assert 0 <= r.stalled_s <= r.watched_s <= r.slot_s
        # what each slot holds is exactly its share of the union
        assert r.watched_s == pytest.approx(len({c for c in watched_cells if r.slot <= c < r.slot + SLOT}))
        assert r.client == "c" and r.router == "r" and r.iface == "if0"
        media = any(r.slot <= c < r.slot + SLOT for c in sampled)
        assert r.server == ("media" if media else "www")


@settings(max_examples=200, deadline=None)
@given(
    iv=st.lists(st.tuples(st.floats(0, 1e4, allow_nan=False), st.floats(0, 100, allow_nan=False)),
                max_size=20)
)
def test_union_length_bounds(iv: list[tuple[float, float]]) -> None:
    ivs = [(a, a + d) for a, d in iv]
    u = union_length(ivs)
    assert u <= sum(b - a for a, b in ivs) + 1e-6
    assert u >= max((b - a for a, b in ivs), default=0.0) - 1e-6


def test_unknown_clients_and_the_selecting_stall_count_nowhere() -> None:
    acc = WatchAccounting(SLOT)
    acc.stall_started("f", "c", "www", 2.0)
    for t in range(0, 5):
        acc.sample(t, t + 1, {("c", "media"): BIG, ("x", "media"): BIG})
    acc.stall_ended("f", "c", "www", 2.0, 5.0)  # the first stall: c is known from 5 on
    assert acc.known("c") and not acc.known("x")
    for t in range(5, 40):
        acc.sample(t, t + 1, {("c", "media"): BIG, ("x", "media"): BIG})
    recs = acc.close_all(40.0)
    assert {r.client for r in recs} == {"c"}
    # samples before c was known are gone; from 5 to 40 every second was watched
    assert sum(r.watched_s for r in recs) == pytest.approx(35.0)
    assert sum(r.stalled_s for r in recs) == 0.0


def test_discarded_stall_and_trickle_do_not_count() -> None:
    acc = WatchAccounting(SLOT)
    acc.know("c", 0.0)
    for t in range(0, 10):  # keep-alives only: below ACTIVE_MIN_BPS
        acc.sample(t, t + 1, {("c", "www"): ACTIVE_MIN_BPS / 2})
    acc.stall_started("f", "c", "www", 3.0)
    acc.stall_ended("f", "c", "www", 3.0, 6.0, kept=False)
    assert acc.close_all(10.0) == []


def test_open_stall_counts_to_the_slot_edge_once() -> None:
    acc = WatchAccounting(SLOT)
    acc.know("c", 0.0)
    acc.stall_started("f", "c", "www", 7.0)
    first = acc.close_until(10.0)
    assert [(r.slot, r.watched_s, r.stalled_s) for r in first] == [(0.0, 3.0, 3.0)]
    acc.stall_ended("f", "c", "www", 7.0, 12.0)
    second = acc.close_all(15.0)
    assert [(r.slot, r.watched_s, r.stalled_s) for r in second] == [(10.0, 2.0, 2.0)]
    acc.sample(3.0, 4.0, {("c", "m"): BIG})  # inside a closed slot: ignored, counted
    assert acc.late == 1


def test_server_is_the_one_with_most_bytes() -> None:
    acc = WatchAccounting(SLOT)
    acc.know("c", 0.0)
    acc.sample(0, 5, {("c", "www"): 5 * BIG, ("c", "media"): 50 * BIG})
    acc.stall_started("f", "c", "www", 1.0)
    acc.stall_ended("f", "c", "www", 1.0, 3.0)
    (rec,) = acc.close_all(5.0)
    assert rec.server == "media" and rec.watched_s == 5.0 and rec.stalled_s == 2.0


def test_store_adds_the_table_to_an_old_history_and_stalls_still_read(tmp_path: Path) -> None:
    """A history of an older agent (stalls only) gets the sessions table; the stall
    rows and History.query (what `iqn-ctl stalls` uses) are untouched."""
    with History(tmp_path) as h:
        h.add([StallRecord("if0", "s:443>c:1", "198.18.0.2", "198.18.0.1", 1.0, 3.0, 12, 3.1)])
    db = tmp_path / "stalls.sqlite"
    con = sqlite3.connect(db)
    assert not con.execute("SELECT name FROM sqlite_master WHERE name = 'sessions'").fetchall()
    con.close()
    store = SessionStore(db)
    assert store.known_clients("if0") == ["198.18.0.2"] and store.known_clients("other") == []
    store.add([WatchRecord("r", "if0", "198.18.0.2", "198.18.0.5", 900.0, 900.0, 600.0, 12.0)], 1900.0)
    store.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT v, client, server, slot, watched_s, stalled_s FROM sessions").fetchall() == [
        (1, "198.18.0.2", "198.18.0.5", 900.0, 600.0, 12.0)
    ]
    con.close()
    with History(tmp_path, create=False) as h:
        (st_,) = h.query()
        assert st_.client == "198.18.0.2" and st_.duration == 2.0
