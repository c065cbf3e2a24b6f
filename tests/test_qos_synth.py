"""The synthetic generator, the baselines and the scoring rules of iqn_qos (fast, no I/O but tmp files)."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pytest
from typer.testing import CliRunner

from iqn_qos import baselines, scoring, synth
from iqn_qos.cli import app
from iqn_qos.errors import QosError
from iqn_qos.lines import MediaLine, parse_line, to_json
from iqn_qos.mle import Estimate
from iqn_qos.topology import load_topology

SMALL = {"slots": 3, "lines_per_slot": 2000, "components": 4000}


def raw_rates(lines: list[MediaLine]) -> dict[str, float]:
    """Pooled bad rate of the lines through each component."""
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ln in lines:
        for c in ln.path:
            acc[c][0] += ln.n - ln.m
            acc[c][1] += ln.n
    return {c: b / n for c, (b, n) in acc.items()}


# -- generator ---------------------------------------------------------------------------------

def test_same_seed_same_lines_other_seed_other_lines() -> None:
    a = synth.generate("random-k", seed=7, **SMALL)[2]
    b = synth.generate("random-k", seed=7, **SMALL)[2]
    c = synth.generate("random-k", seed=8, **SMALL)[2]
    assert [s.lines for s in a] == [s.lines for s in b]
    assert [s.truth for s in a] == [s.truth for s in b]
    assert [s.lines for s in a] != [s.lines for s in c]


def test_counts_and_shape() -> None:
    world, faults, slots = synth.generate("healthy", seed=1, slots=2, lines_per_slot=5000)
    assert abs(len(world.ids) - 4000) <= 200
    assert len(set(world.ids)) == len(world.ids)
    assert set(world.kinds) == set(synth.KINDS)
    assert faults == []
    for i, s in enumerate(slots):
        assert s.start == synth.T0 + i * 900
        assert len(s.lines) == 5000
        assert 100 <= len(s.truth) <= 250, len(s.truth)  # ~150 busy components per slot
        assert all(s.start <= ln.t < s.start + 900 for ln in s.lines)
        assert all(1 <= ln.n <= 900 and 0 <= ln.m <= ln.n for ln in s.lines)
        assert all(len(ln.path) in (3, 5) for ln in s.lines)
        assert max(s.truth.values()) < 0.0005  # background only
        median_n = float(np.median([ln.n for ln in s.lines]))
        assert 120 <= median_n <= 240  # sessions of a few minutes
    # a link id names its own ends, in the media's direction
    for ln in slots[0].lines:
        if len(ln.path) == 5:
            srv, cs, link, cc, sub = ln.path
            assert link == f"{cs}>{cc}" and srv.startswith(cs + "-") and sub.startswith(cc + "-")


def test_size_follows_components() -> None:
    for n in (100, 1000, 16000):
        world = synth.make_world(n, np.random.default_rng(0))
        assert abs(len(world.ids) - n) <= 0.1 * n, (n, len(world.ids))
    with pytest.raises(QosError, match="components"):
        synth.make_world(5, np.random.default_rng(0))


@pytest.mark.parametrize("scenario", ["wireless-ap", "link-direction", "relay-bug", "random-k"])
def test_injected_faults_show_in_raw_bad_rates(scenario: str) -> None:
    _world, faults, slots = synth.generate(scenario, seed=3, **SMALL)
    assert faults
    for s in slots:
        rates = raw_rates(s.lines)
        assert s.injected and s.injected <= set(s.truth)
        clear = [ln for ln in s.lines if not s.injected.intersection(ln.path)]
        clear_rate = sum(ln.n - ln.m for ln in clear) / sum(ln.n for ln in clear)
        for comp in s.injected:
            p = s.truth[comp]
            assert p >= 0.01
            # every line through it carries it: its lines' bad rate is at least ~p,
            # the lines clear of every fault stay at the background's
            assert rates[comp] > 0.8 * p, (comp, rates[comp], p)
            assert clear_rate < p / 5, (clear_rate, p)
        healthy = [c for c in s.truth if c not in s.injected]
        assert max(s.truth[c] for c in healthy) < 0.0005


def test_wireless_ap_profile_is_the_papers() -> None:
    hours = (np.arange(96) + 0.5) * 0.25
    p = synth.wireless_ap_profile(hours)
    assert abs(float(p.mean()) - 0.046) < 0.001
    assert abs(float(p.max()) - 0.20) < 0.002 and 13.5 <= hours[int(p.argmax())] <= 14.5
    assert float(p.min()) > 0.01  # still faulty at night, if less


def test_link_direction_degrades_one_direction_only() -> None:
    world, faults, slots = synth.generate("link-direction", seed=4, **SMALL)
    (f,) = faults
    a, b = world.link_ends(f.component)
    assert list(f.p) == sorted(f.p) and f.p[-1] > f.p[0]
    reverse = world.ids[world.link(b, a)]
    for s in slots:
        assert reverse in s.truth and s.truth[reverse] < 0.0005  # busy and healthy


def test_cli_lines_truth_and_topology_agree(tmp_path) -> None:
    lines, truth, topo = tmp_path / "l.jsonl", tmp_path / "t.jsonl", tmp_path / "topo.json"
    r = CliRunner().invoke(app, ["synth", "--scenario", "relay-bug", "--slots", "2", "--lines-per-slot",
                                 "500", "--seed", "5", "--out", str(lines), "--truth-out", str(truth),
                                 "--topology-out", str(topo), "--addresses"])
    assert r.exit_code == 0, r.output
    parsed = [parse_line(t, f"l.jsonl:{i}") for i, t in enumerate(lines.read_text().splitlines(), 1)]
    assert len(parsed) == 1000
    assert all(ln.client and ln.server and ln.kind == "video" for ln in parsed)
    _w, _f, slots = synth.generate("relay-bug", seed=5, slots=2, lines_per_slot=500, addresses=True)
    assert parsed == [ln for s in slots for ln in s.lines]
    rows = [json.loads(t) for t in truth.read_text().splitlines()]
    assert {(r["slot"], r["component"]) for r in rows} == {
        (s.start, c) for s in slots for c in s.truth}
    assert sum(r["injected"] for r in rows) == 4  # two relays x two slots
    topology = load_topology(topo)
    assert {c for ln in parsed for c in ln.path} <= topology.components
    for ln in parsed[:200]:  # the topology resolves the addresses to the very path (media direction)
        assert topology.resolve(ln.client, ln.server) == ln.path  # type: ignore[arg-type]


def test_cli_bad_scenario_is_one_line_exit_2() -> None:
    r = CliRunner().invoke(app, ["synth", "--scenario", "nope"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        "iqn-qos: error: unknown scenario 'nope'; choose one of " + ", ".join(synth.SCENARIOS)]
    r = CliRunner().invoke(app, ["synth", "--slots", "0"])
    assert r.exit_code == 2 and "--slots must be at least 1" in r.output


def test_lines_round_trip_the_contract() -> None:
    _w, _f, slots = synth.generate("wireless-ap", seed=2, slots=1, lines_per_slot=300)
    for i, ln in enumerate(slots[0].lines):
        assert parse_line(to_json(ln), f"x:{i}") == ln


# -- baselines ---------------------------------------------------------------------------------

def L(path: str, n: int, m: int) -> MediaLine:  # noqa: N802
    return MediaLine(0.0, tuple(path.split(",")), n, m)


TINY = [L("a,b", 100, 90), L("a,c", 100, 100), L("b", 100, 90), L("c", 100, 100)]


def by_comp(est: list[Estimate]) -> dict[str, Estimate]:
    assert all(isinstance(e.component, str) for e in est)
    return {str(e.component): e for e in est}


def test_linear_solves_the_exact_case_and_ignores_length() -> None:
    e = by_comp(baselines.linear(TINY))
    assert e["b"].p == pytest.approx(0.1, abs=1e-6) and e["b"].faulty
    assert e["a"].p == pytest.approx(0.0, abs=1e-6) and not e["a"].faulty
    assert e["c"].p == pytest.approx(0.0, abs=1e-6)
    # a 10-unit line weighs as much as a 1,000-unit one (the MLE would say 15/1010)
    e = by_comp(baselines.linear([L("a", 10, 5), L("a", 1000, 990)]))
    assert e["a"].p == pytest.approx(1 - math.sqrt(0.5 * 0.99), rel=1e-6)
    # all units bad: finite and below 1
    e = by_comp(baselines.linear([L("a", 10, 0)]))
    assert 0.9 < e["a"].p < 1.0


def test_boolean_picks_the_smallest_explanation() -> None:
    e = by_comp(baselines.boolean(TINY))
    assert [c for c, x in e.items() if x.faulty] == ["b"]
    assert e["b"].p == pytest.approx(0.1)
    assert e["a"].p == 0.0 and e["c"].p == 0.0
    assert {c: x.lines for c, x in e.items()} == {"a": 2, "b": 2, "c": 2}
    # a bad fraction under tol is a good line
    e = by_comp(baselines.boolean([L("a", 1000, 995)], tol=0.01))
    assert not e["a"].faulty
    # hit ratio under min_hit: not a candidate
    e = by_comp(baselines.boolean([L("a,b", 100, 80), L("a", 100, 100), L("a", 100, 100)], min_hit=0.5))
    assert [c for c, x in e.items() if x.faulty] == ["b"]


def test_average_blames_every_component_of_a_bad_path() -> None:
    e = by_comp(baselines.average(TINY))
    assert e["b"].p == pytest.approx(0.1)
    assert e["a"].p == pytest.approx(0.05) and e["a"].faulty  # the innocent shares the blame
    assert e["c"].p == 0.0 and not e["c"].faulty


def test_baselines_reject_empty_and_pathless() -> None:
    for fn in baselines.BASELINES.values():
        with pytest.raises(QosError, match="empty slot"):
            fn([])
        with pytest.raises(QosError, match="without a path"):
            fn([MediaLine(0.0, (), 10, 10, client="10.0.0.1", server="10.0.0.2")])


# -- scoring -----------------------------------------------------------------------------------

def E(comp: str | tuple[str, ...], p: float, faulty: bool) -> Estimate:  # noqa: N802
    return Estimate(comp, p, p, p, 1, faulty)


def test_score_group_counts_when_it_holds_a_faulty_member() -> None:
    truth = {"a": 0.05, "b": 0.0001, "c": 0.0001, "d": 0.02}
    s = scoring.score_slot([E(("a", "b"), 0.05, True), E("c", 0.0, False), E("d", 0.0, False)], truth)
    assert (s.precision, s.recall) == (1.0, 0.5)
    assert s.f1 == pytest.approx(2 / 3)
    assert (s.flags, s.false_flags, s.faulty, s.missed, s.flagged_members) == (1, 0, 2, 1, 2)
    # group error is against the group's combined p
    combined = 1 - (1 - 0.05) * (1 - 0.0001)
    assert s.abs_err == pytest.approx(abs(0.05 - combined) + 0.0001 + 0.02)


def test_score_false_flags_and_empty_conventions() -> None:
    truth = {"a": 0.0001, "b": 0.0002}
    clean = scoring.score_slot([E("a", 0.0, False), E("b", 0.0, False)], truth)
    assert (clean.precision, clean.recall, clean.f1) == (1.0, 1.0, 1.0)
    noisy = scoring.score_slot([E("a", 0.03, True), E("b", 0.0, False)], truth)
    assert (noisy.precision, noisy.recall, noisy.f1, noisy.false_flags) == (0.0, 1.0, 0.0, 1)
    missed = scoring.score_slot([E("a", 0.0, False)], {"a": 0.2})
    assert (missed.precision, missed.recall, missed.f1, missed.missed) == (1.0, 0.0, 0.0, 1)
    summ = scoring.summarize([clean, noisy])
    assert summ.f1 == 0.5 and summ.false_flags == 1 and summ.slots == 2
    assert summ.mae == pytest.approx((clean.abs_err + noisy.abs_err) / 4)
    with pytest.raises(QosError):
        scoring.summarize([])


# -- end to end: synth | infer -----------------------------------------------------------------

@pytest.mark.parametrize("scenario", ["wireless-ap", "link-direction", "relay-bug", "random-k"])
def test_synth_then_infer_finds_the_injected_faults(tmp_path, scenario: str) -> None:
    """`iqn-qos synth ... > f; iqn-qos infer f --json` (defaults): flagged = injected, per slot."""
    lines, truth = tmp_path / "l.jsonl", tmp_path / "t.jsonl"
    r = CliRunner().invoke(app, ["synth", "--scenario", scenario, "--slots", "2", "--lines-per-slot", "3000",
                                 "--seed", "11", "--out", str(lines), "--truth-out", str(truth)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["infer", str(lines), "--json"])
    assert r.exit_code == 0, r.output
    injected: dict[float, set[str]] = defaultdict(set)
    for row in map(json.loads, truth.read_text().splitlines()):
        if row["injected"]:
            injected[row["slot"]].add(row["component"])
    flagged: dict[float, list[set[str]]] = defaultdict(list)
    for row in map(json.loads, r.output.splitlines()):
        comp = row["component"]
        if row["faulty"]:
            flagged[row["slot"]].append({comp} if isinstance(comp, str) else set(comp))
    assert set(injected) == set(flagged) and len(injected) == 2
    for slot, inj in injected.items():
        assert inj, slot
        # every flag holds an injected component, every injected component is in a flag
        assert all(f & inj for f in flagged[slot]), (slot, flagged[slot], inj)
        assert inj <= set().union(*flagged[slot]), (slot, flagged[slot], inj)
