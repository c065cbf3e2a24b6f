"""The localisation baselines the QoSaaS paper argues against (sans-I/O).

Each takes one slot's media lines and returns :class:`iqn_qos.mle.Estimate`
records (one per component on a line, never grouped), so the benchmark scores
them exactly like the MLE.  None of them has a confidence interval: ``lo`` and
``hi`` equal ``p``, and ``faulty`` is the point estimate's verdict.

* :func:`linear`: least squares on each line's log good-fraction,
  -ln(m/n) ~ sum over the path of x_i with x_i = -ln(1 - p_i), every line with
  the same weight whatever its length (sparse LSQR), x clipped at 0;
* :func:`boolean`: boolean tomography. A line is bad when its bad fraction
  exceeds ``tol``; greedily take the component that explains the most
  still-unexplained bad lines until all are explained (the classic
  smallest-set-cover heuristic), among components whose hit ratio (share of
  their lines that are bad) is at least ``min_hit`` - the noise-tolerant form
  (Kompella et al.'s Tomo); strict exoneration by one good line fails at any
  loss rate under 100 %.  A chosen component's p is the pooled bad rate of its
  lines, the others' 0;
* :func:`average`: each component's p is the mean bad fraction of the lines
  through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import lsqr

from .errors import QosError
from .lines import MediaLine
from .mle import Estimate

P_MAX = 1.0 - 1e-9  # clip into [0, 1)


def routing(lines: Sequence[MediaLine]) -> tuple[list[str], sp.csr_matrix, np.ndarray, np.ndarray]:
    """Component ids, the 0/1 lines x components matrix, and per line n and m."""
    if not lines:
        raise QosError("empty slot: no media lines to infer from")
    ix: dict[str, int] = {}
    indices: list[int] = []
    indptr = [0]
    for ln in lines:
        if not ln.path:
            raise QosError("a media line without a path (resolve client/server with --topology)")
        cols = {ix.setdefault(c, len(ix)) for c in ln.path}
        indices.extend(sorted(cols))
        indptr.append(len(indices))
    a = sp.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(len(lines), len(ix)))
    n = np.array([ln.n for ln in lines], float)
    m = np.array([ln.m for ln in lines], float)
    return list(ix), a, n, m


def _estimates(ids: list[str], p: np.ndarray, flagged: np.ndarray, a: sp.csr_matrix) -> list[Estimate]:
    counts = np.asarray(a.sum(axis=0)).ravel().astype(int)
    out = [Estimate(c, float(p[j]), float(p[j]), float(p[j]), int(counts[j]), bool(flagged[j]))
           for j, c in enumerate(ids)]
    out.sort(key=lambda e: (-e.p, str(e.component)))
    return out


def linear(lines: Sequence[MediaLine], *, threshold: float = 0.01) -> list[Estimate]:
    """Unweighted least squares on -ln(good fraction); a line with m = 0 counts as m = 1/2."""
    ids, a, n, m = routing(lines)
    y = -np.log(np.maximum(m, 0.5) / n)
    x = lsqr(a, y, atol=1e-10, btol=1e-10, iter_lim=10 * a.shape[1] + 100)[0]
    p = np.clip(-np.expm1(-np.maximum(x, 0.0)), 0.0, P_MAX)
    return _estimates(ids, p, p > threshold, a)


def boolean(
    lines: Sequence[MediaLine], *, threshold: float = 0.01, tol: float = 0.01, min_hit: float = 0.5
) -> list[Estimate]:
    """Greedy smallest set of components explaining the bad lines (see the module doc).

    ``threshold`` is unused by the verdict (a component is faulty iff chosen);
    it is accepted so all estimators share one call signature.
    """
    ids, a, n, m = routing(lines)
    bad_line = (n - m) / n > tol
    csc = a.tocsc()
    per_comp = [csc.indices[csc.indptr[j] : csc.indptr[j + 1]] for j in range(a.shape[1])]
    n_lines = np.diff(csc.indptr)
    hit = np.array([bad_line[r].sum() for r in per_comp]) / np.maximum(n_lines, 1)
    cand = np.flatnonzero(hit >= min_hit)
    unexplained = bad_line.copy()
    chosen = np.zeros(a.shape[1], bool)
    while unexplained.any() and cand.size:
        gain = np.array([unexplained[per_comp[j]].sum() for j in cand])
        best = int(np.argmax(gain))
        if gain[best] == 0:
            break
        j = int(cand[best])
        chosen[j] = True
        unexplained[per_comp[j]] = False
        cand = np.delete(cand, best)
    bad_units = csc.T @ (n - m)
    units = csc.T @ n
    p = np.where(chosen, np.clip(bad_units / np.maximum(units, 1), 0.0, P_MAX), 0.0)
    return _estimates(ids, p, chosen, a)


def average(lines: Sequence[MediaLine], *, threshold: float = 0.01) -> list[Estimate]:
    """Each component: the mean bad fraction of its lines; faulty above ``threshold``."""
    ids, a, n, m = routing(lines)
    frac = (n - m) / n
    counts = np.asarray(a.sum(axis=0)).ravel()
    p = np.clip((a.T @ frac) / np.maximum(counts, 1), 0.0, P_MAX)
    return _estimates(ids, p, p > threshold, a)


BASELINES = {"linear": linear, "boolean": boolean, "average": average}
