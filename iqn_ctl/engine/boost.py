"""When to give a stalling viewer priority at the bottleneck: the boost planner, sans-I/O.

A stall the agent infers says *which* viewer is starving *now*; at a congested
egress the router can put that viewer's traffic ahead of bulk transfers for the
few seconds it takes to refill the player's buffer. This module decides when,
for whom and in which slot; :mod:`iqn_ctl.live.mitigate` applies its decisions
to the kernel (a BPF classifier's map and HTB classes) and never decides.

Times and stall events in, :class:`BoostOn` / :class:`BoostOff` out; no clock
and no I/O (``next_deadline()`` says when a boost must time out). The rules:

* a boost starts when a stall of a client starts, unless all ``slots`` are
  taken (**share cap**: the kernel side sizes the slots so that together they
  fit the configured share of the link) or the client's **episode** is used
  up (**rate limit per client**);
* an episode is a client's boosts with less than ``gap`` seconds between the
  end of one and the start of the next: together they last at most ``max_s``
  seconds, and once that is spent the client must go ``gap`` seconds without a
  boost before a new episode starts. So a viewer that signals all the time is
  boosted at most ``max_s / (max_s + gap)`` of the time, while a stall that the
  inference ended a moment too early (its signal delayed in the congested
  queue) and that starts again goes on being boosted;
* a boost ends when the client's last open stall ends, or when its episode's
  ``max_s`` is spent (**timeout**), whichever comes first; a stall still open
  at the timeout does not start another boost (a new stall must start);
* a refused stall is never boosted later: a slot that frees up goes to the
  next stall that starts, so no boost ever starts long after its stall did.

Which stalls reach it is the agent's business: only stalls inferred from
candidates the data plane admitted (the forgery guard's pairing and cap), so a
forged signal that the guard drops can boost nothing.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable
from dataclasses import dataclass, field

#: --boost-max: seconds one boost may last (a stall is usually over well before)
DEFAULT_BOOST_MAX = 10.0
#: --boost-gap: seconds without a boost that end a client's episode (see the module doc)
DEFAULT_BOOST_GAP = 5.0
#: --boost-share: fraction of the egress link all boosted traffic may take together
DEFAULT_BOOST_SHARE = 0.3
#: --boost-rate: bit/s guaranteed to one boosted client (a few times an SD video's rate)
DEFAULT_BOOST_RATE = 2_000_000
#: the most boosts at once, whatever the link (one HTB class each, made at attach)
MAX_SLOTS = 64


class BoostError(ValueError):
    """A boost policy that cannot work; the message names the flag."""


def slots_for(link_bps: int, share: float, rate_bps: int) -> int:
    """How many clients may be boosted at once: as many guaranteed ``rate_bps``
    as fit in ``share`` of the link (at least one, at most :data:`MAX_SLOTS`)."""
    return max(1, min(MAX_SLOTS, int(share * link_bps) // max(1, rate_bps)))


def policy_problem(max_s: float, gap: float, share: float, rate_bps: int, link_bps: int) -> str | None:
    """Why these knobs cannot work (a one-line message naming the flag), or None."""
    if not 0 < max_s <= 3600 or math.isnan(max_s):
        return f"--boost-max must be in (0, 3600] seconds, got {max_s}"
    if not 0 <= gap <= 86400 or math.isnan(gap):
        return f"--boost-gap must be in [0, 86400] seconds, got {gap}"
    if not 0 < share < 1 or math.isnan(share):
        return f"--boost-share must be a fraction between 0 and 1 (exclusive), got {share}"
    if rate_bps < 8000:
        return f"--boost-rate must be at least 8kbit, got {rate_bps} bit/s"
    if link_bps < 8000:
        return f"--link-rate must be at least 8kbit, got {link_bps} bit/s"
    return None


@dataclass(frozen=True, slots=True)
class BoostOn:
    """Give ``client``'s traffic slot ``slot`` from ``at`` on."""

    client: str
    slot: int
    at: float


@dataclass(frozen=True, slots=True)
class BoostOff:
    """Take ``client``'s traffic out of slot ``slot`` at ``at``; ``reason`` is
    "ended" (its stalls ended), "timeout" (``max_s`` reached) or "closed" (the agent stops)."""

    client: str
    slot: int
    at: float
    reason: str


Action = BoostOn | BoostOff


@dataclass(slots=True)
class _Boost:
    client: str
    slot: int
    start: float
    due: float  # when the episode's max_s is spent
    flows: set[Hashable] = field(default_factory=set)


@dataclass(slots=True)
class _Episode:
    used: float  # boosted seconds of the episode's finished boosts
    last_end: float


class BoostPlanner:
    """Stall starts and ends per flow (with the flow's client) in, boost actions out."""

    def __init__(self, slots: int, max_s: float = DEFAULT_BOOST_MAX,
                 gap: float = DEFAULT_BOOST_GAP) -> None:
        if not 1 <= slots <= MAX_SLOTS:
            raise BoostError(f"boost slots must be in 1..{MAX_SLOTS}, got {slots}")
        problem = policy_problem(max_s, gap, 0.5, 8000, 8000)
        if problem:
            raise BoostError(problem)
        self.slots, self.max_s, self.gap = slots, max_s, gap
        self._free = list(range(slots))  # a heap: the lowest free slot is taken first
        self._active: dict[str, _Boost] = {}
        self._flow_client: dict[Hashable, str] = {}  # flows in a stall that holds a boost
        self._episodes: dict[str, _Episode] = {}
        self._timeouts: list[tuple[float, str, float]] = []  # (due, client, start): lazy heap
        self.started = 0
        self.denied_full = 0
        self.denied_rate = 0
        self.timeouts = 0
        #: boosted seconds of finished boosts (the live ones are added by boosted_s())
        self._done_s = 0.0

    # -- the agent's calls --

    def stall_started(self, flow: Hashable, client: str, t: float) -> list[Action]:
        out = self.advance(t)
        b = self._active.get(client)
        if b is not None:
            b.flows.add(flow)
            self._flow_client[flow] = client
            return out
        ep = self._episodes.get(client)
        used = ep.used if ep is not None and t - ep.last_end < self.gap else 0.0
        if used >= self.max_s:
            self.denied_rate += 1
            return out
        if not self._free:
            self.denied_full += 1
            return out
        slot = heapq.heappop(self._free)
        due = t + (self.max_s - used)
        self._active[client] = _Boost(client, slot, t, due, {flow})
        self._flow_client[flow] = client
        self._episodes[client] = _Episode(used, t)  # last_end is set when it ends
        heapq.heappush(self._timeouts, (due, client, t))
        self.started += 1
        out.append(BoostOn(client, slot, t))
        return out

    def stall_ended(self, flow: Hashable, t: float) -> list[Action]:
        out = self.advance(t)
        client = self._flow_client.pop(flow, None)
        if client is None:
            return out  # never boosted, or its boost timed out
        b = self._active[client]
        b.flows.discard(flow)
        if not b.flows:
            out.append(self._end(b, t, "ended"))
        return out

    def advance(self, t: float) -> list[Action]:
        """End the boosts whose ``max_s`` is up by ``t`` (at their due time)."""
        out: list[Action] = []
        q = self._timeouts
        while q and q[0][0] <= t:
            due, client, start = heapq.heappop(q)
            b = self._active.get(client)
            if b is None or b.start != start:
                continue  # that boost ended before its timeout
            self.timeouts += 1
            out.append(self._end(b, due, "timeout"))
        self._forget(t)
        return out

    def close(self, t: float) -> list[Action]:
        """End every boost (the agent stops)."""
        out = self.advance(t)
        for b in list(self._active.values()):
            out.append(self._end(b, t, "closed"))
        return out

    def next_deadline(self) -> float | None:
        """When the next boost times out (None: no boost is active)."""
        q = self._timeouts
        while q and (q[0][1] not in self._active or self._active[q[0][1]].start != q[0][2]):
            heapq.heappop(q)
        return q[0][0] if q else None

    # -- what it shows --

    @property
    def active(self) -> int:
        return len(self._active)

    def boosted(self) -> dict[str, int]:
        """client -> slot of the boosts in force."""
        return {c: b.slot for c, b in self._active.items()}

    def boosted_s(self, t: float) -> float:
        """Seconds of boost given so far (finished boosts, and the live ones up to ``t``)."""
        return self._done_s + sum(max(0.0, t - b.start) for b in self._active.values())

    # -- internals --

    def _end(self, b: _Boost, t: float, reason: str) -> BoostOff:
        del self._active[b.client]
        for f in b.flows:
            self._flow_client.pop(f, None)
        heapq.heappush(self._free, b.slot)
        ep = self._episodes[b.client]
        ep.used += max(0.0, t - b.start)
        ep.last_end = t
        self._done_s += max(0.0, t - b.start)
        return BoostOff(b.client, b.slot, t, reason)

    def _forget(self, t: float) -> None:
        """Drop episodes that no longer limit (memory bounded by the clients
        boosted within the last ``gap`` seconds)."""
        if len(self._episodes) > 4 * self.slots + 1024:
            self._episodes = {c: e for c, e in self._episodes.items()
                              if t - e.last_end < self.gap or c in self._active}
