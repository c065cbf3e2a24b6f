"""The QoS engine (iqn_qos.mle): invariants of the estimator, recovery, groups, intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iqn_qos.errors import QosError
from iqn_qos.lines import MediaLine
from iqn_qos.mle import L1_DEFAULT, Z95, Estimate, infer_slot, slots
from iqn_qos.predict import predict_path

COMPS = [f"c{i}" for i in range(6)]


def by_id(ests: list[Estimate]) -> dict[str | tuple[str, ...], Estimate]:
    return {e.component: e for e in ests}


def ids_of(ests: list[Estimate]) -> set[str]:
    out: set[str] = set()
    for e in ests:
        out |= {e.component} if isinstance(e.component, str) else set(e.component)
    return out


@st.composite
def slot_lines(draw: st.DrawFn) -> list[MediaLine]:
    """Random lines over up to 6 components; every used component also has a line of its own,
    so the design is identifiable (full column rank) and the optimum unique."""
    used = draw(st.lists(st.sampled_from(COMPS), min_size=1, max_size=6, unique=True))
    out = []
    for c in used:
        n = draw(st.integers(1, 400))
        out.append(MediaLine(0.0, (c,), n, draw(st.integers(0, n))))
    for _ in range(draw(st.integers(0, 8))):
        path = draw(st.lists(st.sampled_from(used), min_size=1, max_size=4, unique=True))
        n = draw(st.integers(1, 400))
        out.append(MediaLine(0.0, tuple(path), n, draw(st.integers(0, n))))
    return out


@settings(max_examples=80, deadline=None)
@given(slot_lines())
def test_estimates_in_unit_interval_and_ordered(lines: list[MediaLine]) -> None:
    ests = infer_slot(lines)
    assert ests
    for e in ests:
        assert 0.0 <= e.lo <= e.p <= e.hi < 1.0, e
        assert e.lines >= 1
        assert e.faulty == (e.lo > 0.01)
    assert [e.p for e in ests] == sorted((e.p for e in ests), reverse=True)


@settings(max_examples=60, deadline=None)
@given(slot_lines())
def test_only_components_on_lines_get_an_estimate(lines: list[MediaLine]) -> None:
    on_lines = {c for ln in lines for c in ln.path}
    ests = infer_slot(lines)
    assert ids_of(ests) == on_lines
    # each component is reported once (alone or in one group)
    assert sum(1 if isinstance(e.component, str) else len(e.component) for e in ests) == len(on_lines)
    for e in ests:
        members = {e.component} if isinstance(e.component, str) else set(e.component)
        assert e.lines == sum(1 for ln in lines if members & set(ln.path))


@settings(max_examples=60, deadline=None)
@given(slot_lines())
def test_duplicating_every_line_narrows_intervals_without_moving_p(lines: list[MediaLine]) -> None:
    once = by_id(infer_slot(lines))
    twice = by_id(infer_slot(lines + lines))
    assert once.keys() == twice.keys()
    for k, e in once.items():
        d = twice[k]
        assert d.p == pytest.approx(e.p, abs=1e-6, rel=1e-6), k
        assert d.lines == 2 * e.lines
        assert d.hi - d.lo <= (e.hi - e.lo) + 1e-9, (k, e, d)
        if 1e-6 < e.hi - e.lo and e.hi < 0.999:  # a real (not capped) interval gets strictly narrower
            assert d.hi - d.lo < e.hi - e.lo, (k, e, d)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1000), st.floats(0, 1)), min_size=1, max_size=6))
def test_single_component_gives_the_plain_binomial_estimate(counts: list[tuple[int, float]]) -> None:
    lines = [MediaLine(float(i), ("only",), n, int(round(f * n))) for i, (n, f) in enumerate(counts)]
    (e,) = infer_slot(lines)
    n = sum(ln.n for ln in lines)
    bad = sum(ln.n - ln.m for ln in lines)
    assert e.component == "only"
    if bad < n:
        assert e.p == pytest.approx(bad / n, abs=1e-9)
    else:  # every unit bad: p is as close to 1 as the estimator allows, still < 1
        assert 0.999999 < e.p < 1.0


def test_wald_interval_matches_the_binomial_delta_method() -> None:
    n, m = 2000, 1800
    (e,) = infer_slot([MediaLine(0.0, ("a",), n, m)])
    q = m / n
    x, sd = -math.log(q), math.sqrt((1 - q) / (n * q))
    assert e.lo == pytest.approx(-math.expm1(-(x - Z95 * sd)), rel=1e-9)
    assert e.hi == pytest.approx(-math.expm1(-(x + Z95 * sd)), rel=1e-9)


def test_boundary_component_gets_a_one_sided_likelihood_ratio_bound() -> None:
    # Only good units: l(x) = -n x, so the one-sided bound is where n x = chi2_1(0.90)/2.
    n = 500
    (e,) = infer_slot([MediaLine(0.0, ("a",), n, n)])
    assert (e.p, e.lo) == (0.0, 0.0)
    assert e.hi == pytest.approx(-math.expm1(-1.3527717903 / n), rel=1e-6)
    assert not e.faulty


def test_inseparable_components_are_one_group() -> None:
    lines = [
        MediaLine(0.0, ("sub", "gw", "srv"), 1000, 900),
        MediaLine(0.0, ("sub", "gw", "srv2"), 1000, 990),
        MediaLine(0.0, ("srv2",), 1000, 1000),
        MediaLine(0.0, ("srv",), 1000, 1000),
    ]
    ests = by_id(infer_slot(lines))
    assert set(ests) == {("gw", "sub"), "srv", "srv2"}
    g = ests[("gw", "sub")]
    assert g.lines == 2 and g.faulty
    # all the blame lands on the group, once: 1 - (0.9 * 0.99) ** 0.5 per line pair, not split in two
    assert g.p == pytest.approx(0.0557, abs=0.01)


def rng_lines(
    rng: np.random.Generator, truth: dict[str, float], paths: list[tuple[str, ...]], k: int
) -> list[MediaLine]:
    out = []
    for i in range(k):
        path = paths[i % len(paths)]
        n = int(rng.integers(100, 1000))
        good = math.prod(1 - truth.get(c, 0.0) for c in path)
        out.append(MediaLine(float(i), path, n, int(rng.binomial(n, good))))
    return out


SUBNETS = {"wifi-1": "paris", "wifi-2": "paris", "lan-1": "lyon", "lan-2": "lyon"}
SERVERS = {"srv-a": "paris", "srv-b": "paris", "srv-c": "lyon"}


def route(sub: str, srv: str) -> tuple[str, ...]:
    a, b = SUBNETS[sub], SERVERS[srv]
    return (sub, a, srv) if a == b else (sub, a, f"{a}>{b}", b, srv)


PATHS = [route(s, v) for s in SUBNETS for v in SERVERS]


@pytest.mark.parametrize(
    ("truth", "l1"),
    [
        ({"wifi-1": 0.046}, 0.0),
        ({"lyon>paris": 0.05}, 0.0),
        ({"srv-a": 0.03, "srv-b": 0.03}, 0.0),
        ({}, 0.0),
        ({"wifi-1": 0.046}, L1_DEFAULT),
        # Every line through paris also passes wifi-1, wifi-2 or lyon>paris: the likelihood is
        # flat along moving paris's blame onto those three; the sparsity prior picks paris.
        ({"paris": 0.02, "lan-2": 0.08}, L1_DEFAULT),
    ],
)
def test_recovers_injected_faults_on_a_small_topology(truth: dict[str, float], l1: float) -> None:
    rng = np.random.default_rng(7)
    ests = infer_slot(rng_lines(rng, truth, PATHS, 1400), l1=l1)
    faulty = {e.component for e in ests if e.faulty}
    assert faulty == set(truth)
    for e in ests:
        assert isinstance(e.component, str)
        p_true = truth.get(e.component, 0.0)
        assert e.lo - 1e-3 <= p_true <= e.hi + 1e-3, e
        assert abs(e.p - p_true) < 0.01, e


def test_slots_group_lines_by_start() -> None:
    lines = [MediaLine(t, ("a",), 10, 10) for t in (5.0, 899.9, 900.0, 2000.0)]
    got = [(s, len(g)) for s, g in slots(lines, 900)]
    assert got == [(0.0, 2), (900.0, 1), (1800.0, 1)]


def test_empty_slot_is_an_error() -> None:
    with pytest.raises(QosError, match="empty slot"):
        infer_slot([])


def test_predict_weighs_recent_slots_more_and_adds_over_the_path() -> None:
    old = [Estimate("a", 0.10, 0.08, 0.12, 10, True), Estimate("b", 0.0, 0.0, 0.01, 10, False)]
    new = [Estimate("a", 0.02, 0.01, 0.03, 10, True), Estimate(("b", "c"), 0.01, 0.0, 0.02, 10, False)]
    fc = predict_path(("a", "b", "c", "zz"), [(0.0, old), (900.0, new)], half_life=1.0)
    xa = (1.0 * -math.log(0.98) + 0.5 * -math.log(0.90)) / 1.5  # newest weighs 1, one slot older 0.5
    xb = (1.0 * -math.log(0.99) + 0.5 * 0.0) / 1.5  # b's group (b, c) is charged once
    assert fc.p == pytest.approx(-math.expm1(-(xa + xb)), rel=1e-9)
    assert fc.lo <= fc.p <= fc.hi
    assert fc.unknown == ("zz",) and fc.slots == 2


@settings(max_examples=40, deadline=None)
@given(slot_lines())
def test_estimate_meets_the_optimality_conditions(lines: list[MediaLine]) -> None:
    """KKT of max l(x), x >= 0 (concave: these make it the global optimum): dl/dx_j = 0 where x_j > 0,
    dl/dx_j <= 0 where x_j = 0; checked per unit of data, after the polish to full precision."""
    ests = infer_slot(lines, l1=0.0)
    x = {
        c: -math.log1p(-e.p)
        for e in ests
        for c in ((e.component,) if isinstance(e.component, str) else e.component)
    }
    units = sum(ln.n for ln in lines)
    for e in ests:
        members = {e.component} if isinstance(e.component, str) else set(e.component)
        grad = 0.0
        for ln in lines:
            if members & set(ln.path):
                s = sum(x[c] for c in set(ln.path))
                grad += (ln.n - ln.m) / math.expm1(max(s, 1e-12)) - ln.m if ln.n > ln.m else -ln.m
        if e.p >= 0.999999:  # capped at X_MAX: only an upper bound binds
            assert grad >= -1e-10 * units
        elif e.p > 1e-9:
            assert abs(grad) <= 1e-10 * units, (e, grad / units)
        else:
            assert grad <= 1e-10 * units, (e, grad / units)


# The localisation lab's tree (iqn_lab/localise/plan.py): two servers -> core -> rtr-1 -> sub-a, sub-b;
# core -> rtr-2 -> sub-c. rtr-1's column is the sum of sub-a's and sub-b's: blame can slide between
# "rtr-1 + sub-a" and "sub-a + sub-b" without changing the likelihood.
def lab_lines(bad: dict[str, list[int]], watched: int = 30) -> list[MediaLine]:
    router = {"sub-a": "rtr-1", "sub-b": "rtr-1", "sub-c": "rtr-2"}
    return [MediaLine(0.0, (f"srv-{1 + i % 2}", "core", router[sub], sub), watched, watched - b)
            for sub, bads in bad.items() for i, b in enumerate(bads)]


def test_one_stalled_viewer_beside_a_faulty_subnet_flags_no_healthy_router() -> None:
    """The live localisation run's false flag: sub-a's access link faulty (12 of 30 s stalled
    per viewer), and one viewer of sub-b (same router, healthy link) stalled 10 s once. "rtr-1 a
    little, sub-a the rest" and "sub-a, and sub-b a little" fit exactly alike with two components
    each; the sparsity prior picked rtr-1 and its narrow interval flagged it. Only sub-a is needed."""
    ests = by_id(infer_slot(lab_lines({"sub-a": [12] * 10, "sub-b": [10] + [0] * 9, "sub-c": [0] * 10})))
    assert {c for c, e in ests.items() if e.faulty} == {"sub-a"}
    assert ests["rtr-1"].p > 0.02 and ests["rtr-1"].lo == 0.0  # blamed in x_hat, not needed by the data
    assert ests["sub-a"].lo > 0.3


@pytest.mark.parametrize(
    ("bad", "flagged"),
    [
        # every child of rtr-1 degraded alike: rtr-1 alone is sparser than sub-a + sub-b
        ({"sub-a": [6] * 10, "sub-b": [6] * 10, "sub-c": [0] * 10}, {"rtr-1"}),
        # every subnet alike: core alone (srv-1 + srv-2 or rtr-1 + rtr-2 would be two)
        ({"sub-a": [6] * 10, "sub-b": [6] * 10, "sub-c": [6] * 10}, {"core"}),
        ({"sub-a": [12] * 10, "sub-b": [0] * 10, "sub-c": [0] * 10}, {"sub-a"}),
    ],
)
def test_a_parent_the_data_need_stays_flagged(bad: dict[str, list[int]], flagged: set[str]) -> None:
    ests = infer_slot(lab_lines(bad))
    assert {e.component for e in ests if e.faulty} == flagged
