"""The agent's live flow view (LiveFlows) and its Prometheus metrics, fed with
data-plane event tuples exactly as Datapath.poll returns them."""

from __future__ import annotations

import ipaddress
import struct
import urllib.request

import numpy as np
import pytest

from iqn_ctl.engine.flowkey import FlowKey
from iqn_ctl.engine.params import SignalParams
from iqn_ctl.engine.synth import SignalModel, signal_times
from iqn_ctl.engine.tracker import StallEnded, StallStarted
from iqn_ctl.live.agent import AgentError, LiveFlows
from iqn_ctl.live.layout import KEY_SIZE, decode_key
from iqn_ctl.live.metrics import AgentMetrics

FIELDS = {"flow", "client", "server", "state", "candidates", "stalls", "stall_start", "last_duration",
          "last_seen"}


def raw_key(server: str, sport: int, client: str, dport: int) -> bytes:
    """struct flow_key bytes as the XDP program writes them."""
    s, c = ipaddress.ip_address(server), ipaddress.ip_address(client)
    raw = s.packed.ljust(16, b"\0") + c.packed.ljust(16, b"\0") + struct.pack("!HH", sport, dport)
    return (raw + bytes([s.version])).ljust(KEY_SIZE, b"\0")


A = raw_key("198.18.0.1", 443, "198.18.0.2", 50001)
B = raw_key("198.18.0.1", 443, "198.18.0.2", 50002)
V6 = raw_key("fd00::1", 443, "fd00::2", 50003)


def events(raw: bytes, times: np.ndarray) -> list[tuple[bytes, float, int]]:
    return [(raw, float(t), 1250) for t in times]


def run(flows: LiveFlows, evs: list[tuple[bytes, float, int]], step: float = 0.05) -> list[object]:
    """Drive it like the agent loop: one poll's events, then advance(now)."""
    evs = sorted(evs, key=lambda e: e[1])
    out: list[object] = []
    t, i = evs[0][1], 0
    end = evs[-1][1] + 2.0
    while t < end:
        batch = []
        while i < len(evs) and evs[i][1] <= t:
            batch.append(evs[i])
            i += 1
        out += flows.ingest(batch)
        out += flows.advance(t)
        t += step
    return out


def test_key_decoding_matches_datapath() -> None:
    assert decode_key(A).label == "198.18.0.1:443>198.18.0.2:50001"
    assert decode_key(V6).label == "[fd00::1]:443>[fd00::2]:50003"


def test_stall_per_flow_and_json_shape() -> None:
    sig = signal_times([(1000.0, 1003.0)], SignalModel(), np.random.default_rng(3))
    bulk_like = np.arange(1000.0, 1004.0, 0.5)  # one candidate every 0.5 s: never n in w_start
    lf = LiveFlows(SignalParams())
    out = run(lf, events(A, sig) + events(B, bulk_like) + events(V6, sig + 0.01))
    started = [e for e in out if isinstance(e, StallStarted)]
    ended = [e for e in out if isinstance(e, StallEnded)]
    assert sorted(str(lf.info(e.flow).label) for e in started) == [
        "198.18.0.1:443>198.18.0.2:50001", "[fd00::1]:443>[fd00::2]:50003"]
    assert len(ended) == 2 and all(abs(e.duration - 3.0) < 0.3 for e in ended)
    rows = {r["flow"]: r for r in lf.flows([(A, {"packets": 90, "bytes": 9000, "candidates": 1})])}
    assert set(rows) == {decode_key(k).label for k in (A, B, V6)}
    for r in rows.values():
        assert FIELDS <= set(r)
    a = rows[decode_key(A).label]
    assert (a["state"], a["stalls"], a["candidates"], a["client"], a["server"]) == (
        "normal", 1, sig.size, "198.18.0.2", "198.18.0.1")
    assert a["packets"] == 90 and a["bytes"] == 9000
    assert rows[decode_key(B).label]["stalls"] == 0


def test_state_during_stall() -> None:
    sig = signal_times([(1000.0, 1005.0)], SignalModel(), np.random.default_rng(4))
    lf = LiveFlows(SignalParams())
    lf.ingest(events(A, sig[sig < 1002.0]))
    lf.advance(1002.0)
    (row,) = lf.flows()
    assert row["state"] == "stall" and row["stall_start"] is not None and row["stall_start"] < 1001.0
    assert row["last_duration"] is None


def test_client_key_merges_a_signal_split_over_connections() -> None:
    """Each burst's toggles answered on four connections (one each, n = 4): no
    single 5-tuple carries a signal, the client does."""
    sig = signal_times([(1000.0, 1003.0)], SignalModel(), np.random.default_rng(5))
    conns = [A, B, raw_key("198.18.0.3", 443, "198.18.0.2", 50001),
             raw_key("198.18.0.1", 443, "198.18.0.2", 9)]
    evs = [e for i, c in enumerate(conns) for e in events(c, sig[i::4])]
    per_flow = [e for e in run(LiveFlows(SignalParams()), evs) if isinstance(e, StallEnded)]
    lf = LiveFlows(SignalParams(), key_mode="client")
    per_client = [e for e in run(lf, evs) if isinstance(e, StallEnded)]
    assert per_flow == []
    assert len(per_client) == 1 and per_client[0].flow == "198.18.0.2"
    (row,) = lf.flows([(A, {"packets": 5, "bytes": 50}), (B, {"packets": 7, "bytes": 70})])
    assert (row["flow"], row["client"], row["stalls"], row["packets"]) == ("198.18.0.2", "198.18.0.2", 1, 12)
    assert row["candidates"] == sig.size


def test_bad_key_mode() -> None:
    with pytest.raises(AgentError, match="--key must be one of"):
        LiveFlows(SignalParams(), key_mode="server")


def test_metrics_exposition() -> None:
    snap = {"packets": 1234, "candidates": 56, "lost": 7, "parse_errors": 1, "flows": 3, "flows_in_stall": 2}
    m = AgentMetrics("veth9", lambda: snap)
    m.serve(0, "127.0.0.1")
    try:
        m.stall_started()
        m.stall_started()
        m.stall_ended(2.4)
        body = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5).read().decode()
    finally:
        m.close()
    want = [
        'iqn_packets_total{iface="veth9"} 1234.0', 'iqn_candidates_total{iface="veth9"} 56.0',
        'iqn_lost_events_total{iface="veth9"} 7.0', 'iqn_flows{iface="veth9"} 3.0',
        'iqn_flows_in_stall{iface="veth9"} 2.0', 'iqn_stalls_started_total{iface="veth9"} 2.0',
        'iqn_stalls_ended_total{iface="veth9"} 1.0',
        'iqn_stall_duration_seconds_bucket{iface="veth9",le="2.0"} 0.0',
        'iqn_stall_duration_seconds_bucket{iface="veth9",le="3.0"} 1.0',
        'iqn_stall_duration_seconds_sum{iface="veth9"} 2.4',
    ]
    for line in want:
        assert line in body, line


def _decode_by_ctypes(raw: bytes) -> FlowKey:
    """The reference: struct flow_key read through its ctypes twin (FlowKeyC)."""
    import socket

    from iqn_ctl.live.layout import FlowKeyC

    k = FlowKeyC.from_buffer_copy(raw[:KEY_SIZE])
    sport, dport = socket.ntohs(k.sport), socket.ntohs(k.dport)
    if k.family == 6:
        return FlowKey(str(ipaddress.IPv6Address(bytes(k.saddr))), sport,
                       str(ipaddress.IPv6Address(bytes(k.daddr))), dport, 6)
    return FlowKey(str(ipaddress.IPv4Address(bytes(k.saddr)[:4])), sport,
                   str(ipaddress.IPv4Address(bytes(k.daddr)[:4])), dport, k.family)


def test_decode_key_reads_what_the_ctypes_layout_says() -> None:
    """decode_key's struct formats against FlowKeyC on random keys: IPv4, IPv6,
    other family bytes, garbage in the unused address bytes, longer buffers."""
    import random

    rng = random.Random(19)
    for i in range(5000):
        raw = bytearray(rng.randbytes(KEY_SIZE + rng.choice([0, 0, 4, 13])))
        raw[36] = rng.choice([4, 4, 6, 6, 0, 17, 255])
        if i % 3 == 0:
            raw[4:16] = bytes(12)
            raw[20:32] = bytes(12)
        got = decode_key(bytes(raw))
        assert got == _decode_by_ctypes(bytes(raw)), bytes(raw).hex()
        assert hash(got) == hash(_decode_by_ctypes(bytes(raw)))


def test_raws_of_one_flow_from_several_keys_newest_last_in_both_paths() -> None:
    """Raw keys that differ only in bytes decode_key ignores (the protocol byte,
    the padding) are one flow by 5-tuple: raws() lists them in the order they were
    first seen (a key seen again is known: it does not move), whether learnt by
    flow_id or by polls through the key index (LiveFlows._visit_plain)."""
    from iqn_ctl.engine.params import BURST_MAX
    from iqn_ctl.live.bursttable import BurstBatch

    a = A
    b = A[:37] + bytes([6]) + A[38:]
    c = A[:38] + bytes([1, 2])
    for by_poll in (False, True):
        lf = LiveFlows(SignalParams(0.2, 4), reorder=0.0, source_rate=0)
        for k, raw in enumerate([a, b, a, c]):
            if by_poll:
                batch = BurstBatch([raw] * 70, np.full(70, 10**12 + k, np.int64), np.ones(70, np.int64),
                                   np.zeros((70, BURST_MAX), np.int64))
                lf.ingest_bursts(batch)
            else:
                lf.flow_id(raw)
        fid = lf.flow_id(a)
        assert lf.raws(fid) == [a, b, c]
        assert lf.info(fid).label == "198.18.0.1:443>198.18.0.2:50001"
        assert lf.raws(decode_key(B)) == []
