"""A slot inferred from its sufficient statistics (the store's ``GROUP BY`` of the lines, what
``iqn-qos serve`` re-solves when late lines arrive) equals the from-scratch solve on every line.

Tolerance: 1e-12 on p, lo and hi (the routing matrix is built in one canonical order, so the
computation is the same and the answers are in fact identical); groups, line counts and flags exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iqn_qos.lines import MediaLine
from iqn_qos.mle import Estimate, infer_counts, infer_slot, path_counts
from iqn_qos.store import Store

TOL = 1e-12
SLOT_S = 900.0


def assert_same(got: list[Estimate], want: list[Estimate]) -> None:
    g = {e.component: e for e in got}
    w = {e.component: e for e in want}
    assert g.keys() == w.keys()
    for k, e in w.items():
        o = g[k]
        assert (o.lines, o.faulty) == (e.lines, e.faulty), (k, o, e)
        assert abs(o.p - e.p) <= TOL and abs(o.lo - e.lo) <= TOL and abs(o.hi - e.hi) <= TOL, (k, o, e)


def random_slot(seed: int, n_lines: int, t0: float = 0.0) -> list[MediaLine]:
    """Lines over a random tree (servers -> core links -> cities -> subnets) with random faults;
    paths in random order, some naming a component twice (it counts once)."""
    rng = np.random.default_rng(seed)
    servers = [f"s{i}" for i in range(int(rng.integers(1, 4)))]
    cities = [f"c{i}" for i in range(int(rng.integers(2, 6)))]
    subnets = {c: [f"{c}-n{j}" for j in range(int(rng.integers(1, 5)))] for c in cities}
    comps = servers + cities + [f"{s}>{c}" for s in servers for c in cities] + sum(subnets.values(), [])
    p = {c: (float(rng.uniform(0.02, 0.3)) if rng.random() < 0.15 else 0.0) for c in comps}
    out = []
    for _ in range(n_lines):
        s = servers[int(rng.integers(len(servers)))]
        c = cities[int(rng.integers(len(cities)))]
        sub = subnets[c][int(rng.integers(len(subnets[c])))]
        path = [s, f"{s}>{c}", c, sub]
        if rng.random() < 0.1:
            path.append(path[int(rng.integers(len(path)))])
        rng.shuffle(path)
        n = int(rng.integers(1, 900))
        good = float(np.prod([1 - p[x] for x in set(path)]))
        out.append(MediaLine(t0 + float(rng.uniform(0, SLOT_S)), tuple(path), n, int(rng.binomial(n, good))))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_store_counts_equal_the_from_scratch_solve(seed: int, tmp_path: object) -> None:
    """Lines stored in random batches (as the service stores them), then late lines: each time
    the store's answer (from its GROUP BY) is the from-scratch answer on every line so far."""
    lines = random_slot(seed, 3000)
    rnd = random.Random(seed)
    with Store(":memory:") as st:
        k = 0
        for late in (2000, 2600, 3000):  # the slot, then two rounds of late lines
            while k < late:
                step = rnd.randint(1, 700)
                st.add_lines(lines[k:min(k + step, late)])
                k = min(k + step, late)
            got = st.infer(0.0, SLOT_S, l1=1e-4)
            so_far = lines[:late]
            rnd.shuffle(so_far)
            assert_same(got, infer_slot(so_far, l1=1e-4))
            cached = st.cached(0.0, SLOT_S, 0.01, 1e-4)  # stamped with what it was computed from
            assert cached is not None
            assert_same(cached, got)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 400), st.sampled_from([0.0, 1e-4, 1e-2]))
def test_counts_equal_lines_in_any_order(seed: int, n: int, l1: float) -> None:
    lines = random_slot(seed, n)
    shuffled = list(lines)
    random.Random(seed).shuffle(shuffled)
    counts = path_counts(shuffled)
    assert sum(k for *_, k in counts) == n
    assert_same(infer_counts(counts, l1=l1), infer_slot(lines, l1=l1))
