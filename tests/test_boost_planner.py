"""The boost planner (iqn_ctl/engine/boost.py), sans-I/O: stall events and
times in, boost actions out. Hypothesis drives random stall schedules and
checks the rules of issue 14 on the actions: never more boosts than slots, a
slot held by one client at a time, no episode (a client's boosts less than
--boost-gap apart) longer than --boost-max in all, a boost only for a stall
that starts, and every boost ended by the end of its client's stalls, its
timeout or close."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iqn_ctl.engine.boost import BoostError, BoostOff, BoostOn, BoostPlanner, policy_problem, slots_for


@dataclass(frozen=True)
class Ev:
    t: float
    kind: str  # "start" | "end" | "tick"
    flow: int
    client: str


@st.composite
def schedules(draw: st.DrawFn) -> list[Ev]:
    """Stalls of up to 6 clients (two flows each), at random times, some never ended."""
    evs: list[Ev] = []
    for flow in range(draw(st.integers(0, 12))):
        client = f"10.0.0.{flow % 6}"
        t = draw(st.floats(0, 60, allow_nan=False))
        for _ in range(draw(st.integers(1, 3))):
            d = draw(st.floats(0.01, 25, allow_nan=False))
            evs.append(Ev(t, "start", flow, client))
            if draw(st.integers(0, 4)) > 0:  # a few never end (the agent closes them)
                evs.append(Ev(t + d, "end", flow, client))
            t += d + draw(st.floats(0.01, 20, allow_nan=False))
    ticks = draw(st.lists(st.floats(0, 100, allow_nan=False), max_size=10))
    evs += [Ev(t, "tick", -1, "") for t in ticks]
    return sorted(evs, key=lambda e: (e.t, e.kind != "end"))


def run(p: BoostPlanner, evs: list[Ev], t_close: float = 200.0) -> list[BoostOn | BoostOff]:
    out: list[BoostOn | BoostOff] = []
    open_: set[int] = set()
    for e in evs:
        if e.kind == "start":
            if e.flow in open_:
                continue  # the engine never starts a stall twice on one flow
            open_.add(e.flow)
            out += p.stall_started(e.flow, e.client, e.t)
        elif e.kind == "end":
            if e.flow not in open_:
                continue
            open_.discard(e.flow)
            out += p.stall_ended(e.flow, e.t)
        else:
            out += p.advance(e.t)
    return out + p.close(t_close)


@settings(max_examples=300, deadline=None)
@given(evs=schedules(), slots=st.integers(1, 4), max_s=st.floats(0.5, 15), gap=st.floats(0, 20))
def test_rules_hold_on_any_schedule(evs: list[Ev], slots: int, max_s: float, gap: float) -> None:
    p = BoostPlanner(slots, max_s, gap)
    acts = run(p, evs)
    active: dict[str, BoostOn] = {}
    slot_of: dict[int, str] = {}
    episode: dict[str, tuple[float, float]] = {}  # client -> (boosted s so far, last end)
    times = [a.at for a in acts]
    assert times == sorted(times), "actions come out in time order"
    for a in acts:
        if isinstance(a, BoostOn):
            assert a.client not in active, "one boost per client at a time"
            assert 0 <= a.slot < slots and a.slot not in slot_of, "a slot holds one client"
            assert len(active) < slots, "never more boosts than slots"
            used, last_end = episode.get(a.client, (0.0, -1e9))
            if a.at - last_end >= gap:
                episode[a.client] = (0.0, last_end)  # a new episode
            else:
                assert used < max_s, "a spent episode needs --boost-gap without a boost"
            starts = [e for e in evs if e.kind == "start" and e.client == a.client and e.t == a.at]
            assert starts, "a boost starts when one of its client's stalls starts"
            active[a.client], slot_of[a.slot] = a, a.client
        else:
            on = active.pop(a.client)
            assert slot_of.pop(a.slot) == a.client and on.slot == a.slot
            used = episode[a.client][0] + (a.at - on.at)
            assert used <= max_s + 1e-6, "--boost-max per episode"
            if a.reason == "timeout":
                assert used == pytest.approx(max_s)
            episode[a.client] = (used, a.at)
    assert not active, "close ends every boost"
    assert p.active == 0 and p.next_deadline() is None
    assert p.started == sum(isinstance(a, BoostOn) for a in acts)


def test_a_boost_ends_with_the_last_stall_of_its_client() -> None:
    p = BoostPlanner(2, max_s=10, gap=0)
    assert p.stall_started("f1", "c", 1.0) == [BoostOn("c", 0, 1.0)]
    assert p.stall_started("f2", "c", 1.5) == []  # the same client: the boost covers it
    assert p.stall_ended("f1", 2.0) == []
    assert p.stall_ended("f2", 3.0) == [BoostOff("c", 0, 3.0, "ended")]
    assert p.boosted_s(9.0) == pytest.approx(2.0)


def test_timeout_and_no_second_boost_for_the_same_stall() -> None:
    p = BoostPlanner(1, max_s=2, gap=0)
    p.stall_started("f", "c", 0.0)
    assert p.next_deadline() == 2.0
    assert p.advance(5.0) == [BoostOff("c", 0, 2.0, "timeout")]  # ended at its due time
    assert p.stall_ended("f", 6.0) == []  # its stall ends later: nothing more to do
    assert p.timeouts == 1 and p.active == 0


def test_full_and_rate_limited_stalls_are_refused_and_counted() -> None:
    p = BoostPlanner(1, max_s=10, gap=30)
    p.stall_started("a", "10.0.0.1", 0.0)
    assert p.stall_started("b", "10.0.0.2", 1.0) == []
    assert p.denied_full == 1
    p.stall_ended("a", 2.0)
    assert p.stall_ended("b", 3.0) == []  # refused: it never got a boost, not even once a slot freed


def test_an_episode_resumes_until_its_max_then_waits_the_gap() -> None:
    """A stall the inference ended early and that starts again goes on being boosted,
    for what is left of --boost-max; then the client waits --boost-gap unboosted."""
    p = BoostPlanner(1, max_s=10, gap=5)
    p.stall_started("a", "c", 0.0)
    p.stall_ended("a", 4.0)  # 4 s used
    assert p.stall_started("a", "c", 6.0) == [BoostOn("c", 0, 6.0)]  # 2 s later: same episode
    assert p.next_deadline() == 12.0  # 6 s left of the episode's 10
    assert p.advance(14.0) == [BoostOff("c", 0, 12.0, "timeout")]  # its stall goes on
    assert p.stall_started("b", "c", 15.0) == []  # spent, and 3 s without a boost: not yet
    assert p.denied_rate == 1
    p.stall_ended("a", 16.0)
    p.stall_ended("b", 16.5)
    assert p.stall_started("a", "c", 18.0) == [BoostOn("c", 0, 18.0)]  # 6 s without: a new episode
    assert p.next_deadline() == 28.0


def test_policy_and_slots() -> None:
    assert slots_for(10_000_000, 0.3, 1_000_000) == 3
    assert slots_for(1_000_000, 0.1, 2_000_000) == 1  # at least one
    assert slots_for(10**11, 0.9, 8000) == 64  # at most MAX_SLOTS
    assert policy_problem(10, 15, 0.3, 2_000_000, 10**7) is None
    assert "--boost-share" in (policy_problem(10, 15, 1.0, 2_000_000, 10**7) or "")
    assert "--boost-max" in (policy_problem(0, 15, 0.3, 2_000_000, 10**7) or "")
    assert "--boost-gap" in (policy_problem(1, -1, 0.3, 2_000_000, 10**7) or "")
    with pytest.raises(BoostError):
        BoostPlanner(0)


def test_boost_metrics_show_the_status_numbers() -> None:
    """The metrics read the same object as ``status``' ``boost`` (none without --mitigate)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from iqn_ctl.live.metrics import AgentMetrics, boost_metrics

    assert list(boost_metrics("eth0", None)) == []
    st = {"active": 2, "total": 7, "seconds": 12.5, "bytes": 123456, "timeouts": 1, "denied_full": 3,
          "denied_rate": 4}
    m = AgentMetrics("eth0", lambda: {}, boost=lambda: st)
    text = generate_latest(m.registry).decode()
    for line in ('iqn_boosts_active{iface="eth0"} 2.0', 'iqn_boosts_total{iface="eth0"} 7.0',
                 'iqn_boost_seconds_total{iface="eth0"} 12.5', 'iqn_boost_bytes_total{iface="eth0"} 123456.0',
                 'iqn_boost_timeouts_total{iface="eth0"} 1.0',
                 'iqn_boosts_denied_total{iface="eth0",reason="full"} 3.0',
                 'iqn_boosts_denied_total{iface="eth0",reason="rate"} 4.0'):
        assert line in text, line
    assert "iqn_boost" not in generate_latest(AgentMetrics("eth0", lambda: {}).registry).decode()
    assert isinstance(m.registry, CollectorRegistry)
