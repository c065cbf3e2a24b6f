"""Maximum-likelihood localisation of degraded components (sans-I/O).

Model (QoSaaS, Section 4): components fail independently, so a media line M
over components a_M is good per unit with probability prod(1 - p_i), and its
count of good units is binomial.  With x_i = -ln(1 - p_i) >= 0 and
s_M = a_M . x the log-likelihood is (up to constants)

    l(x) = sum_M (n_M - m_M) ln(1 - exp(-s_M)) - m_M s_M

Each term is concave in s (ln(1 - e^-s) has second derivative
-e^s / (e^s - 1)^2 < 0; -m s is linear) and s is linear in x, so l is concave
and the bounded problem max l(x), x >= 0 has a global optimum.  We minimise
-l(x)/N with L-BFGS-B on the analytic gradient A^T (m - b / expm1(s)), then
polish with a few projected Newton steps on the free (x > 0) components.

Sparsity: l is flat along some directions in layered topologies (a city's
column is the sum of its subnets' columns: blame can slide between them), so
the plain MLE splits blame arbitrarily.  By default an L1 fit (penalty
l1 * N * sum x, still convex; N the slot's units, so duplicating lines changes
nothing) chooses the support, and the estimate is the MLE refit on that support
(no shrinkage).  ``l1=0`` gives the plain MLE.

Identifiability: components whose columns in the slot's routing matrix are
identical (they always appear together) get one variable and are reported as
one group.  Components on no line get no estimate at all.

Intervals (95 % by default; given the chosen support):
* a component with x > 0: Wald interval on the x scale from the expected
  Fisher information of the free block, I = A_F^T diag(n / expm1(s)) A_F
  (inverted as a whole, so components sharing lines widen each other), mapped
  to p = 1 - exp(-x) and clipped at 0;
* a component at the boundary x = 0 (its lines are explained without it): a
  one-sided interval [0, hi], hi where the log-likelihood in x_i, the other
  components at their estimates, has dropped by chi2_1(0.90)/2 = 1.353.
``faulty`` means the interval lies above the threshold: lo > threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog, minimize

from .errors import QosError
from .lines import MediaLine

L1_DEFAULT = 1e-4  # per unit of data; chosen on the synth scenarios (docs/qos.md, "Sparsity")
X_MAX = 30.0  # p = 1 - e^-30: keeps p < 1 in floating point when every unit was bad
S_EPS = 1e-12  # floor of s inside ln(1 - e^-s): finite gradient when a bad line sits on x = 0
Z95 = 1.959963984540054
ONE_SIDED_DROP = 1.3527717903  # chi2_1 quantile 0.90 / 2: one-sided 95 % likelihood-ratio bound


@dataclass(frozen=True, slots=True)
class Estimate:
    """One component's (or inseparable group's) estimated bad-unit rate in one slot."""

    component: str | tuple[str, ...]
    p: float
    lo: float
    hi: float
    lines: int
    faulty: bool


@dataclass(frozen=True, slots=True)
class Problem:
    """A slot's lines as a routing matrix over merged (identifiable) component groups."""

    groups: list[tuple[str, ...]]  # column j -> its component ids (sorted)
    a: sp.csr_matrix  # unique paths x groups, 0/1
    bad: np.ndarray  # per unique path: sum of n - m
    good: np.ndarray  # per unique path: sum of m
    lines: np.ndarray  # per group: number of media lines through it
    at: sp.csr_matrix  # a transposed, once: the gradient needs it at every evaluation


#: a slot's sufficient statistics, one row per distinct set of components: (its ids, the
#: lines' bad units, their good units, how many lines); the MLE depends on nothing else
PathCounts = Sequence[tuple[Sequence[str], int, int, int]]


def path_counts(lines: Sequence[MediaLine]) -> list[tuple[tuple[str, ...], int, int, int]]:
    """The slot's lines aggregated by their set of components."""
    if not lines:
        raise QosError("empty slot: no media lines to infer from")
    rows: dict[frozenset[str], list[Any]] = {}
    for ln in lines:
        if not ln.path:
            raise QosError("a media line without a path (resolve client/server with --topology)")
        key = frozenset(ln.path)
        r = rows.get(key)
        if r is None:
            rows[key] = [ln.path, ln.n - ln.m, ln.m, 1]
        else:
            r[1] += ln.n - ln.m
            r[2] += ln.m
            r[3] += 1
    return [(p, b, g, k) for p, b, g, k in rows.values()]


def build_problem(lines: Sequence[MediaLine]) -> Problem:
    """Index components, merge identical columns into groups, aggregate identical paths."""
    return problem_of(path_counts(lines))


def problem_of(counts: PathCounts) -> Problem:
    """The problem of a slot's sufficient statistics (:func:`path_counts`, or the store's
    ``GROUP BY``): rows with the same set of components are merged, identical columns grouped.

    Rows and columns are numbered in one canonical order (paths by their sorted ids), so the
    answer depends on the lines, not on the order they came in: the linear programs of
    :func:`replaceable` return one of several basic solutions depending on the row order, and
    lines in another order could flip a flag (a store returns a slot's lines in any order)."""
    if not counts:
        raise QosError("empty slot: no media lines to infer from")
    merged: dict[tuple[str, ...], list[int]] = {}
    for path, b, g, k in counts:
        if not path:
            raise QosError("a media line without a path (resolve client/server with --topology)")
        ids = tuple(sorted(set(path)))
        acc = merged.get(ids)
        if acc is None:
            merged[ids] = [b, g, k]
        else:
            acc[0] += b
            acc[1] += g
            acc[2] += k
    comp_ix: dict[str, int] = {}
    path_ix: dict[frozenset[int], int] = {}
    bad: list[int] = []
    good: list[int] = []
    per_comp_lines: list[int] = []
    for path, (b, g, k) in sorted(merged.items()):
        cols = set()
        for c in path:
            j = comp_ix.setdefault(c, len(comp_ix))
            if j == len(per_comp_lines):
                per_comp_lines.append(0)
            cols.add(j)
        for j in cols:
            per_comp_lines[j] += k
        key = frozenset(cols)
        r = path_ix.setdefault(key, len(path_ix))
        if r == len(bad):
            bad.append(0)
            good.append(0)
        bad[r] += b
        good[r] += g
    rows = [r for key, r in path_ix.items() for _ in key]
    cols_ = [j for key in path_ix for j in key]
    full = sp.csc_matrix((np.ones(len(rows)), (rows, cols_)), shape=(len(path_ix), len(comp_ix)))
    full.sort_indices()
    # Identical columns <=> identical sets of unique paths: group by the row-index bytes.
    names = list(comp_ix)
    sig: dict[bytes, list[int]] = {}
    for j in range(full.shape[1]):
        sig.setdefault(full.indices[full.indptr[j] : full.indptr[j + 1]].tobytes(), []).append(j)
    members = sorted(sig.values(), key=lambda js: min(names[j] for j in js))
    groups = [tuple(sorted(names[j] for j in js)) for js in members]
    a = full[:, [js[0] for js in members]].tocsr()
    glines = np.array([max(per_comp_lines[j] for j in js) for js in members])
    return Problem(groups, a, np.array(bad, float), np.array(good, float), glines, a.T.tocsr())


def _objective(x: np.ndarray, prob: Problem, lam: float, scale: float) -> tuple[float, np.ndarray]:
    """-l(x)/scale + lam/scale * sum x and its gradient."""
    s = prob.a @ x
    se = np.maximum(s, S_EPS)
    has_bad = prob.bad > 0
    ll = float(np.sum(prob.bad[has_bad] * np.log(-np.expm1(-se[has_bad])))) - float(prob.good @ s)
    dlds = np.zeros_like(s)
    dlds[has_bad] = prob.bad[has_bad] / np.expm1(se[has_bad])
    dlds -= prob.good
    grad = prob.at @ dlds
    f = (-ll + lam * float(x.sum())) / scale
    return f, (-grad + lam) / scale


def _fit(prob: Problem, x0: np.ndarray, lam: float, scale: float, upper: np.ndarray) -> np.ndarray:
    """Minimise -l/scale + lam/scale * sum x over 0 <= x <= upper (L-BFGS-B, then the polish)."""
    res = minimize(
        _objective,
        np.minimum(x0, upper),
        args=(prob, lam, scale),
        jac=True,
        method="L-BFGS-B",
        bounds=list(zip(np.zeros_like(upper), upper, strict=True)),
        options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10},
    )
    return _polish(np.clip(res.x, 0.0, upper), prob, lam, scale, upper=upper)


def solve(prob: Problem, *, l1: float = 0.0) -> np.ndarray:
    """The MLE of x per group; with ``l1 > 0`` the MLE on the support an L1 fit selects.

    ``l1`` is per unit of data (the penalty is l1 * N * sum x with N the slot's units), so
    duplicating every line changes nothing.  The penalised fit only chooses which groups
    carry blame; the estimates are then refit without penalty on that support (no
    shrinkage: a single component still gets exactly (n - m) / n)."""
    k = prob.a.shape[1]
    scale = float(prob.bad.sum() + prob.good.sum())
    # Start from each group's own line-average bad rate, split over an average path.
    deg = np.asarray(prob.a.sum(axis=1)).ravel()
    tot = prob.bad + prob.good
    rate = np.asarray(prob.at @ prob.bad).ravel() / np.maximum(np.asarray(prob.at @ tot).ravel(), 1)
    mean_len = float(np.average(deg, weights=tot))
    x0 = np.clip(-np.log1p(-np.minimum(rate, 0.999)) / max(mean_len, 1.0), 0.0, X_MAX)
    upper = np.full(k, X_MAX)
    x = _fit(prob, x0, l1 * scale, scale, upper)
    if l1 > 0:
        upper = np.where(x > 1e-9, X_MAX, 0.0)
        x = _fit(prob, x, 0.0, scale, upper)
    return x


def _hessian_w(s: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """-d2 l / ds2 per path: b e^s / (e^s - 1)^2 (observed information in s)."""
    se = np.maximum(s, S_EPS)
    em = np.expm1(se)
    return np.where(bad > 0, bad * (em + 1.0) / (em * em), 0.0)


def _kkt(x: np.ndarray, g: np.ndarray, upper: np.ndarray) -> float:
    """Largest violation of the optimality conditions: g = 0 inside, g >= 0 at 0, g <= 0 at the top."""
    viol = np.where(x > 1e-10, np.abs(g), np.maximum(-g, 0.0))
    viol[(x >= upper) & (g <= 0)] = 0.0
    return float(viol.max(initial=0.0))


def _polish(
    x: np.ndarray, prob: Problem, lam: float, scale: float, steps: int = 5, *, upper: np.ndarray
) -> np.ndarray:
    """Projected Newton steps on the free set: the quasi-Newton answer to full precision.

    Steps are judged by the optimality residual, not by f: near the optimum f changes
    below its floating-point resolution while the gradient still shrinks quadratically."""
    _, g = _objective(x, prob, lam, scale)
    r = _kkt(x, g, upper)
    for _ in range(steps):
        if r < 1e-14:
            break
        free = np.flatnonzero(((x > 1e-10) | (g < 0)) & (x < upper))
        if free.size == 0:
            break
        af = prob.a[:, free]
        w = _hessian_w(prob.a @ x, prob.bad) / scale
        h = (af.T @ sp.diags(w) @ af).toarray()
        try:
            d = np.linalg.solve(h + 1e-12 * np.eye(free.size), g[free])
        except np.linalg.LinAlgError:
            break
        t = 1.0
        while t > 1e-4:
            xn = x.copy()
            xn[free] = np.clip(x[free] - t * d, 0.0, upper[free])
            _, gn = _objective(xn, prob, lam, scale)
            rn = _kkt(xn, gn, upper)
            if rn < r:
                break
            t /= 2
        else:
            break
        x, g, r = xn, gn, rn
    return x


def _upper_one_sided(bound: np.ndarray, x: np.ndarray, prob: Problem) -> np.ndarray:
    """hi (x scale) for groups at x = 0: where the log-likelihood in x_j alone (the others at
    their estimates) has dropped by ONE_SIDED_DROP.  Vectorised bisection over all of them:
    the drop is convex in x_j, so {x_j : drop < D} is an interval starting at 0."""
    sub = prob.a[:, bound].tocoo()
    r, j = sub.row, sub.col
    s_rest = (prob.a @ x)[r] - x[bound][j]
    b, g = prob.bad[r], prob.good[r]

    def ll(h: np.ndarray) -> np.ndarray:
        s = s_rest + h[j]
        terms = np.where(b > 0, b * np.log(-np.expm1(-np.maximum(s, S_EPS))), 0.0) - g * s
        return np.bincount(j, weights=terms, minlength=bound.size)

    l0 = ll(x[bound])
    lo = x[bound].copy()
    hi = np.full(bound.size, X_MAX)
    inside = l0 - ll(hi) < ONE_SIDED_DROP  # never drops enough: hi stays at X_MAX
    for _ in range(64):
        mid = (lo + hi) / 2
        below = l0 - ll(mid) < ONE_SIDED_DROP
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return np.where(inside, X_MAX, hi)


def _intervals(x: np.ndarray, prob: Problem, z: float) -> tuple[np.ndarray, np.ndarray]:
    lo = np.zeros_like(x)
    hi = np.zeros_like(x)
    free = np.flatnonzero(x > 1e-9)
    if free.size:
        s = prob.a @ x
        tot = prob.bad + prob.good
        w = tot / np.expm1(np.maximum(s, S_EPS))
        af = prob.a[:, free]
        info = (af.T @ sp.diags(w) @ af).toarray()
        cov = np.linalg.pinv(info, hermitian=True)
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
        lo[free] = np.maximum(x[free] - z * sd, 0.0)
        hi[free] = np.minimum(x[free] + z * sd, X_MAX)
    bound = np.flatnonzero(x <= 1e-9)
    if bound.size:
        hi[bound] = _upper_one_sided(bound, x, prob)
    return lo, hi


def _sparse_support(prob: Problem, s: np.ndarray, x_thr: float, without: int | None = None) -> int | None:
    """How many groups an L1-minimal x >= 0 with A x = s (a basic solution of the linear
    program: sparse) blames above ``x_thr``, with x_without = 0 if given; None when no such
    x exists."""
    k = prob.a.shape[1]
    bounds = [(0.0, 0.0) if i == without else (0.0, None) for i in range(k)]
    res = linprog(np.ones(k), A_eq=prob.a, b_eq=s, bounds=bounds, method="highs")
    if res.status != 0 or res.x is None:
        return None
    if float(np.max(np.abs(prob.a @ res.x - s), initial=0.0)) > 1e-7 * max(1.0, float(s.max(initial=0.0))):
        return None
    return int(np.count_nonzero(res.x > x_thr))


def replaceable(x: np.ndarray, prob: Problem, j: int, threshold: float, sparsest: int | None = None) -> bool:
    """Can group ``j``'s blame be put elsewhere: is there an equally likely explanation
    (the same fitted path sums A x, hence the same likelihood) with x_j = 0 that blames no
    more groups above ``threshold`` than the sparsest explanation with ``j`` free
    (``sparsest``: computed when not given)?

    Why: along a flat direction the sparsity prior picks one of several explanations that
    fit the data exactly as well. In a tree, a parent's column is the sum of its children's,
    so when one child is badly degraded and a sibling a little (one viewer's stall), "the
    parent a little, the bad child the rest" and "each child its own" fit the same with two
    components each; L1 prefers the parent (it counts the shared part once), and the
    parent's interval, conditional on that choice and narrow (it has every line of its
    children), flagged a healthy router. A component is only flagged when the data need it:
    no equally likely, equally sparse explanation does without it. When every child is
    degraded alike, the parent alone (one component) is sparser than the children (several)
    and stays flagged. Sparsity counts the groups blamed above the threshold (what a flag
    means), so blame too small to flag anything (noise fitted on a few lines) does not make
    an explanation look less sparse; it is judged on L1-minimal basic solutions of the linear
    program A x = A x_hat, x >= 0 (sparse, though not always the sparsest), and on x_hat
    itself: not finding a small enough one keeps the flag, so the check only ever removes
    flags."""
    x_thr = -math.log1p(-threshold)
    s = prob.a @ x
    if sparsest is None:
        sparsest = _sparsest(x, prob, x_thr)
    without = _sparse_support(prob, s, x_thr, without=j)
    return without is not None and without <= sparsest


def _sparsest(x: np.ndarray, prob: Problem, x_thr: float) -> int:
    """Groups blamed above ``x_thr`` by x_hat or by the L1-minimal equally likely x, the fewer."""
    own = int(np.count_nonzero(x > x_thr))
    free = _sparse_support(prob, prob.a @ x, x_thr)
    return own if free is None else min(own, free)


def infer_slot(
    lines: Sequence[MediaLine], *, threshold: float = 0.01, l1: float = L1_DEFAULT, z: float = Z95
) -> list[Estimate]:
    """Estimate every component (or inseparable group) seen on ``lines``; worst first."""
    if not 0.0 <= threshold < 1.0:
        raise QosError(f"threshold must be in [0, 1), got {threshold}")
    return infer_counts(path_counts(lines), threshold=threshold, l1=l1, z=z)


def infer_counts(
    counts: PathCounts, *, threshold: float = 0.01, l1: float = L1_DEFAULT, z: float = Z95
) -> list[Estimate]:
    """:func:`infer_slot` from the slot's sufficient statistics (:func:`path_counts`): the store
    and the live service aggregate a slot's lines with one ``GROUP BY`` instead of reading
    every line into Python (tested: the same estimates as from the lines, in any order).

    Not warm-started from the slot's previous estimates: tried, it saved 20-30 % of the fit
    but changed which tiny components the L1 stage kept (p up to 1.5e-3 apart on unflagged
    components), and a component starting at 0 on a bad path sent the fit to X_MAX."""
    if not 0.0 <= threshold < 1.0:
        raise QosError(f"threshold must be in [0, 1), got {threshold}")
    prob = problem_of(counts)
    x = solve(prob, l1=l1)
    lo, hi = _intervals(x, prob, z)
    # a flag only where the data need the blame (the lower end of a component that could
    # not be flagged anyway is left as it is: one linear program per candidate flag)
    need = np.flatnonzero(-np.expm1(-lo) > threshold)
    sparsest = _sparsest(x, prob, -math.log1p(-threshold)) if need.size else 0
    for j in need:
        if replaceable(x, prob, int(j), threshold, sparsest):
            lo[j] = 0.0
    p, plo, phi = (-np.expm1(-v) for v in (x, lo, hi))
    out = [
        Estimate(
            component=g[0] if len(g) == 1 else g,
            p=float(p[j]),
            lo=float(plo[j]),
            hi=float(phi[j]),
            lines=int(prob.lines[j]),
            faulty=bool(plo[j] > threshold),
        )
        for j, g in enumerate(prob.groups)
    ]
    out.sort(key=lambda e: (-e.p, str(e.component)))
    return out


def slot_of(t: float, slot_s: float) -> float:
    """Start (epoch s) of the slot holding time t."""
    return math.floor(t / slot_s) * slot_s


def slots(lines: Iterable[MediaLine], slot_s: float = 900) -> Iterator[tuple[float, list[MediaLine]]]:
    """Group lines by slot (by their start t), in slot order."""
    if slot_s <= 0:
        raise QosError(f"slot length must be positive, got {slot_s}")
    by: dict[float, list[MediaLine]] = {}
    for ln in lines:
        by.setdefault(slot_of(ln.t, slot_s), []).append(ln)
    for start in sorted(by):
        yield start, by[start]
