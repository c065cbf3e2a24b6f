"""The paper's scoring of inferred stalls against ground truth.

A real stall of at least ``significant`` seconds is matched by the first
inferred stall (in start order, not yet used) whose start is within
``tolerance`` of the real start and whose end is after the real start. MAE and
RMSE are over matched pairs' duration errors. An inferred stall that matches
no real stall, of any length, is a false positive.

"At least 0.4 s" and "within 1 s" are inclusive, as the paper words them;
"after" is strict: an inferred stall ending at the very instant the real one
starts does not overlap it. Times that differ by
less than :data:`RESOLUTION` count as equal, so a boundary written exactly in
decimal (``S-1700000100.002`` / ``E-1700000100.402`` is 0.3999999 s as floats)
lands on the side the text says. Ties in start time are broken by end time, so
the score never depends on the order of the input.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from iqn_ctl.evaluate.traces import Stall

SIGNIFICANT = 0.4
TOLERANCE = 1.0
#: Below this, two times are the same instant. An epoch float near 1.7e9 is
#: rounded to 2**-22 s (0.24 us), so a difference of two carries up to about
#: 0.5 us of rounding (1 us up to year 2106); no trace is more precise than 1 us.
RESOLUTION = 1e-6


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
    def is_significant(r: Stall) -> bool:
        return r.duration >= significant - RESOLUTION

    # (start, end): equal starts must not leave the pick to the input's order
    real = sorted(real, key=lambda s: (s.start, s.end))
    inferred = sorted(inferred, key=lambda s: (s.start, s.end))
    inf_starts = [s.start for s in inferred]
    reach = tolerance + RESOLUTION
    used: set[int] = set()
    pairs: list[Pair] = []
    missed: list[Stall] = []
    for r in real:
        hit = None
        for i in range(bisect.bisect_left(inf_starts, r.start - reach), len(inferred)):
            s = inferred[i]
            if i in used:
                continue
            if s.start > r.start + reach:
                break
            if abs(s.start - r.start) <= reach and s.end - r.start > RESOLUTION:
                hit = i
                break
        sig = is_significant(r)
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
        significant=sum(1 for r in real if is_significant(r)),
        inferred=len(inferred),
        matched=len(pairs),
        false_positives=len(fps),
        pairs=pairs,
        missed=missed,
        false_positive_stalls=fps,
    )


def pool(scores: list[Score]) -> Score:
    """Many runs scored as one: counts add up and MAE/RMSE are over all the
    runs' pairs, so a run with many stalls weighs more than a short one (as
    the paper pools news and music)."""
    return Score(
        real=sum(s.real for s in scores),
        significant=sum(s.significant for s in scores),
        inferred=sum(s.inferred for s in scores),
        matched=sum(s.matched for s in scores),
        false_positives=sum(s.false_positives for s in scores),
        pairs=[p for s in scores for p in s.pairs],
        missed=[m for s in scores for m in s.missed],
        false_positive_stalls=[f for s in scores for f in s.false_positive_stalls],
    )
