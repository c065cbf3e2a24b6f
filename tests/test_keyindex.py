"""The agent's per-record flow look-up without Python objects per record.

* :class:`~iqn_ctl.live.keyindex.KeyIndex` answers like a dict on random
  keys and operation sequences (adds of new and known keys, repeated keys in
  one batch, growth, clears), with the real hash and with hashes that make
  every key collide (long probe chains, wrap-around at the table's end).
* ``LiveFlows.ingest_bursts`` (key index, then each flow's remembered engine
  slot) gives the same events, counters, names and raw keys as the dict
  look-up it replaced (a Python step per record, kept here as the reference)
  on random polls of many connections: evictions from a small table (slots
  reused by other flows: stale remembered slots), the raw-key cache starting
  over, idle expiry, the per-source limit refusing flows, ``--key client``
  (several raw keys, one flow) and keys of another width (the dict fallback).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iqn_ctl.engine.params import BURST_MAX, SignalParams
from iqn_ctl.live import flows as flows_mod
from iqn_ctl.live.bursttable import BurstBatch
from iqn_ctl.live.flows import LiveFlows
from iqn_ctl.live.keyindex import U64, KeyIndex, fingerprints, words


def _constant(w: U64) -> U64:
    return np.zeros(w.shape[0], np.uint64)


def _two_bits(w: U64) -> U64:
    return fingerprints(w) & np.uint64(3)


def _near_end(w: U64) -> U64:
    """Every key hashes to the table's last positions: probing wraps to the start."""
    return np.full(w.shape[0], np.uint64(2**64 - 1)) - (w[:, 0] & np.uint64(1))


HASHERS: dict[str, Callable[[U64], U64]] = {
    "real": fingerprints, "constant": _constant, "two_bits": _two_bits, "near_end": _near_end}


@st.composite
def index_ops(draw: st.DrawFn) -> tuple[int, list[tuple[str, Any]]]:
    """A key width and a sequence of (op, argument): adds of batches (keys from
    a small pool, so repeats, also within a batch), lookups, clears."""
    width = draw(st.sampled_from([1, 7, 8, 13, 40]))
    pool = draw(st.lists(st.binary(min_size=width, max_size=width), min_size=1, max_size=60, unique=True))
    ops: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["add", "add", "lookup", "clear"]))
        if kind == "clear":
            ops.append((kind, None))
            continue
        keys = draw(st.lists(st.sampled_from(pool), max_size=40))
        if kind == "add":
            ops.append((kind, (keys, draw(st.lists(st.integers(0, 2**40), min_size=len(keys),
                                                   max_size=len(keys))))))
        else:
            ops.append((kind, keys + [bytes(width)]))  # one likely absent key
    return width, ops


@settings(max_examples=200, deadline=None)
@given(index_ops(), st.sampled_from(sorted(HASHERS)))
def test_key_index_answers_like_a_dict(case: tuple[int, list[tuple[str, Any]]], hasher: str) -> None:
    width, ops = case
    idx = KeyIndex(width, HASHERS[hasher])
    ref: dict[bytes, int] = {}
    for kind, arg in ops:
        if kind == "clear":
            idx.clear()
            ref.clear()
        elif kind == "add":
            keys, vals = arg
            idx.add(keys, vals)
            ref.update(zip(keys, vals, strict=True))
        else:
            assert idx.lookup(arg).tolist() == [ref.get(k, -1) for k in arg]
            assert idx.lookup(words(arg, width)).tolist() == [ref.get(k, -1) for k in arg]
        assert len(idx) == len(ref)
    everything = list(ref)
    assert idx.lookup(everything).tolist() == [ref[k] for k in everything]


def test_key_index_grows_past_its_first_size_with_every_key_colliding() -> None:
    """Thousands of keys on one probe chain (a hash that says nothing): still exact."""
    keys = [i.to_bytes(40, "little") for i in range(3000)]
    idx = KeyIndex(40, _constant)
    idx.add(keys[:1000], range(1000))
    idx.add(keys[1000:], range(1000, 3000))
    assert idx.lookup(keys[::-1]).tolist() == list(range(2999, -1, -1))
    assert idx.lookup([bytes(39) + b"\x01" * 1]).tolist() == [-1]


def test_key_index_refuses_keys_of_another_width() -> None:
    idx = KeyIndex(40)
    assert idx.fits([bytes(40)] * 3) and not idx.fits([bytes(40), bytes(44)])
    with pytest.raises(ValueError, match="40 bytes"):
        idx.add([bytes(41)], [1])


# -- LiveFlows: the index path against the per-candidate (dict) path ------------------------------


def _raw(server: int, client: int, port: int, width: int = 40) -> bytes:
    """struct flow_key bytes (decode_key reads the first 40 of longer ones)."""
    key = (bytes([198, 18, 0, server]) + bytes(12) + bytes([198, 18, 1, client]) + bytes(12)
           + (443).to_bytes(2, "big") + port.to_bytes(2, "big") + bytes([4, 17, 0, 0]))
    return key + bytes(width - 40)


@st.composite
def poll_runs(draw: st.DrawFn) -> dict[str, Any]:
    """Polls of burst records over up to 24 connections (2 servers, 4 clients),
    in order of first time; bursts of 1..4 candidates a few ms apart, often
    4 in a row (stalls), gaps up to 2 s, now and then a jump past the idle
    timeout; sometimes one key 4 bytes longer (another width)."""
    conns = draw(st.integers(1, 24))
    raws = [_raw(1 + i % 2, 1 + (i // 2) % 4, 40000 + i) for i in range(conns)]
    if draw(st.booleans()):
        raws[0] = _raw(1, 1, 40000, width=44)
    polls = []
    t = 5_000_000_000_000
    for _ in range(draw(st.integers(1, 14))):
        recs = []
        for c in draw(st.lists(st.integers(0, conns - 1), max_size=16)):
            count = draw(st.integers(1, 4))
            gap = draw(st.sampled_from([1_000_000, 2_000_000, 3_000_000]))
            recs.append((c, t + draw(st.integers(0, 40)) * 1_000_000, count, gap))
        recs.sort(key=lambda r: r[1])
        polls.append(recs)
        t += draw(st.sampled_from([50, 100, 200, 400, 2000, 400_000])) * 1_000_000
    return {"raws": raws, "polls": polls, "max_flows": draw(st.sampled_from([1, 2, 3, 5, 64])),
            "key_mode": draw(st.sampled_from(["5tuple", "client"])),
            "rate": draw(st.sampled_from([0.0, 1.0, 3.0]))}


def _batch(raws: list[bytes], recs: list[tuple[int, int, int, int]]) -> BurstBatch:
    off = np.zeros((len(recs), BURST_MAX), np.int64)
    for i, (_, _, count, gap) in enumerate(recs):
        off[i, :count] = np.arange(count) * gap
    return BurstBatch([raws[c] for c, *_ in recs], np.array([r[1] for r in recs], np.int64),
                      np.array([r[2] for r in recs], np.int64), off)


def dict_ingest_bursts(lf: LiveFlows, batch: BurstBatch) -> list[Any]:
    """The reference: ``LiveFlows.ingest_bursts`` as it was before the key index,
    a dict look-up (and a Python step) per record, on the same LiveFlows parts."""
    if not len(batch):
        return []
    lf.events_in += batch.candidates
    firsts = batch.first.tolist()
    lf.oldest = min(firsts) / 1e9
    table = lf.table
    groups: dict[Any, int] = {}
    keys: list[Any] = []
    flow = np.empty(len(batch), np.int64)
    counts = batch.count.tolist()
    for i, raw in enumerate(batch.keys):
        fid = lf._fid.get(raw)
        if fid is None:
            fid = lf.flow_id(raw)
        g = groups.get(fid)
        if g is None:
            if fid in table or lf.limit.admit(lf.info(fid).server, firsts[i] / 1e9):
                g = len(keys)
                keys.append(fid)
            else:
                g = -1
                lf.refused += 1
            groups[fid] = g
        if g < 0:
            lf.refused_events += counts[i]
        flow[i] = g
    b = batch.bursts(flow)
    if (flow < 0).any():
        b = b.select(flow >= 0)
    return table.feed_bursts(keys, b)


@settings(max_examples=150, deadline=None)
@given(poll_runs(), st.sampled_from([0, 0, 6]))
def test_live_flows_index_path_equals_the_dict_path(run: dict[str, Any], small: int) -> None:
    """``small``: LiveFlows' SMALL_BATCH (0: every poll through the key index;
    6: the smaller ones record by record, the paths alternating)."""
    with patch.object(flows_mod, "SMALL_BATCH", small):
        _index_path_equals_the_dict_path(run)


def _index_path_equals_the_dict_path(run: dict[str, Any]) -> None:
    raws, prm = run["raws"], SignalParams(0.2, 4)
    kw = {"key_mode": run["key_mode"], "max_flows": run["max_flows"], "reorder": 0.0,
          "source_rate": run["rate"]}
    fast, ref = LiveFlows(prm, **kw), LiveFlows(prm, **kw)
    got, want = [], []
    for recs in run["polls"]:
        batch = _batch(raws, recs)
        got += fast.ingest_bursts(batch)
        want += dict_ingest_bursts(ref, batch)
        if recs:
            now = (max(r[1] for r in recs) + 8_000_000) / 1e9
            got += fast.advance(now)
            want += ref.advance(now)
        assert got == want
        assert fast.flows() == ref.flows()
    assert got + fast.close() == want + ref.close()
    assert (fast.events_in, fast.refused, fast.refused_events, fast.oldest) == (
        ref.events_in, ref.refused, ref.refused_events, ref.oldest)
    assert (fast.table.evicted, fast.table.expired) == (ref.table.evicted, ref.table.expired)
    for v in ref.table:
        assert fast.raws(v.flow) == ref.raws(v.flow) and fast.info(v.flow) == ref.info(v.flow)


@patch.object(flows_mod, "SMALL_BATCH", 0)
def test_live_flows_remembered_slots_survive_a_slot_given_to_another_flow() -> None:
    """A flow evicted from a one-flow table comes back after its slot went to
    another flow: its remembered slot is stale and must not be fed."""
    prm = SignalParams(0.2, 4)
    a, b = _raw(1, 1, 40000), _raw(1, 2, 40001)
    fast, ref = LiveFlows(prm, max_flows=1, reorder=0.0, source_rate=0), \
        LiveFlows(prm, max_flows=1, reorder=0.0, source_rate=0)
    t = 5_000_000_000_000
    got, want = [], []
    for k, raw in enumerate([a, b, a, a, b, a]):
        batch = _batch([raw], [(0, t + k * 200_000_000, 4, 2_000_000)])
        got += fast.ingest_bursts(batch)
        want += dict_ingest_bursts(ref, batch)
    assert got == want and fast.table.evicted == ref.table.evicted == 4
    assert [v.flow for v in fast.table] == [v.flow for v in ref.table]


@patch.object(flows_mod, "SMALL_BATCH", 0)
def test_live_flows_flow_numbers_start_over_without_changing_a_result() -> None:
    """Flow numbers grow with every flow ever seen, so past 4 x max_flows + 1024
    of them they (and the key index) start over: 1,500 connections through a
    two-flow table, against the dict look-up."""
    prm = SignalParams(0.2, 4)
    fast = LiveFlows(prm, max_flows=2, reorder=0.0, source_rate=0)
    ref = LiveFlows(prm, max_flows=2, reorder=0.0, source_rate=0)
    raws = [_raw(1 + i % 2, 1 + (i // 2) % 200, 1000 + i) for i in range(1500)]
    t, got, want, renumbered = 5_000_000_000_000, [], [], False
    for k in range(0, 3000, 7):
        recs = [(c % 1500, t + k * 10_000_000 + j, 4, 2_000_000) for j, c in enumerate(range(k, k + 7))]
        batch = _batch(raws, recs)
        before = len(fast._fkeys)
        got += fast.ingest_bursts(batch)
        want += dict_ingest_bursts(ref, batch)
        renumbered |= len(fast._fkeys) < before
    assert renumbered and got == want and len(got) > 100
    assert got + fast.close() == want + ref.close()
    assert fast.flows() == ref.flows()
