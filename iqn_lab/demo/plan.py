"""The demo's bottleneck timetable: starve, release, starve again.

Why this shape: the emulator's player (MSE) keeps about 4 s of video buffered
ahead and fetches one-second segments. Squeezing the link to a starving rate
lets that buffer drain; the spinner shows once it is empty and hides as soon
as the link is released and the next segment lands. A starve period of S
seconds therefore gives one stall of roughly ``S - drain`` seconds, and the
release period lets the buffer refill before the next squeeze, so stalls come
one per period with lengths we choose (plus the buffer's natural variation).
The starving rate is low enough that no segment completes during a squeeze
(no stall is cut short), yet lets the page connection's small autoplay
answers through.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from iqn_lab.shaping import Step, format_rate, parse_rate

#: seconds from squeeze to spinner: the ~4 s buffer plus the segment in flight
DRAIN = 4.2
#: stall lengths the plan aims at (seconds): the paper's range, spread out
TARGETS = (0.6, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)


@dataclass(frozen=True)
class Plan:
    steps: list[Step]
    targets: list[float]  # intended stall length of each squeeze
    warmup: float
    end: float  # seconds from the start until the last release has played out

    def spec(self) -> str:
        """The ``iqn-lab up --schedule`` form, to re-run the same timetable by hand."""
        return ",".join(f"{s.at:g}:{format_rate(s.rate)}" for s in self.steps)

    def rate_at(self, t: float) -> int | None:
        rate: int | None = None
        for s in self.steps:
            if s.at <= t:
                rate = s.rate
        return rate


def plan(
    stalls: int,
    starve_rate: str = "100kbit",
    seed: int = 1,
    warmup: float = 8.0,
    release: float = 5.0,
    drain: float = DRAIN,
    targets: tuple[float, ...] = TARGETS,
) -> Plan:
    """``stalls`` squeezes whose intended stall lengths cycle through ``targets``
    in a seeded random order (every length used before any repeats)."""
    if stalls < 1:
        raise ValueError(f"need at least one stall, got {stalls}")
    bits = parse_rate(starve_rate)
    if bits is None:
        raise ValueError("the starving rate must be a rate, not none")
    rng = random.Random(seed)
    chosen: list[float] = []
    while len(chosen) < stalls:
        batch = list(targets)
        rng.shuffle(batch)
        chosen.extend(batch)
    chosen = chosen[:stalls]
    steps = [Step(0.0, None)]
    t = warmup
    for length in chosen:
        steps.append(Step(round(t, 3), bits))
        t += drain + length
        steps.append(Step(round(t, 3), None))
        t += release
    return Plan(steps, chosen, warmup, t)
