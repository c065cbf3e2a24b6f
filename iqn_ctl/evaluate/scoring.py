"""The paper's scoring of inferred stalls against ground truth.

A real stall of at least ``significant`` seconds is matched by the first
inferred stall (in start order, not yet used) whose start is within
``tolerance`` of the real start and whose end is after the real start. MAE and
RMSE are over matched pairs' duration errors. An inferred stall that matches
no real stall, of any length, is a false positive.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from iqn_ctl.evaluate.traces import Stall

SIGNIFICANT = 0.4
TOLERANCE = 1.0


@dataclass(frozen=True, slots=True)
class Pair:
    real: Stall
    inferred: Stall

    @property
    def error(self) -> float:
        """Inferred minus real duration, seconds."""
        return self.inferred.duration - self.real.duration


@dataclass
class Score:
    real: int
    significant: int
    inferred: int
    matched: int
    false_positives: int
    pairs: list[Pair] = field(default_factory=list)
    #: significant real stalls nobody matched
    missed: list[Stall] = field(default_factory=list)
    false_positive_stalls: list[Stall] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return (self.inferred - self.false_positives) / self.inferred if self.inferred else math.nan

    @property
    def recall(self) -> float:
        return self.matched / self.significant if self.significant else math.nan

    @property
    def mae(self) -> float:
        errs = [abs(p.error) for p in self.pairs]
        return sum(errs) / len(errs) if errs else math.nan

    @property
    def rmse(self) -> float:
        errs = [p.error**2 for p in self.pairs]
        return math.sqrt(sum(errs) / len(errs)) if errs else math.nan

    def as_dict(self) -> dict[str, float | int | None]:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "real": self.real,
            "significant": self.significant,
            "inferred": self.inferred,
            "matched": self.matched,
            "false_positives": self.false_positives,
            "precision": num(self.precision),
            "recall": num(self.recall),
            "mae_ms": num(self.mae * 1000),
            "rmse_ms": num(self.rmse * 1000),
        }


def score(
    real: list[Stall],
    inferred: list[Stall],
    significant: float = SIGNIFICANT,
    tolerance: float = TOLERANCE,
) -> Score:
    real = sorted(real, key=lambda s: s.start)
    inferred = sorted(inferred, key=lambda s: s.start)
    inf_starts = [s.start for s in inferred]
    used: set[int] = set()
    pairs: list[Pair] = []
    missed: list[Stall] = []
    for r in real:
        hit = None
        for i in range(bisect.bisect_left(inf_starts, r.start - tolerance), len(inferred)):
            s = inferred[i]
            if i in used:
                continue
            if s.start > r.start + tolerance:
                break
            if abs(s.start - r.start) <= tolerance and s.end > r.start:
                hit = i
                break
        sig = r.duration >= significant
        if hit is None:
            if sig:
                missed.append(r)
            continue
        used.add(hit)
        if sig:
            pairs.append(Pair(r, inferred[hit]))
    fps = [s for i, s in enumerate(inferred) if i not in used]
    return Score(
        real=len(real),
        significant=sum(1 for r in real if r.duration >= significant),
        inferred=len(inferred),
        matched=len(pairs),
        false_positives=len(fps),
        pairs=pairs,
        missed=missed,
        false_positive_stalls=fps,
    )
