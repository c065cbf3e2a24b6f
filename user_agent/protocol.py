"""The signal this agent sends, defined once for the agent: toggles of the
autoplay switch, n per p seconds of stall, in bursts of an even size.

Two protocols (docs/user-agent.md, "Signal protocols"):

- ``tick`` (the paper's): look every p; one burst of n per look that sees the
  stall. The stall's edges are known to within one look (up to +-p on its
  duration).
- ``edges`` (default): look every p/``LOOKS_PER_P``; the *count* of toggles
  encodes the stall's duration to within +-p/n, and the ISP's count estimator
  decodes it as ``D = (C/n + COUNT_OFFSET) p`` - the formula it already applies
  to the paper's signals, so neither side needs to know which protocol the
  other speaks. Counting, not timing: the path's jitter moves toggles in time
  but does not change their number.

The ISP side has its own definitions (``iqn_ctl.engine.params``): the two
packages share a protocol (docs/contracts.md), not code, so the user agent
installs and runs without the ISP side; a test checks the shared constants agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import AgentError

DEFAULT_P = 0.2  # seconds between signals during a stall (and between looks, protocol tick)
DEFAULT_N = 4  # toggles per signal
P_MIN, P_MAX = 0.02, 60.0
#: the ISP's count decoder: a stall of C toggles lasted (C/n + COUNT_OFFSET) p
#: (iqn_ctl.engine.params.COUNT_OFFSET: same value, checked by a test)
COUNT_OFFSET = 0.5
#: protocol edges: looks at the player per signalling interval p
LOOKS_PER_P = 5
#: protocol edges: seconds (in units of p) between the stall's true start (the
#: spinner shows) and its first STALL verdict, beyond the half look of sampling
#: phase. Each look is compared with the grab one p before it (the spinner must
#: have moved, and a page under load redraws less often than every p/5), so
#: with an ideal player the first verdict comes once that reference grab shows
#: the frozen picture too: p after the start (``IDEAL_LAG_P``). Calibrating it
#: on a lab demo that is not the test set (seed 2: durations +19.4 ms long, so
#: 0.9) did not hold on the test set (seed 1: +18 ms at 1.0, +23.5 ms at 0.9):
#: the bias moves more between runs on a loaded box than the correction, so the
#: model value stays (docs/user-agent.md, "Calibrating the detection lag").
DETECT_LAG_P = 1.0
IDEAL_LAG_P = 1.0
#: protocol edges: seconds from the picture's last change to the stall's start.
#: The detector finds when the screen stopped changing, and that is the moment
#: the *last frame* appeared: the player shows it for its full frame interval,
#: and only when the next frame is due and missing has it stalled (then its
#: spinner shows). So the start is put about one frame interval after the
#: freeze, as measured on the screen: on the lab's player (25 frames/s) the
#: spinner was painted 30.4 ms after the picture's last change (mean of 24
#: stalls, test schedule seed 1; a screen witness grabbing at 200/s,
#: ``iqn-lab demo --witness``, saw it on screen after 31.7 ms), and 31.4 / 35.0 ms
#: on the calibration schedule (seed 2); bench/RESULTS.md "Stall edges". 30 ms
#: is also about a frame at 30 frames/s; at 60 frames/s it would be 17 ms, at
#: 24 frames/s 42 ms. The end needs no such term: the first new frame is the end.
FREEZE_LEAD = 0.03
#: protocol edges: an open stall stays open through inconclusive (still) looks
#: for this long (in p): a page under load may not redraw the spinner for a
#: few hundred ms. Plus the p between bursts, below the ISP's stall-end window (4 p).
HOLD_P = 2.5
PROTOCOLS = ("edges", "tick")
DEFAULT_PROTOCOL = "edges"


def check_p(p: float) -> float:
    if not P_MIN <= p <= P_MAX:
        raise AgentError(f"--p must be between {P_MIN:g} and {P_MAX:g} seconds, got {p}")
    return p


def check_n(n: int) -> int:
    if n < 2 or n % 2:
        raise AgentError(
            f"--n must be an even number of toggles (>= 2) so the autoplay switch ends as it was, got {n}"
        )
    return n


def check_protocol(name: str) -> str:
    if name not in PROTOCOLS:
        raise AgentError(f"unknown --protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return name


def look_interval(p: float, protocol: str) -> float:
    """Seconds between looks at the player."""
    return p / LOOKS_PER_P if protocol == "edges" else p


def toggles_for(duration: float, p: float, n: int) -> int:
    """The toggle count that encodes a stall of ``duration`` s: the even number
    C nearest to (duration/p - COUNT_OFFSET) n, so the decoder's
    (C/n + COUNT_OFFSET) p lands within p/n of the duration. 0 for a stall too
    short to encode (shorter than about (COUNT_OFFSET + 1/n) p)."""
    q = 2 * p / n  # one pair of toggles per q seconds
    return 2 * max(0, math.floor((duration - COUNT_OFFSET * p) / q + 0.5))


def decode(count: int, p: float, n: int) -> float:
    """What the ISP's count estimator makes of ``count`` toggles (for tests and docs)."""
    return (count / n + COUNT_OFFSET) * p


@dataclass(slots=True)
class EdgeEncoder:
    """Protocol ``edges``, sans-I/O: one verdict per look in, toggles to send out.

    While the stall lasts, toggles accrue at n per p from its estimated start
    (the first STALL verdict less the detection lag) and go out in bursts of n
    as soon as n are owed: the first burst about (1 + COUNT_OFFSET - 1/n) p
    after the start, then one every p, so the ISP sees n arrivals per w_start
    as before. When the stall ends (the first look without it), the rest owed
    goes out at once: a final burst of 0..n-2 toggles that carries the
    fraction of the last interval. Every burst is even, and the total is
    :func:`toggles_for` (the estimated duration): about n/p per stall-second,
    never more.
    """

    p: float = DEFAULT_P
    n: int = DEFAULT_N
    look: float = DEFAULT_P / LOOKS_PER_P
    lag_p: float = DETECT_LAG_P
    #: seconds from the picture's freeze to the stall's start (0: an ideal
    #: player, whose picture freezes exactly when it stalls)
    lead: float = FREEZE_LEAD
    #: estimated start of the open stall (None: no stall)
    began: float | None = None
    sent: int = 0
    #: first look of a run of inconclusive verdicts inside the open stall
    held: float | None = None
    #: estimated end of the previous stall: a new one never begins before it
    #: (its toggles would pay for the same seconds twice)
    ended: float = float("-inf")
    #: the previous look, and the grab it was compared with
    last_t: float | None = None
    last_ref: float | None = None
    #: the gap before the first held look
    held_gap: float = 0.0

    def _elapsed(self, t: float) -> float:
        assert self.began is not None
        return t - self.began

    def _half_gap(self, now: float, before: float | None) -> float:
        """Half the time between two looks (or their reference grabs): the edge
        lies between them. A look when the loop kept up: half a look; when it
        fell behind (a loaded box skips looks), the actual gap, up to p."""
        if before is None or now <= before:
            return 0.5 * self.look
        return 0.5 * min(now - before, self.p)

    def step(self, t: float, stall: bool, hold: bool = False, ref: float | None = None) -> int:
        """The verdict of the look at ``t``; returns how many toggles to send now.

        ``hold``: the look is inconclusive (a still picture: the page may just
        not have redrawn the spinner); an open stall stays open through such
        looks for up to ``HOLD_P`` p (sending nothing meanwhile), and if they
        last longer, or playback is seen, it ended at the first of them.
        ``ref``: when the grab this look was compared with was taken (default
        ``t - p``, the phase detectors' spacing when the loop keeps up).
        """
        gap = self._half_gap(t, self.last_t)
        ref_t = t - self.p if ref is None else ref
        ref_gap = self._half_gap(ref_t, self.last_ref)
        self.last_t, self.last_ref = t, ref_t
        return self._step(t, stall, hold, ref_t, gap, ref_gap)

    def _step(self, t: float, stall: bool, hold: bool, ref: float, gap: float, ref_gap: float) -> int:
        if stall:
            self.held = None
            if self.began is None:
                # the picture froze after the previous look's reference grab and
                # by this look's (midway: lag + half a look before t when the
                # loop keeps up); lag_p > 1 or < 1 shifts it for a real player;
                # the stall began one frame (lead) after the picture's last change
                self.began = max(ref - (self.lag_p - 1.0) * self.p - ref_gap + self.lead, self.ended)
                self.sent = 0
            owed = toggles_for(self._elapsed(t), self.p, self.n) - self.sent
            burst = owed - owed % self.n if owed >= self.n else 0
        elif self.began is not None and hold and (self.held is None or t - self.held < HOLD_P * self.p):
            # maybe still stalled, maybe over: pay nothing until we know (a stall
            # that goes on pays the backlog in its next burst; one that ended
            # at ``held`` is not overpaid). HOLD_P + p stays inside the ISP's
            # stall-end window, so the pause does not end the stall there.
            if self.held is None:
                self.held, self.held_gap = t, gap
            burst = 0
        elif self.began is not None:
            # the stall ended between the look before ``t`` (or before the held run)
            # and this one: midway (half a look earlier when the loop keeps up)
            t_end, half = (t, gap) if self.held is None else (self.held, self.held_gap)
            self.held = None
            self.ended = t_end - half
            owed = toggles_for(self._elapsed(self.ended), self.p, self.n) - self.sent
            # a stall too short for a first burst stays unsignalled: fewer than n
            # toggles alone never make the ISP see a stall
            burst = max(owed, 0) if self.sent else 0
            self.began = None
        else:
            burst = 0
        self.sent += burst
        return burst

    def close(self, t: float) -> int:
        """The agent stops at ``t`` with a stall open: settle it as if it ended now."""
        return self.step(t, False) if self.began is not None else 0
