"""Score a slot's estimates against the synthetic ground truth (sans-I/O).

Truth: the true p of every component on a line of the slot; a component is
*truly faulty* when its p exceeds ``threshold`` (the same 0.01 the estimators
use for their verdict).

Rules, per slot:

* an estimate is one component or one inseparable group (the MLE reports
  components that always appear together as one group); a *flagged* estimate
  (``faulty``) is correct when it contains at least one truly faulty
  component - the data cannot say which member it is, so blaming the group is
  the right answer, and the mean size of flagged groups is reported beside it
  so a huge group cannot hide;
* precision = correct flags / flags (1 when nothing is flagged);
* recall = truly faulty components inside some flagged estimate / truly
  faulty components (1 when none is faulty);
* F1 = 2PR / (P + R) (0 when both are 0), so a slot of the healthy scenario
  scores 1 with no flag and 0 with any false flag;
* absolute error of p, for every estimate: against 1 - prod(1 - p_i) over
  its members (a group's p is the rate of the group as a whole).

:func:`summarize` averages P, R, F1 over slots and pools the absolute errors
(MAE over all estimates of all slots).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import QosError


class EstimateLike(Protocol):
    @property
    def component(self) -> str | tuple[str, ...]: ...
    @property
    def p(self) -> float: ...
    @property
    def faulty(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class SlotScore:
    precision: float
    recall: float
    f1: float
    flags: int
    false_flags: int
    faulty: int  # truly faulty components in the slot
    missed: int
    abs_err: float  # sum over estimates of |p - true p|
    estimates: int
    flagged_members: int  # components inside flagged estimates


def members(component: str | tuple[str, ...]) -> tuple[str, ...]:
    return (component,) if isinstance(component, str) else tuple(component)


def score_slot(
    estimates: Iterable[EstimateLike], truth: Mapping[str, float], threshold: float = 0.01
) -> SlotScore:
    """Score one slot (see the module doc for the rules)."""
    faulty = {c for c, p in truth.items() if p > threshold}
    flags = correct = members_flagged = n_est = 0
    found: set[str] = set()
    err = 0.0
    for e in estimates:
        mem = members(e.component)
        n_est += 1
        good = 1.0
        for c in mem:
            good *= 1.0 - truth.get(c, 0.0)
        err += abs(e.p - (1.0 - good))
        if e.faulty:
            flags += 1
            members_flagged += len(mem)
            hit = faulty.intersection(mem)
            if hit:
                correct += 1
                found |= hit
    precision = correct / flags if flags else 1.0
    recall = len(found) / len(faulty) if faulty else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return SlotScore(precision, recall, f1, flags, flags - correct, len(faulty), len(faulty - found),
                     err, n_est, members_flagged)


@dataclass(frozen=True, slots=True)
class Summary:
    slots: int
    precision: float
    recall: float
    f1: float
    mae: float
    flags: int
    false_flags: int
    faulty: int
    missed: int
    mean_flag_size: float


def summarize(scores: Sequence[SlotScore]) -> Summary:
    """Mean per-slot precision, recall and F1; MAE pooled over every estimate."""
    k = len(scores)
    if k == 0:
        raise QosError("no slots to summarize")
    flags = sum(s.flags for s in scores)
    est = sum(s.estimates for s in scores)
    return Summary(
        slots=k,
        precision=sum(s.precision for s in scores) / k,
        recall=sum(s.recall for s in scores) / k,
        f1=sum(s.f1 for s in scores) / k,
        mae=sum(s.abs_err for s in scores) / est if est else 0.0,
        flags=flags,
        false_flags=sum(s.false_flags for s in scores),
        faulty=sum(s.faulty for s in scores),
        missed=sum(s.missed for s in scores),
        mean_flag_size=sum(s.flagged_members for s in scores) / flags if flags else 0.0,
    )
