"""Signal shaping: a flow's candidates grouped into bursts, the unit the data
plane reports (one ring-buffer record per burst, docs/dataplane.md).

Why bursts: the end-user agent answers a stall with n toggles a few ms apart,
so a signal is n candidates close together. The kernel writes one record per
burst instead of one per candidate, and user space does its work per record.

Why a burst keeps every candidate's time: the stall state machine's window
tests look at individual arrivals (the n-th newest leaving a window, a
trigger in the middle of a short burst), so a record with only its first and
last time and a count would move stall edges by milliseconds. A record carries
its first time and each candidate's offset from it (at most
:data:`~iqn_ctl.engine.params.BURST_MAX`), so feeding bursts gives the same
events at the same times as feeding the candidates they came from
(tests/test_bursts.py, for every estimator).

This module is the Python twin of the kernel's grouping (``burst_add`` in
``iqn_ctl/live/bpf/iqn_xdp.c``), on integer nanoseconds like the kernel:

* :func:`group` - a flow's candidates in time order; a burst ends when it holds
  ``cap`` candidates or the next one comes more than ``gap`` after the last
  one. Replay builds its records with this, so live and replay feed one engine.
* :func:`group_slots` - the same rule run the kernel's way, arrival by arrival
  over a table of slots, where a candidate of another flow landing in an open
  burst's slot closes it. tests/test_burst_kernel.py holds the kernel to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from iqn_ctl.engine.params import BURST_GAP, BURST_MAX

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
#: nanoseconds per second: records carry CLOCK_MONOTONIC nanoseconds
NS = 1_000_000_000
GAP_NS = round(BURST_GAP * NS)


def burst_cap(n: int) -> int:
    """Candidates one burst holds: the signal's n, at most :data:`BURST_MAX`."""
    return max(1, min(n, BURST_MAX))


@dataclass(frozen=True, slots=True)
class Bursts:
    """Burst records as columns: burst ``i`` belongs to flow ``flow[i]`` (an
    index the caller defines), starts at ``first[i]`` ns and holds
    ``count[i]`` candidates at ``first[i] + off[i, :count[i]]`` (``off[i, 0]`` is 0).
    Times are ns after ``origin`` seconds (0: the kernel's clock itself)."""

    flow: I64
    first: I64
    count: I64
    off: I64
    origin: float = 0.0

    def __len__(self) -> int:
        return int(self.count.size)

    @property
    def last(self) -> I64:
        """Each burst's last candidate (ns)."""
        if not self.count.size:
            return np.empty(0, np.int64)
        return self.first + self.off[np.arange(self.count.size), self.count - 1]  # type: ignore[no-any-return]

    def candidates(self) -> tuple[I64, I64]:
        """(burst index, time in ns) of every candidate, burst by burst."""
        mask = np.arange(self.off.shape[1])[None, :] < self.count[:, None]
        t = (self.first[:, None] + self.off)[mask]
        return np.repeat(np.arange(self.count.size), self.count), t

    def seconds(self) -> F64:
        """Every candidate's time in seconds, burst by burst: the same float the
        live path makes of a kernel time (``ns / 1e9``)."""
        t = self.candidates()[1] / 1e9
        return t + self.origin if self.origin else t  # type: ignore[no-any-return]

    def select(self, keep: npt.NDArray[np.bool_] | I64) -> Bursts:
        """The bursts ``keep`` picks (a mask or indices), in that order."""
        return Bursts(self.flow[keep], self.first[keep], self.count[keep], self.off[keep], self.origin)


def _empty(cap: int) -> Bursts:
    e = np.empty(0, np.int64)
    return Bursts(e, e, e, np.zeros((0, cap), np.int64))


def _build(flow: I64, t: I64, new: npt.NDArray[np.bool_], cap: int) -> Bursts:
    """Bursts from candidates in burst order, ``new`` marking each burst's first."""
    starts = np.flatnonzero(new)
    bid = np.cumsum(new) - 1
    pos = np.arange(t.size) - starts[bid]
    off = np.zeros((starts.size, cap), np.int64)
    off[bid, pos] = t - t[starts][bid]
    count = np.diff(np.append(starts, t.size))
    return Bursts(flow[starts], t[starts], count, off)


def group(flow: npt.ArrayLike, t_ns: npt.ArrayLike, n: int, gap_ns: int = GAP_NS) -> Bursts:
    """Candidates of many flows (``flow[i]`` an integer id, ``t_ns[i]`` its time
    in ns, any order) -> bursts, ordered by first time (then flow). Vectorised:
    one sort, no Python step per candidate."""
    cap = burst_cap(n)
    f = np.asarray(flow, np.int64).ravel()
    t = np.asarray(t_ns, np.int64).ravel()
    if f.size != t.size:
        raise ValueError("flow and t_ns differ in length")
    if not t.size:
        return _empty(cap)
    order = np.lexsort((t, f))
    f, t = f[order], t[order]
    run = np.ones(t.size, np.bool_)
    run[1:] = (f[1:] != f[:-1]) | (t[1:] - t[:-1] > gap_ns)
    starts = np.flatnonzero(run)
    rid = np.cumsum(run) - 1
    new = (np.arange(t.size) - starts[rid]) % cap == 0
    b = _build(f, t, new, cap)
    return b.select(np.lexsort((b.flow, b.first)))


def group_seconds(flow: npt.ArrayLike, t: npt.ArrayLike, n: int, gap_ns: int = GAP_NS) -> Bursts:
    """:func:`group` for times in seconds (a capture's): they become integer ns
    after a whole-second origin, as the kernel would stamp them."""
    ts = np.asarray(t, np.float64).ravel()
    if not ts.size:
        return group(flow, np.empty(0, np.int64), n, gap_ns)
    origin = float(np.floor(ts.min()))
    b = group(flow, np.round((ts - origin) * 1e9).astype(np.int64), n, gap_ns)
    return Bursts(b.flow, b.first, b.count, b.off, origin)


def group_slots(
    flow: Sequence[int], t_ns: Sequence[int], slot: Sequence[int], n: int, gap_ns: int = GAP_NS
) -> tuple[Bursts, list[int]]:
    """The kernel's grouping, arrival by arrival in the given order: candidate
    ``i`` of flow ``flow[i]`` lands in table slot ``slot[i]``. It extends the
    slot's open burst if that is its flow's, holds fewer than ``cap`` and
    ended at most ``gap_ns`` before; otherwise the open burst is closed and a
    new one starts. A burst reaching ``cap`` closes at once. Returns the bursts
    in the order the kernel closes them (those still open at the end last, by
    slot) and the slot of each."""
    cap = burst_cap(n)
    open_: dict[int, list[int]] = {}  # slot -> [flow, t, t, ...]
    done: list[tuple[int, list[int]]] = []
    for f, t, s in zip(flow, t_ns, slot, strict=True):
        cur = open_.get(s)
        if cur is not None:
            if cur[0] == f and len(cur) - 1 < cap and t - cur[-1] <= gap_ns:
                cur.append(t)
                if len(cur) - 1 >= cap:
                    done.append((s, open_.pop(s)))
                continue
            done.append((s, open_.pop(s)))
        cur = [f, t]
        if cap == 1:
            done.append((s, cur))
        else:
            open_[s] = cur
    done.extend(sorted(open_.items()))
    if not done:
        return _empty(cap), []
    flows = np.array([c[0] for _, c in done], np.int64)
    first = np.array([c[1] for _, c in done], np.int64)
    count = np.array([len(c) - 1 for _, c in done], np.int64)
    off = np.zeros((len(done), cap), np.int64)
    for i, (_, c) in enumerate(done):
        off[i, : len(c) - 1] = np.asarray(c[1:], np.int64) - c[1]
    return Bursts(flows, first, count, off), [s for s, _ in done]
