"""Expected bad-unit rate of a path from recent slots' estimates (sans-I/O).

Recent slots weigh more: the estimate of slot k slots before the latest one
weighs 0.5 ** (k / half_life).  Per component we average x = -ln(1 - p) and the
interval ends on the x scale with these weights (over the slots where it had
lines), then add over the path's components (independent failures multiply
the good probabilities, so x adds): p_path = 1 - exp(-sum x).  The path's
interval adds the components' lower ends and their upper ends, which is
conservative (it does not assume the components' errors cancel).  A component
inside an inseparable group is charged with the whole group's estimate, once
per path.  Components with no estimate in those slots add nothing and are
listed as ``unknown``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import QosError
from .mle import Estimate


@dataclass(frozen=True, slots=True)
class Forecast:
    path: tuple[str, ...]
    p: float
    lo: float
    hi: float
    slots: int  # how many slots contributed
    unknown: tuple[str, ...]


def _x(p: float) -> float:
    return -math.log1p(-min(p, 1.0 - 1e-15))


def predict_path(
    path: Sequence[str], history: Sequence[tuple[float, Sequence[Estimate]]], *, half_life: float = 1.0
) -> Forecast:
    """Combine ``history`` (slot start, that slot's estimates), any order, into a path forecast."""
    if not path:
        raise QosError("empty path")
    if half_life <= 0:
        raise QosError(f"half-life must be positive, got {half_life}")
    ordered = sorted(history, key=lambda h: h[0], reverse=True)
    # key of an estimate (a group is one key) -> [sum w, sum w x, sum w xlo, sum w xhi]
    acc: dict[str | tuple[str, ...], list[float]] = {}
    owner: dict[str, str | tuple[str, ...]] = {}
    used = 0
    for age, (_, ests) in enumerate(ordered):
        w = 0.5 ** (age / half_life)
        hit = False
        for e in ests:
            ids = (e.component,) if isinstance(e.component, str) else e.component
            on_path = [c for c in ids if c in path]
            if not on_path:
                continue
            hit = True
            for c in on_path:
                owner.setdefault(c, e.component)
            a = acc.setdefault(owner[on_path[0]], [0.0, 0.0, 0.0, 0.0])
            a[0] += w
            a[1] += w * _x(e.p)
            a[2] += w * _x(e.lo)
            a[3] += w * _x(e.hi)
        used += hit
    unknown = tuple(c for c in dict.fromkeys(path) if c not in owner)
    if len(unknown) == len(set(path)):
        raise QosError(f"no estimate for any component of {','.join(path)} in the stored slots")
    x = sum(a[1] / a[0] for a in acc.values())
    xlo = sum(a[2] / a[0] for a in acc.values())
    xhi = sum(a[3] / a[0] for a in acc.values())
    return Forecast(tuple(path), -math.expm1(-x), -math.expm1(-xlo), -math.expm1(-xhi), used, unknown)
