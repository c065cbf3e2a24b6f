"""The engine tells its driver when to call advance() (``next_deadline()``,
like aioquic's ``get_timer()``): nothing is due before the deadline, and what
is due happens at it, so a driver that sleeps until the deadline loses no
latency and a driver that never wakes earlier misses nothing."""

from __future__ import annotations

import pytest

from iqn_ctl.engine.estimators import ESTIMATORS
from iqn_ctl.engine.flowtable import FlowTable
from iqn_ctl.engine.params import SignalParams
from iqn_ctl.engine.tracker import StallEnded, StallStarted, StallTracker

PRM = SignalParams(0.2, 4)
BURST = [100.0, 100.001, 100.002, 100.003]
EPS = 1e-6


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_stall_end_is_due_at_the_deadline_not_before(estimator: str) -> None:
    tr = StallTracker(PRM, estimator, reorder=0.005)
    assert tr.next_deadline() is None  # nothing seen: only an arrival can change anything
    events = tr.feed(BURST)
    events += tr.advance(BURST[-1])
    held = tr.next_deadline()
    events += tr.advance(BURST[-1] + 0.005)
    assert [type(e) for e in events] == [StallStarted]
    assert held is not None and held <= BURST[-1] + 0.005 + EPS  # the held arrivals were due then
    due = tr.next_deadline()
    if not tr.estimator.time_driven_end:
        assert due is None
        return
    assert due is not None and due > BURST[-1] + 0.005
    assert tr.advance(due - 1e-4) == []
    ended = tr.advance(due)
    assert len(ended) == 1 and isinstance(ended[0], StallEnded)
    assert tr.next_deadline() is None


def test_held_arrival_is_due_after_the_reorder_tolerance() -> None:
    tr = StallTracker(PRM, reorder=0.005)
    assert tr.feed([50.0]) == []
    assert tr.next_deadline() == pytest.approx(50.005)
    tr.advance(50.005)
    assert tr.next_deadline() is None  # released, no stall


def test_flow_table_deadline_covers_stalls_and_idle_expiry() -> None:
    table = FlowTable(PRM, idle_timeout=30.0, reorder=0.0)
    assert table.next_deadline() is None
    table.feed("quiet", [95.0])
    assert table.next_deadline() == pytest.approx(125.0)  # the idle flow is forgotten then
    table.feed("stalling", BURST)
    due = table.next_deadline()
    assert due is not None and BURST[-1] < due < 125.0  # the stall's end comes first
    assert table.advance(due - 1e-4) == []
    assert [type(e) for e in table.advance(due)] == [StallEnded]
    assert table.next_deadline() == pytest.approx(125.0)
    assert table.advance(125.0 - EPS) == [] and len(table) == 2
    table.advance(125.0 + EPS)
    assert len(table) == 1 and table.expired == 1
