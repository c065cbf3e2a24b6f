"""FlowTable: flows do not see each other's arrivals, the table stays bounded,
idle flows go, and batching many flows at once changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iqn_ctl.engine.flowtable import FlowTable
from iqn_ctl.engine.params import SignalParams
from iqn_ctl.engine.synth import SignalModel, random_stalls, signal_times
from iqn_ctl.engine.tracker import Event, StallEnded, StallTracker

PRM = SignalParams(0.2, 4)
T0 = 1.7e9


def ended(events: list[Event]) -> list[StallEnded]:
    return [e for e in events if isinstance(e, StallEnded)]


def solo(times: np.ndarray, flow: str, est: str = "count") -> list[StallEnded]:
    tr = StallTracker(PRM, est, flow)
    return ended(tr.feed(times) + tr.close())


def key(e: StallEnded) -> tuple[object, float, float, int, bool]:
    return (e.flow, e.start, e.end, e.candidates, e.truncated)


def burst(t: float) -> list[float]:
    """One signal: n = 4 candidates 2 ms apart."""
    return [t + 0.002 * i for i in range(4)]


def flow_traces(k: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"f{i}": signal_times(random_stalls(8, rng), SignalModel(PRM, jitter=0.05), rng) for i in range(k)
    }


@pytest.mark.parametrize("est", ["count", "paper"])
def test_flows_are_isolated(est: str) -> None:
    traces = flow_traces(5, seed=1)
    table = FlowTable(PRM, est)
    # interleave in time order, a few arrivals at a time, as a live agent would
    flows = np.concatenate([[f] * t.size for f, t in traces.items()])
    times = np.concatenate(list(traces.values()))
    order = np.argsort(times, kind="stable")
    events: list[Event] = []
    for chunk in np.array_split(order, 200):
        for i in chunk:
            events += table.feed(str(flows[i]), times[i])
    events += table.close()
    got = sorted(map(key, ended(events)))
    want = sorted(key(e) for f, t in traces.items() for e in solo(t, f, est))
    assert got == want
    assert len(got) > 20


def test_flows_sharing_bursts_do_not_make_each_other_stall() -> None:
    # n = 4: four flows each get one candidate of every burst, so none ever has
    # n in its start window, though the same packets in one flow are a stall
    bursts = T0 + 0.2 * np.arange(20)
    table = FlowTable(PRM)
    events: list[Event] = []
    for b in bursts:
        for k, f in enumerate("abcd"):
            events += table.feed(f, b + 0.001 * k)
    events += table.advance(float(bursts[-1]) + 5) + table.close()
    assert events == []
    assert len(table) == 4 and all(tr.candidates == 20 for tr in table)
    merged = StallTracker(PRM)
    both = np.sort(np.concatenate([bursts + 0.001 * k for k in range(4)]))
    assert ended(merged.feed(both) + merged.close()), "the same packets in one flow do make a stall"


def test_max_flows_bound_evicts_least_recent_and_closes_its_stall() -> None:
    table = FlowTable(PRM, max_flows=3)
    events: list[Event] = []
    events += table.feed("stalling", burst(T0) + [T0 + 0.1])  # n arrivals: a stall opens
    tr = table.get("stalling")
    assert tr is not None and tr.in_stall
    # every flow is in a stall (a flow that is not goes first: tests/test_hostile_traffic.py)
    events += table.feed("b", burst(T0 + 0.1))
    events += table.feed("c", burst(T0 + 0.2) + [T0 + 0.25])
    events += table.feed("b", T0 + 0.3)  # b is recent again; "stalling" is the oldest
    assert len(table) == 3 and not ended(events)
    events += table.feed("d", T0 + 0.4)  # a fourth flow evicts "stalling"
    assert len(table) == 3
    assert table.get("stalling") is None and table.get("b") is not None
    assert table.evicted == 1
    closed = ended(events)
    assert len(closed) == 1 and closed[0].flow == "stalling" and closed[0].truncated
    assert closed[0].candidates == 5
    for i in range(50):
        table.feed(f"x{i}", T0 + 1 + i * 0.01)
        assert len(table) <= 3
    assert table.evicted == 51


def test_idle_flows_expire_and_open_stalls_close() -> None:
    table = FlowTable(PRM, idle_timeout=10.0)
    events: list[Event] = []
    events += table.feed("quiet", burst(T0))  # opens a stall
    events += table.feed("busy", T0 + 1)
    events += table.advance(T0 + 9.0)  # quiet's stall ends (end window 0.8 s): no expiry yet
    assert len(table) == 2 and table.expired == 0
    assert [e.flow for e in ended(events)] == ["quiet"]
    table.feed("busy", T0 + 9.5)
    events = table.advance(T0 + 10.5)  # quiet idle 10.5 s > 10 s; busy 1 s
    assert table.get("quiet") is None and table.get("busy") is not None
    assert table.expired == 1 and ended(events) == []
    # a stall whose end window has passed is ended (not cut) before its flow goes
    events = table.feed("hung", burst(T0 + 20))
    events += table.advance(T0 + 40)
    assert [(e.flow, e.truncated) for e in ended(events)] == [("hung", False)]
    assert table.get("hung") is None and table.get("busy") is None
    assert len(table) == 0 and table.expired == 3


def test_expiry_closes_a_stall_still_open() -> None:
    # an idle timeout shorter than the end window (0.8 s) expires a flow mid-stall:
    # its stall is reported, marked cut, rather than lost
    table = FlowTable(PRM, idle_timeout=0.5)
    table.feed("a", burst(T0))
    events = table.advance(T0 + 0.6)
    assert [(e.flow, e.truncated, e.candidates) for e in ended(events)] == [("a", True, 4)]
    assert len(table) == 0 and table.expired == 1


def test_default_idle_timeout_scales_with_p() -> None:
    assert FlowTable(SignalParams(0.2, 4)).idle_timeout == pytest.approx(120.0)
    assert FlowTable(SignalParams(0.5, 4)).idle_timeout == pytest.approx(300.0)


def test_bad_table_arguments() -> None:
    with pytest.raises(ValueError, match="max_flows"):
        FlowTable(max_flows=0)
    with pytest.raises(ValueError, match="estimator"):
        FlowTable(estimator="nope")
    with pytest.raises(ValueError, match="length"):
        FlowTable().feed_many(["a", "b"], [T0])


@settings(max_examples=60, deadline=None)
@given(
    assign=st.lists(st.integers(0, 3), min_size=1, max_size=400),
    seed=st.integers(0, 2**16),
    est=st.sampled_from(["count", "paper"]),
    protocol=st.sampled_from(["tick", "edges"]),
)
def test_feed_many_equals_per_flow_feeding(assign: list[int], seed: int, est: str, protocol: str) -> None:
    rng = np.random.default_rng(seed)
    model = SignalModel(PRM, jitter=0.1, protocol=protocol)
    times = signal_times(random_stalls(10, rng, max_gap=6.0), model, rng)
    if times.size == 0:
        return
    flows = [f"f{assign[i % len(assign)]}" for i in range(times.size)]
    # arrivals in capture order, a few batches of mixed flows
    batches = np.array_split(np.arange(times.size), 5)
    many = FlowTable(PRM, est)
    got: list[Event] = []
    for b in batches:
        out = many.feed_many([flows[i] for i in b], times[b])
        assert [e.detected_at for e in out] == sorted(e.detected_at for e in out)
        got += out
    got += many.close()
    one = FlowTable(PRM, est)
    want: list[Event] = []
    for b in batches:
        for f in sorted({flows[i] for i in b}):
            idx = [i for i in b if flows[i] == f]
            want += one.feed(f, times[idx])
    want += one.close()
    assert sorted(map(key, ended(got))) == sorted(map(key, ended(want)))
    assert len(got) == len(want)
