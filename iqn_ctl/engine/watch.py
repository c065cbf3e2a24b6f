"""Watched-time accounting, sans-I/O: how long each viewer watched, per slot,
and how much of it stalled.

Why: the QoS service (``iqn-qos``) estimates each component's stall rate from
media lines of *every* session, healthy ones too; a source that only reports
stalls makes every estimate too high. So the agent also measures, per client
and slot, the seconds the client was watching (its video carried traffic, or it
was stalled) and the seconds it was stalled, and writes one
:class:`WatchRecord` per client and slot (docs/qos.md, "From the ISP agent").

Rules (all times are epoch seconds; slots are aligned to multiples of
``slot_s``, as in ``iqn-qos``):

* Only *known* clients count: clients seen to run the end-user agent. A client
  becomes known when the end of its first stall is noticed and the stall is kept
  (not discarded as bulk traffic); that first stall itself is not counted, because it is the event
  that selected the client: counting it would bias the client's first slot
  upward. Clients the history already has stalls of are known from the start.
* A sample ``(t0, t1]`` in which a known client received at least
  :data:`ACTIVE_MIN_BPS` bytes a second (all its servers together) is watched.
* A stall (start to end; an open stall up to the slot's end) is stalled and
  also watched: a viewer stalled is a viewer watching.
* watched = the length of the union of watched samples and stalls inside the
  slot; stalled = the length of the union of stalls inside it; hence
  0 <= stalled <= watched <= slot_s.
* The record's server is the one that sent the client the most bytes in the
  slot (the media server: the QoS path is the media path), or, with no bytes
  seen, the server the client signalled through.

A slot is closed by :meth:`WatchAccounting.close_until`; anything later
reported inside a closed slot is ignored (counted in ``late``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

#: version of the record shape (fields of :class:`WatchRecord`); bumped on any change
RECORD_VERSION = 1
#: default slot length, seconds: the same as ``iqn-qos --slot``
DEFAULT_SLOT = 900.0
#: a sample counts as watched when the client received at least this many bytes a
#: second from port 443 (16 kbit/s): below any video bitrate, above QUIC keep-alives
ACTIVE_MIN_BPS = 2000.0
#: known clients remembered; past it the longest known are forgotten
MAX_KNOWN = 262_144

Interval = tuple[float, float]


@dataclass(frozen=True, slots=True)
class WatchRecord:
    """One client's watched and stalled seconds in one slot (record version 1)."""

    router: str
    iface: str
    client: str
    server: str
    slot: float
    slot_s: float
    watched_s: float
    stalled_s: float

    def as_json(self) -> dict[str, object]:
        return {
            "v": RECORD_VERSION, "router": self.router, "iface": self.iface, "client": self.client,
            "server": self.server, "slot": self.slot, "slot_s": self.slot_s,
            "watched_s": self.watched_s, "stalled_s": self.stalled_s,
        }


def union_length(intervals: Iterable[Interval]) -> float:
    """Total length covered by ``intervals`` (overlaps counted once)."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


@dataclass(slots=True)
class _Slot:
    active: list[Interval] = field(default_factory=list)
    stalls: list[Interval] = field(default_factory=list)
    bytes: dict[str, float] = field(default_factory=dict)
    signal_server: str = ""


class WatchAccounting:
    """Per (client, slot): watched and stalled seconds, and bytes per server."""

    def __init__(self, slot_s: float = DEFAULT_SLOT, router: str = "", iface: str = "") -> None:
        if not (slot_s > 0 and math.isfinite(slot_s)):
            raise ValueError(f"slot length must be a positive number of seconds, got {slot_s}")
        self.slot_s = float(slot_s)
        self.router = router
        self.iface = iface
        #: client -> epoch from which it counts
        self._known: dict[str, float] = {}
        #: (client, slot start) -> what is accumulated
        self._slots: dict[tuple[str, float], _Slot] = {}
        #: flow -> (client, server, start) of stalls going on
        self._open: dict[Hashable, tuple[str, str, float]] = {}
        #: slots starting before this are closed
        self.closed_before = -math.inf
        #: contributions that fell into closed slots and were ignored
        self.late = 0

    # -- who counts --

    def know(self, client: str, since: float) -> None:
        """Count ``client`` from ``since`` on (earlier ``since`` kept)."""
        old = self._known.get(client)
        if old is not None and old <= since:
            return
        if old is None and len(self._known) >= MAX_KNOWN:
            del self._known[next(iter(self._known))]
        self._known[client] = since

    def known(self, client: str) -> bool:
        return client in self._known

    @property
    def clients(self) -> frozenset[str]:
        return frozenset(self._known)

    # -- what happens --

    def slot_of(self, t: float) -> float:
        return math.floor(t / self.slot_s) * self.slot_s

    def _spread(self, client: str, a: float, b: float) -> list[tuple[_Slot, Interval]]:
        """``[a, b)`` clipped to the client's known time, split at slot edges."""
        since = self._known.get(client)
        if since is None:
            return []
        a = max(a, since)
        out = []
        while a < b:
            s = self.slot_of(a)
            e = min(b, s + self.slot_s)
            if s < self.closed_before:
                self.late += 1
            else:
                out.append((self._slots.setdefault((client, s), _Slot()), (a, e)))
            a = e
        return out

    def sample(self, t0: float, t1: float, received: Mapping[tuple[str, str], float]) -> None:
        """Bytes each (client, server) pair carried to the client in ``(t0, t1]``."""
        if not t1 > t0:
            return
        per_client: dict[str, dict[str, float]] = {}
        for (client, server), nbytes in received.items():
            if nbytes > 0 and client in self._known:
                per_client.setdefault(client, {})[server] = nbytes
        for client, servers in per_client.items():
            active = sum(servers.values()) >= ACTIVE_MIN_BPS * (t1 - t0)
            for slot, (a, b) in self._spread(client, t0, t1):
                share = (b - a) / (t1 - t0)
                for server, nbytes in servers.items():
                    slot.bytes[server] = slot.bytes.get(server, 0.0) + nbytes * share
                if active:
                    slot.active.append((a, b))

    def stall_started(self, flow: Hashable, client: str, server: str, start: float) -> None:
        self._open[flow] = (client, server, start)

    def stall_ended(self, flow: Hashable, client: str, server: str, start: float, end: float,
                    kept: bool = True, detected: float | None = None) -> None:
        """A stall ended; ``kept`` False: it was discarded (not a signal) and counts nowhere.
        The first kept stall of an unknown client makes it known from ``detected`` on
        (when the end was noticed, ``end`` if not given): samples fed before then
        were dropped, so counting from the earlier ``end`` would miss time."""
        got = self._open.pop(flow, None)
        if got is not None:
            start = max(start, got[2])  # the part up to a slot already closed was counted then
        if not kept:
            return
        if client not in self._known:
            self.know(client, end if detected is None else max(end, detected))
            return
        self._stalled(client, server, start, end)

    def _stalled(self, client: str, server: str, start: float, end: float) -> None:
        for slot, iv in self._spread(client, start, end):
            slot.stalls.append(iv)
            slot.signal_server = server

    # -- slots closing --

    def close_until(self, t: float) -> list[WatchRecord]:
        """Close every slot that ends at or before ``t``; one record per client
        that watched in it. Stalls still open count up to the slot's end."""
        edge = self.slot_of(t)
        return self._close(edge, edge)

    def close_all(self, t: float) -> list[WatchRecord]:
        """Close everything at ``t`` (the agent stops): the current slot closes
        early, its record covers what was seen until ``t``."""
        return self._close(self.slot_of(t) + self.slot_s, t)

    def _close(self, edge: float, stall_cut: float) -> list[WatchRecord]:
        if edge <= self.closed_before:
            return []
        for client, server, start in self._open.values():
            if client in self._known:
                self._stalled(client, server, start, min(edge, stall_cut))
        for flow, (client, server, start) in list(self._open.items()):
            # what is counted now is not counted again when the stall ends
            self._open[flow] = (client, server, max(start, min(edge, stall_cut)))
        out = []
        for key in sorted((k for k in self._slots if k[1] < edge), key=lambda k: (k[1], k[0])):
            client, s = key
            acc = self._slots.pop(key)
            watched = min(union_length([*acc.active, *acc.stalls]), self.slot_s)
            if watched <= 0:
                continue
            stalled = min(union_length(acc.stalls), watched)
            server = max(acc.bytes, key=lambda k: (acc.bytes[k], k)) if acc.bytes else acc.signal_server
            out.append(WatchRecord(self.router, self.iface, client, server, s, self.slot_s, watched, stalled))
        self.closed_before = edge
        return out
