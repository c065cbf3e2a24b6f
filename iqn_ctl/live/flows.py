"""The live flow view, sans-I/O: the data plane's burst records (raw kernel
key, first time, each candidate's offset) -> the engine's
:class:`~iqn_ctl.engine.vector.VectorFlowTable` (``FlowTable``'s semantics,
costed per poll: one vectorised pass over all of a poll's arrivals), with the names
(flow label, client, server) the flow view and the history need.

No sockets, no bcc, no clock: the agent's loop feeds it, tests feed it event
tuples exactly as ``Datapath.poll_monotonic`` returns them. It lives beside the
loader rather than in the engine because its keys are the kernel's key bytes
(:mod:`iqn_ctl.live.layout`).

Hostile traffic shapes two things here. Each flow keeps an index of its raw
keys, so what the agent does per stall (look up the stall's connections in the
kernel) costs the same with 10 flows as with 262,144 cached keys. And new flows
are admitted per source (server address) through a token bucket: one address
flooding one-packet flows gets ``source_rate`` new flows a second into the
table, the rest are refused and counted, and other servers' viewers keep their
trackers.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from iqn_ctl.engine.estimators import DEFAULT_ESTIMATOR
from iqn_ctl.engine.flowkey import KEY_MODES, FlowInfo, FlowKey, flow_of, info_of
from iqn_ctl.engine.params import DEFAULT_MAX_FLOWS, DEFAULT_SOURCE_RATE, SignalParams
from iqn_ctl.engine.tracker import DEFAULT_REORDER, Event
from iqn_ctl.engine.vector import FlowColumns, IntArray, VectorFlowTable
from iqn_ctl.live.bursttable import BurstBatch
from iqn_ctl.live.keyindex import KeyIndex, words
from iqn_ctl.live.layout import decode_key
from iqn_ctl.live.settings import AgentError

__all__ = ["KEY_MODES", "FlowInfo", "FlowsSnapshot", "LiveFlows", "SourceLimit"]
#: raw keys remembered per flow (--key client: a client's connections, newest kept)
RAWS_PER_FLOW = 64
#: source buckets kept before the full ones (equivalent to none) are dropped
MAX_SOURCES = 4096
#: polls with fewer burst records than this look their flows up record by record: the
#: vectorised look-up costs ~80 µs of numpy calls per poll whatever its size, a dict
#: look-up ~1.5 µs per record (measured: 15 records a poll, 21.5 against 16.3 µs/record)
SMALL_BATCH = 64


class SourceLimit:
    """New flows per second per source: a token bucket per server address,
    ``rate`` tokens a second and at most ``rate`` at once (one second's burst).

    Time is the arrivals' own (monotonic) clock, so the limit is sans-I/O and
    immune to wall-clock steps. At most :data:`MAX_SOURCES` buckets are kept: a
    full bucket is the same as none, so those go first; if every bucket is
    draining (a flood with spoofed sources), all are reset, which only costs
    the limit its memory, never a real flow.
    """

    def __init__(self, rate: float) -> None:
        if not rate >= 0:
            raise AgentError(f"--source-rate must be >= 0, got {rate}")
        self.rate = float(rate)
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, at)

    def admit(self, source: str, t: float) -> bool:
        if not self.rate:
            return True
        got = self._buckets.get(source)
        if got is None:
            if len(self._buckets) >= MAX_SOURCES:
                self._shrink(t)
            tokens = self.rate
        else:
            tokens = min(self.rate, got[0] + max(t - got[1], 0.0) * self.rate)
        if tokens < 1.0 - 1e-9:  # a whole token, give or take float rounding of the refill
            self._buckets[source] = (tokens, max(t, got[1]) if got else t)
            return False
        self._buckets[source] = (tokens - 1.0, max(t, got[1]) if got else t)
        return True

    def _shrink(self, t: float) -> None:
        full = [s for s, (k, at) in self._buckets.items() if k + max(t - at, 0.0) * self.rate >= self.rate]
        for s in full:
            del self._buckets[s]
        if len(self._buckets) >= MAX_SOURCES:
            self._buckets.clear()


class LiveFlows:
    """Candidate events (raw key, time, length) -> VectorFlowTable, with the names
    the flow view and the history need. ``decode`` turns the data plane's raw
    key bytes into a :class:`~iqn_ctl.engine.flowkey.FlowKey`; it runs once per raw
    key, not per event."""

    def __init__(
        self,
        params: SignalParams,
        estimator: str = DEFAULT_ESTIMATOR,
        key_mode: str = "5tuple",
        max_flows: int = DEFAULT_MAX_FLOWS,
        decode: Callable[[bytes], FlowKey] | None = None,
        reorder: float = DEFAULT_REORDER,
        source_rate: float = DEFAULT_SOURCE_RATE,
    ) -> None:
        if key_mode not in KEY_MODES:
            raise AgentError(f"--key must be one of {', '.join(KEY_MODES)}, got {key_mode!r}")
        if decode is None:
            decode = decode_key
        self.table = VectorFlowTable(params, estimator, max_flows=max_flows, reorder=reorder)
        self.key_mode = key_mode
        self.max_flows = max_flows
        self._decode = decode
        self._fid: dict[bytes, Hashable] = {}
        self._info: dict[Hashable, FlowInfo] = {}
        #: each flow's raw keys (an ordered set, oldest learned first): raws() without a scan;
        #: a flow's one raw key is held as itself, a dict made only for a second (--key
        #: client): an outage's onset learns 50,000 flows of one key each within one p
        self._raws: dict[Hashable, bytes | dict[bytes, None]] = {}
        self.limit = SourceLimit(source_rate)
        #: raw key -> flow number, for whole polls at once (a cache of ``_fid``: dropped with it);
        #: made when the first key shows its width
        self._index: KeyIndex | None = None
        #: flow numbers: each flow's key, and the engine slot (and its serial) it had when last fed
        self._fnum: dict[Hashable, int] = {}
        self._fkeys: list[Hashable] = []
        self._fslot = np.full(1024, -1, np.int64)
        self._fserial = np.zeros(1024, np.int64)
        self.events_in = 0
        #: new flows refused by the per-source limit (once per flow and poll)
        self.refused = 0
        #: their candidate events, not fed to the engine
        self.refused_events = 0
        #: the oldest arrival of the last ingest() (how far behind the loop is: agent's lag)
        self.oldest: float | None = None

    def flow_id(self, raw: bytes) -> Hashable:
        fid = self._fid.get(raw)
        if fid is not None:
            return fid
        if len(self._fid) >= 4 * self.max_flows:
            self._fid.clear()  # bounded cache; refilled from the live flows on demand
            if self._index is not None:
                self._index = KeyIndex(self._index.width)  # a new one: a batch may hold the old
        elif self._index is None:
            self._index = KeyIndex(len(raw))
        fid, info = flow_of(self._decode(raw), self.key_mode)
        self._fid[raw] = fid
        old = self._info.get(fid)
        if old is None or old.server != info.server:
            self._info[fid] = info  # client mode: the server shown is the latest one seen
        self._learn_raw(self._raws, fid, raw)
        if len(self._info) > 2 * self.max_flows + 1024:
            # forget the names and keys of flows the table no longer tracks (amortised O(1))
            self._info = {tr.flow: self._info[tr.flow] for tr in self.table if tr.flow in self._info}
            self._raws = {f: self._raws[f] for f in self._info if f in self._raws}
            self._info[fid] = info
            self._raws.setdefault(fid, raw)
        return fid

    @staticmethod
    def _learn_raw(raws: dict[Hashable, bytes | dict[bytes, None]], fid: Hashable, raw: bytes) -> None:
        """``raw`` is ``fid``'s newest raw key (at most :data:`RAWS_PER_FLOW` kept, oldest dropped)."""
        known = raws.get(fid)
        if known is None:
            raws[fid] = raw
        elif not isinstance(known, dict):
            if known != raw:
                raws[fid] = {known: None, raw: None}
        else:
            known.pop(raw, None)
            known[raw] = None
            if len(known) > RAWS_PER_FLOW:
                del known[next(iter(known))]

    def raws(self, fid: Hashable) -> list[bytes]:
        """The data plane's keys of one flow (several with --key client): an
        index look-up, O(1) in the number of flows (it runs for every stall)."""
        got = self._raws.get(fid)
        if got is None:
            return []
        return list(got) if isinstance(got, dict) else [got]

    def info(self, fid: Hashable) -> FlowInfo:
        got = self._info.get(fid)
        if got is not None:
            return got
        return FlowInfo(str(fid), str(fid), "")

    def ingest_bursts(self, batch: BurstBatch) -> list[Event]:
        """Feed one poll's burst records to the engine in one call (one
        vectorised pass over every flow's arrivals). Records find their flow
        (the key index) and its engine slot (the one it had when last fed,
        :meth:`VectorFlowTable.holds`) as array operations; Python runs per raw
        key never seen and per flow not in the table (admission), not per record."""
        if not len(batch):
            return []
        self.events_in += batch.candidates
        self.oldest = int(batch.first.min()) / 1e9
        table = self.table
        if len(self._fkeys) > 4 * self.max_flows + 1024:
            self._renumber()
        small = len(batch) < SMALL_BATCH
        fnum, refused = self._numbers_admitted(batch, small)
        uniq, first, inv = np.unique(fnum, return_index=True, return_inverse=True)
        rank = np.argsort(first, kind="stable")  # groups in order of their first record
        group = np.empty(rank.size, np.int64)
        group[rank] = np.arange(rank.size)
        rec_group = group[inv.ravel()]
        gnum = uniq[rank]
        b = batch.bursts(rec_group)
        if refused:
            keep = ~np.isin(gnum, np.asarray(refused, np.int64))
            kept_rec = keep[rec_group]
            self.refused_events += int(batch.count[~kept_rec].sum())
            b = batch.bursts((np.cumsum(keep) - 1)[rec_group]).select(kept_rec)
            gnum = gnum[keep]
        keys = list(map(self._fkeys.__getitem__, gnum.tolist()))
        if small:
            return table.feed_bursts(keys, b)  # a few flows: their dict look-ups cost less
        slot, serial = self._fslot[gnum], self._fserial[gnum]
        events = table.feed_bursts(keys, b, (slot, serial))  # refreshes slot and serial
        self._fslot[gnum], self._fserial[gnum] = slot, serial
        return events

    def _numbers_admitted(self, batch: BurstBatch, small: bool = False) -> tuple[IntArray, list[int]]:
        """Each record's flow number (:meth:`_number`), and the numbers of the
        flows the per-source limit refused this poll.

        One vectorised look-up in the key index; then, in record order, the
        raw keys it lacks (decoded once by :meth:`flow_id`, which may rename a
        flow: --key client shows the latest server) and the admission of each
        flow not in the table at its first record, so both happen in the order
        a look-up record by record does them (tests/test_keyindex.py). A
        ``small`` batch is looked up record by record (:data:`SMALL_BATCH`)."""
        keys, n = batch.keys, len(batch)
        idx = self._index
        if not small and idx is not None and idx.fits(keys):
            w = words(keys, idx.width)
            out = idx.lookup(w)
            missing = out < 0
            hit = np.flatnonzero(~missing)
            hnum, hfirst = np.unique(out[hit], return_index=True)
            # flows the table may not hold: admitted (or not) at their first record
            new = ~self.table.holds(self._fslot[hnum], self._fserial[hnum])
            # misses and hits are disjoint: a sort is their union (np.union1d and a bare
            # np.unique import numpy.ma on first use, 40 ms)
            todo: list[int] = np.sort(np.concatenate((np.flatnonzero(missing), hit[hfirst[new]]))).tolist()
        else:
            idx, w, missing = None, None, None
            out = np.full(n, -1, np.int64)
            todo = list(range(n))
        decided: dict[int, bool] = {}  # flow number -> admitted, for the flows looked at
        refused: list[int] = []
        if self._plain(len(todo)):
            self._visit_plain(todo, keys, out, batch.first, decided, refused)
            if idx is not None and missing is not None and missing.any():
                idx.add(w[missing], out[missing])  # type: ignore[index]
            return out, refused

        def visit(i: int) -> None:
            f = int(out[i])
            if f < 0:
                out[i] = f = self._number(self._flow(keys[i]))
            if f not in decided:
                fid = self._fkeys[f]
                ok = fid in self.table or self.limit.admit(self.info(fid).server, int(batch.first[i]) / 1e9)
                decided[f] = ok
                if not ok:
                    refused.append(f)
                    self.refused += 1

        for i in todo:
            visit(i)
            if idx is not None and self._index is not idx:
                # flow_id started its cache over (a new index): the records after this
                # one are looked up in the new cache one by one, as without the index
                # (decoded again, their names refreshed); the new index gets those it holds
                out[i + 1:] = -1
                for j in range(i + 1, n):
                    visit(j)
                held = [j for j in range(i, n) if keys[j] in self._fid]
                self._index.add(w[held], out[held])  # type: ignore[index, union-attr]
                return out, refused
        if idx is not None and missing is not None and missing.any():
            idx.add(w[missing], out[missing])  # type: ignore[index]
        return out, refused

    def _plain(self, new: int) -> bool:
        """Whether up to ``new`` raw keys never seen can be learnt by
        :meth:`_visit_plain`: flows by 5-tuple (a flow's names never change, so
        learning them all before admitting any admits alike) and no cache to be
        started over or names to be forgotten on the way (:meth:`flow_id`'s bounds)."""
        return (self.key_mode == "5tuple" and len(self._fid) + new < 4 * self.max_flows
                and len(self._info) + new <= 2 * self.max_flows + 1024)

    def _visit_plain(self, todo: list[int], keys: Sequence[bytes], out: IntArray, first: IntArray,
                     decided: dict[int, bool], refused: list[int]) -> None:
        """``visit`` of :meth:`_numbers_admitted` for the records ``todo`` when
        :meth:`_plain`: the same numbers in ``out``, names, raw keys, admissions
        and counts, in one loop with :meth:`flow_id`'s and :meth:`_number`'s work
        inlined. Why: an outage's onset brings 50,000 new flows within one p, and
        the calls and repeated look-ups of the general path were half of the
        ~10 µs each one cost (cProfile, bench/bench_storm.py)."""
        if not todo:
            return
        fids, infos, raws, fnum, fkeys = self._fid, self._info, self._raws, self._fnum, self._fkeys
        decode, table, limit = self._decode, self.table, self.limit
        nums: list[int] = out[todo].tolist()
        firsts: list[int] = first[todo].tolist()
        for j, i in enumerate(todo):
            f = nums[j]
            if f < 0:
                raw = keys[i]
                fid: Hashable | None = fids.get(raw)
                if fid is None:
                    if self._index is None:
                        self._index = KeyIndex(len(raw))
                    key = decode(raw)
                    fids[raw] = fid = key
                    if key not in infos:
                        infos[key] = info_of(key)
                    if key in raws:
                        self._learn_raw(raws, key, raw)
                    else:
                        raws[key] = raw
                got = fnum.get(fid)
                if got is None:
                    got = fnum[fid] = len(fkeys)
                    fkeys.append(fid)
                nums[j] = f = got
            if f not in decided:
                fid = fkeys[f]
                ok = fid in table or limit.admit(self.info(fid).server, firsts[j] / 1e9)
                decided[f] = ok
                if not ok:
                    refused.append(f)
                    self.refused += 1
        out[todo] = nums
        self._room(len(fkeys))

    def _room(self, numbers: int) -> None:
        """The slot cache holds flow numbers below ``numbers``."""
        while numbers > self._fslot.size:
            self._fslot = np.concatenate((self._fslot, np.full(self._fslot.size, -1, np.int64)))
            self._fserial = np.concatenate((self._fserial, np.zeros(self._fserial.size, np.int64)))

    def _flow(self, raw: bytes) -> Hashable:
        fid = self._fid.get(raw)
        return self.flow_id(raw) if fid is None else fid

    def _number(self, fid: Hashable) -> int:
        """A flow's number: its place in ``_fkeys`` and in the slot cache."""
        f = self._fnum.get(fid)
        if f is None:
            f = self._fnum[fid] = len(self._fkeys)
            self._fkeys.append(fid)
            if f >= self._fslot.size:
                self._fslot = np.concatenate((self._fslot, np.full(self._fslot.size, -1, np.int64)))
                self._fserial = np.concatenate((self._fserial, np.zeros(self._fserial.size, np.int64)))
        return f

    def _renumber(self) -> None:
        """Forget every flow number (they grow with each flow ever seen); the
        key index maps raw keys to them, so it starts over too."""
        self._fnum, self._fkeys = {}, []
        self._fslot = np.full(1024, -1, np.int64)
        self._fserial = np.zeros(1024, np.int64)
        if self._index is not None:
            self._index.clear()

    def ingest(self, events: Sequence[tuple[bytes, float] | tuple[bytes, float, int]]) -> list[Event]:
        """Feed one poll's candidates (raw key, time[, length]) to the engine in
        one call (one vectorised pass over every flow's arrivals); events in
        order of detection time. The agent feeds burst records
        (:meth:`ingest_bursts`); this is the per-candidate form."""
        if not events:
            return []
        self.events_in += len(events)
        by_raw: dict[bytes, list[float]] = {}
        oldest = events[0][1]
        for raw, t, *_ in events:
            if t < oldest:
                oldest = t
            g = by_raw.get(raw)
            if g is None:
                by_raw[raw] = [t]
            else:
                g.append(t)
        self.oldest = oldest
        groups: dict[Hashable, list[float]] = {}
        table = self.table
        for raw, ts in by_raw.items():
            fid = self._fid.get(raw)
            if fid is None:
                fid = self.flow_id(raw)
            if fid in groups:  # --key client: several connections of one client
                groups[fid].extend(ts)
            elif fid in table or self.limit.admit(self.info(fid).server, ts[0]):
                groups[fid] = ts
            else:
                self.refused += 1
                self.refused_events += len(ts)
        return table.feed_groups(list(groups), list(groups.values()))

    def advance(self, now: float) -> list[Event]:
        return self.table.advance(now)

    def close(self) -> list[Event]:
        return self.table.close()

    def snapshot(self) -> FlowsSnapshot:
        """What the flow view needs, taken in a few memcpy-speed copies (no
        Python step per flow), so the agent holds its loop's lock only for this
        and builds the rows (:meth:`FlowsSnapshot.rows`) after letting go.

        The name and key maps are shared, not copied: the loop only adds to or
        replaces entries of them in place and drops entries by building new
        dicts, so every flow in the copy keeps its name in the maps taken here."""
        return FlowsSnapshot(self.table.copy_columns(), self._info, self._fid, self._decode, self.key_mode)

    def flows(
        self, stats: Iterable[tuple[bytes, dict[str, int]]] = (), offset: float = 0.0
    ) -> list[dict[str, Any]]:
        """The flow objects of docs/contracts.md, plus kernel packet/byte counts when given.
        The engine runs on the arrivals' clock; ``offset`` turns its times into
        the epoch seconds shown (the agent passes wall minus monotonic, now)."""
        return self.snapshot().rows(stats, offset)


@dataclass(frozen=True, slots=True)
class FlowsSnapshot:
    """The flow view at one instant (:meth:`LiveFlows.snapshot`), safe to read
    on another thread while the loop goes on."""

    cols: FlowColumns
    names: dict[Hashable, FlowInfo]
    fids: dict[bytes, Hashable]
    decode: Callable[[bytes], FlowKey]
    key_mode: str

    def _fid(self, raw: bytes) -> Hashable:
        fid = self.fids.get(raw)
        if fid is not None:
            return fid
        return flow_of(self.decode(raw), self.key_mode)[0]  # not cached: the loop owns the caches

    def rows(
        self, stats: Iterable[tuple[bytes, dict[str, int]]] = (), offset: float = 0.0,
        stalling: bool = False, limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """The flow objects (see :meth:`LiveFlows.flows`), least recently fed
        first; ``stalling``: only flows in a stall; ``limit``: only the most
        recently fed ``limit`` of those."""
        c = self.cols
        slots = c.slots(stalling)
        if limit is not None:
            slots = slots[max(0, len(slots) - limit):]
        per: dict[Hashable, dict[str, int]] = {}
        for raw, st in stats:
            try:
                fid = self._fid(raw)
            except Exception:  # a key the decoder rejects is just not shown
                continue
            acc = per.setdefault(fid, {"packets": 0, "bytes": 0})
            acc["packets"] += int(st.get("packets", 0))
            acc["bytes"] += int(st.get("bytes", 0))
        in_stall, cands, stalls = c.in_stall.tolist(), c.cands.tolist(), c.stalls.tolist()
        last_seen, stall_start, last_dur = c.last_seen.tolist(), c.stall_start.tolist(), c.last_dur.tolist()

        def opt(t: float, off: float = 0.0) -> float | None:
            return None if t != t else t + off  # NaN: never set

        out = []
        for s in slots:
            fid = c.keys[s]
            info = self.names.get(fid) or FlowInfo(str(fid), str(fid), "")
            rec: dict[str, Any] = {
                "flow": info.label,
                "client": info.client,
                "server": info.server,
                "state": "stall" if in_stall[s] else "normal",
                "candidates": cands[s],
                "stalls": stalls[s],
                "stall_start": opt(stall_start[s], offset),
                "last_duration": opt(last_dur[s]),
                "last_seen": opt(last_seen[s], offset),
                "key": self.key_mode,
            }
            k = per.get(fid)
            if k is not None:
                rec.update(k)
            out.append(rec)
        return out
