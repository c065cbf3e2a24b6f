"""Is a stall a signal, or bulk (video) traffic that happened to look like one?

A video flow now and then carries candidate-sized packets (a segment's last
packet), and a burst of segments after a congested spell can hold n of them
within w_start, so the engine starts a "stall" on it. A signalling flow
carries little but its candidates during a stall (answers to the toggles, a
few ACKs); a video flow carries megabytes. The kernel counts every flow's
packets, candidates and bytes, so comparing two snapshots (at the stall's
start and end) tells them apart: more than ``bulk_ratio`` full-size packets'
worth of other bytes per candidate marks a flow as bulk.

The rule lives here as pure functions over counter snapshots so the live
agent applies it, replays can apply it to counters rebuilt from a capture,
and tests pin it exactly without a kernel.

Two choices are deliberate:

* Only the flows that carried the stall's candidates are judged, each on its
  own, and the stall is discarded only when every one of them is bulk. With
  ``--key client`` a stall gathers all of a client's connections; summing
  their bytes would let any other connection of that client (its own video,
  or a server that once sent one forged candidate to get its key filed under
  the client) turn a real stall into a "bulk flow".
* Counters that cannot be compared (an entry missing at either end, or a
  counter that went down because the kernel's LRU evicted the flow and it
  started again from zero) are *unknown*, and an unknown flow that may have
  carried candidates keeps the stall: a wrong discard loses a real stall for
  good, a wrong keep only records a short false one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)


class Counters(NamedTuple):
    """One flow's kernel counters (``struct flow_stats``): UDP packets from the
    signalling port, how many of them were candidates, their frame bytes."""

    packets: int
    candidates: int
    bytes: int
    #: the kernel slot's claim count: counters of different epochs (the flow
    #: lost its slot to another and won it back, restarting them) do not compare
    epoch: int = 0


def delta(start: Counters | None, end: Counters | None) -> Counters | None:
    """What one flow carried between two snapshots; None when the counters
    cannot tell (an entry missing, a counter that went down, or counters
    restarted in between: another epoch)."""
    if start is None or end is None or start.epoch != end.epoch:
        return None
    d = Counters(end.packets - start.packets, end.candidates - start.candidates, end.bytes - start.bytes)
    return None if min(d) < 0 else d


def _other(d: Counters, max_size: int) -> tuple[int, int, int]:
    """(candidates, other packets, other bytes) of a flow's delta. A flow that
    shows no candidate is counted as one: the candidates that started the stall
    arrived before the start snapshot, and one full-size packet's allowance is
    what the rule has always given them."""
    cands = max(d.candidates, 1)
    return cands, d.packets - cands, d.bytes - cands * max_size


#: standard deviations of the sampled estimate a bulk verdict needs to spare (bulk_check)
SAMPLE_Z = 2.0


def _spread(other_packets: int, sample: int) -> float:
    """:data:`SAMPLE_Z` standard deviations of a sampled volume estimate, relative
    to the estimate: counted 1 in ``sample`` (Bernoulli), each as ``sample``."""
    if sample <= 1:
        return 0.0
    if other_packets <= 0:
        return 1.0
    return float(SAMPLE_Z * math.sqrt((sample - 1) / other_packets))


#: --bulk-ratio's default, for the live agent and replay alike. A real signal at a starved
#: viewer carries other bytes too: its answers, lost at the bottleneck downstream of the
#: agent, are sent again packed into full-size packets. Measured (2026-12-02, namespace lab,
#: the whole home link at 64-300 kbit/s for 12 s, agent upstream of it): 0.69 to 1.70
#: full-size packets per candidate, and one VM pair run lost a real 9.2 s stall at the old
#: default of 2. A video flow's false stall carries a segment or more per candidate (25 in
#: tests/test_bulk_rule.py's video, about 100 for a 1.2 Mbit/s clip's segment): 4 keeps
#: twice the signals' worst figure and is still far below video's.
DEFAULT_BULK_RATIO = 4.0

#: what the bulk check of a recorded stall found (the record's ``bulk_check``)
CHECK_OK = "ok"  # every connection that may have carried the signal was compared
CHECK_UNKNOWN = "unknown"  # some counter was missing or went down: kept without a verdict
CHECK_OFF = "off"  # --bulk-ratio 0: no check


class Verdict(NamedTuple):
    """What :func:`bulk_check` found about one stall."""

    #: ``CHECK_OK``, ``CHECK_UNKNOWN`` or ``CHECK_OFF``
    check: str
    #: why the stall is bulk traffic, "" to keep it
    reason: str
    #: the judged connections' other bytes per candidate, in full-size packets, of the
    #: most signal-like one (the figure the rule compares with ``bulk_ratio``); None when
    #: nothing was compared. Logged with every kept stall: how close a real signal came
    #: to being discarded (a starved viewer's answers, retransmitted in full-size
    #: packets, raise it) is what an operator needs to set ``--bulk-ratio``.
    other: float | None = None


def bulk_reason(
    start: Mapping[K, Counters | None],
    end: Mapping[K, Counters | None],
    max_size: int,
    bulk_ratio: float,
    sample: int = 1,
) -> str:
    """Why a stall is bulk traffic rather than a signal, "" to keep it
    (:func:`bulk_check`'s reason)."""
    return bulk_check(start, end, max_size, bulk_ratio, sample)[1]


def bulk_check(
    start: Mapping[K, Counters | None],
    end: Mapping[K, Counters | None],
    max_size: int,
    bulk_ratio: float,
    sample: int = 1,
) -> Verdict:
    """(what the check could tell, why the stall is bulk or "", the ratio it
    judged by: :class:`Verdict`): ``CHECK_OFF``
    with the rule disabled, ``CHECK_UNKNOWN`` when a counter that matters
    could not be compared (the stall is kept, and the record says so), else
    ``CHECK_OK`` with the reason, "" to keep the stall.

    ``start`` and ``end`` map each flow (raw kernel key) the stall may
    involve to its counters at the stall's start and end, None when the
    kernel had no entry; a flow missing from a mapping counts as None.
    ``bulk_ratio`` 0 disables the rule. ``sample``: the counters count 1 in
    ``sample`` non-candidate datagrams, each as ``sample`` (the live data
    plane's volume sampling, docs/dataplane.md "Volume"; 1: exact). Then the
    other bytes are an estimate whose standard deviation is about
    ``avg size x sqrt((sample - 1) x other packets)``, and a flow is bulk only
    if its other bytes exceed the limit by :data:`SAMPLE_Z` of them: one
    sampled full-size datagram beside a few candidates reads as ``sample`` of
    them, which alone must not discard a real signal (a wrong discard loses a
    real stall for good, a wrong keep records a short false one); a video
    flow carries hundreds of datagrams and far more than the limit, and is
    still discarded. A flow carried candidates if its
    candidate counter rose; when none rose (all of them arrived before the
    start snapshot), the flows that carried any packet during the stall are
    judged instead.
    """
    if bulk_ratio <= 0:
        return Verdict(CHECK_OFF, "")
    carriers: list[Counters] = []
    active: list[Counters] = []
    known = blind = 0
    for flow in start.keys() | end.keys():
        s, e = start.get(flow), end.get(flow)
        d = delta(s, e)
        if d is None:
            if s is None and e is not None and e.candidates == 0:
                continue  # new to us and never carried a candidate: not part of the signal
            if s is None and e is None:
                blind += 1
                continue  # nothing known, nothing there
            return Verdict(CHECK_UNKNOWN, "")  # unknown, and it may have carried candidates
        known += 1
        if d.candidates > 0:
            carriers.append(d)
        elif d.packets > 0:
            active.append(d)
    judged = carriers or active
    if not judged:
        # no connection could be compared at all: nothing tells signal from bulk
        return Verdict(CHECK_UNKNOWN if blind and not known else CHECK_OK, "")
    parts = [_other(d, max_size) for d in judged]
    # the most signal-like connection's figure: the one that keeps the stall if any does
    least = min(max(ob, 0) / (c * max_size) for c, _, ob in parts)
    cands = others = other_bytes = 0
    for c, op, ob in parts:
        if ob <= bulk_ratio * c * max_size or ob * (1 - _spread(op, sample)) <= bulk_ratio * c * max_size:
            return Verdict(CHECK_OK, "", least)  # one signal-like flow is enough to keep the stall
        cands, others, other_bytes = cands + c, others + op, other_bytes + ob
    what = "bulk flow" if len(judged) == 1 else f"bulk flows ({len(judged)} connections)"
    return Verdict(CHECK_OK, f"{what}: {others} other packets ({other_bytes} bytes) beside "
                             f"{cands} candidates during it (--bulk-ratio {bulk_ratio:g})", least)


#: a look-up of counters: each given connection's, None where there is no entry
CounterLookup = Callable[[list[K]], Mapping[K, Counters | None]]


class BulkJudge(Generic[K]):
    """``--bulk-ratio`` over a stall's life, for the live agent and replay alike.

    At a stall's start the counters of the connections that carried its flow's
    candidates so far are noted; at its end they are looked up again (those
    noted, plus any the flow gained), and :func:`bulk_check` compares the two.
    The caller says where counters come from: the kernel's map (live), or
    counters rebuilt from a capture at the instants the live agent would have
    read them (:mod:`iqn_ctl.evaluate.replay`). Keeping the bookkeeping here is
    what makes a replay with the same options record the same stalls.
    """

    def __init__(self, bulk_ratio: float, max_size: int, sample: int = 1) -> None:
        self.bulk_ratio = bulk_ratio
        self.max_size = max_size
        #: :func:`bulk_check`'s ``sample`` (the live agent sets it from the data plane)
        self.sample = sample
        self._base: dict[Hashable, Mapping[K, Counters | None]] = {}

    def started(self, flow: Hashable, conns: list[K], lookup: CounterLookup[K] | None) -> None:
        """A stall of ``flow`` started; ``conns`` are its connections known now."""
        if self.bulk_ratio > 0 and lookup is not None:
            self._base[flow] = lookup(conns)

    def ended(self, flow: Hashable, conns: list[K], lookup: CounterLookup[K] | None) -> Verdict:
        """(check, reason) for the stall of ``flow`` that just ended
        (:func:`bulk_check`); ``CHECK_OFF`` with the rule disabled or no counters.
        The connections noted at the start are looked up again even if the
        caller forgot them since, so an evicted one shows as unknown, not gone."""
        base = self._base.pop(flow, None)
        if self.bulk_ratio <= 0 or lookup is None:
            return Verdict(CHECK_OFF, "")
        base = base or {}
        now = lookup(list(dict.fromkeys([*base, *conns])))
        return bulk_check(base, now, self.max_size, self.bulk_ratio, self.sample)
