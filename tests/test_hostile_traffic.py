"""Hostile traffic and load (issue 10, part A): what a forged or flooding
sender must not be able to do to a viewer's stall.

* Per-stall work is an index look-up: ``LiveFlows.raws()`` touches the same
  number of keys with 1,000 flows as with 100,000 (counted, not timed; the
  cost is in bench/bench_hostile.py).
* A flood of 65,536+ one-packet flows in the middle of a stall evicts calm
  flows, never the stalling one: the stall ends on its own, not ``truncated``.
* One source (server address) gets ``--source-rate`` new flows a second into
  the table; the rest are refused and counted, so it cannot push other
  servers' flows out either.
* When the kernel's LRU drops a flow's entry during its stall, the bulk check
  cannot tell, and the stall's record says ``"bulk_check": "unknown"``: a real
  agent, a small ``--max-flows`` and a flood of other flows through real XDP.

The ``--key client`` forged-candidate case is covered by
``tests/test_bulk_rule.py::test_live_client_key_bulk_on_another_connection_keeps_the_stall``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from test_agent_flows import raw_key
from test_agent_live import cli, need_xdp, poll_until, stop, wait_ready

from iqn_ctl.engine.flowkey import FlowKey
from iqn_ctl.engine.params import DEFAULT_MAX_FLOWS, DEFAULT_SOURCE_RATE, SignalParams
from iqn_ctl.engine.synth import SignalModel, signal_times
from iqn_ctl.engine.tracker import StallEnded, StallTracker
from iqn_ctl.live.api import request, sock_path
from iqn_ctl.live.flows import MAX_SOURCES, RAWS_PER_FLOW, LiveFlows, SourceLimit
from iqn_ctl.live.history import History, StallRecord
from iqn_ctl.live.layout import decode_key
from iqn_lab.testbed import PY, payload_len
from iqn_lab.testbed import Testbed as Lab

PRM = SignalParams()
T0 = 1000.0  # a monotonic clock's seconds: the agent's engine runs on CLOCK_MONOTONIC


def flood_key(i: int, server: str = "198.18.200.1") -> bytes:
    """The i-th one-packet flow of a flood: one server, distinct client ports/addresses."""
    return raw_key(server, 443, f"198.18.{100 + (i >> 16)}.{(i >> 8) & 0xFF}", 1024 + (i & 0xFF))


# -- raws(): an index, not a scan -----------------------------------------------------


class CountingKey(FlowKey):
    """A FlowKey that counts how often it is compared: the work raws() does."""

    __slots__ = ()
    compared = 0

    def __eq__(self, other: object) -> bool:
        CountingKey.compared += 1
        return FlowKey.__eq__(self, other)

    __hash__ = FlowKey.__hash__


def counting_decode(raw: bytes) -> FlowKey:
    return CountingKey(*dataclasses.astuple(decode_key(raw)))


def comparisons_per_raws(n_flows: int) -> int:
    lf = LiveFlows(PRM, decode=counting_decode, source_rate=0)
    keys = [flood_key(i) for i in range(n_flows)]
    for k in keys:
        lf.flow_id(k)  # as ingest() learns each new key
    viewer = keys[n_flows // 2]
    fid = lf.flow_id(viewer)
    CountingKey.compared = 0
    got = lf.raws(fid)
    assert got == [viewer]
    return CountingKey.compared


def test_raws_touches_the_same_few_keys_whatever_the_number_of_flows() -> None:
    small, large = comparisons_per_raws(1_000), comparisons_per_raws(100_000)
    assert small == large <= 2, (small, large)


def test_raws_of_a_client_are_its_newest_connections_bounded() -> None:
    lf = LiveFlows(PRM, key_mode="client", source_rate=0)
    conns = [raw_key(f"198.18.7.{1 + i % 200}", 443, "198.18.0.2", 2000 + i)
             for i in range(RAWS_PER_FLOW + 10)]
    other = raw_key("198.18.7.1", 443, "198.18.0.3", 2000)
    for c in [*conns, other]:
        lf.flow_id(c)
    assert lf.raws("198.18.0.2") == conns[10:]  # newest learned kept, oldest dropped
    assert lf.raws("198.18.0.3") == [other]
    assert lf.raws("198.18.0.9") == []


# -- a flood mid-stall -------------------------------------------------------------------


def viewer_times(seed: int, start: float, end: float) -> np.ndarray:
    return signal_times([(start, end)], SignalModel(), np.random.default_rng(seed))


def drive(lf: LiveFlows, evs: list[tuple[bytes, float, int]], step: float = 0.003) -> list[object]:
    """Like the agent's loop: one poll's events every ``step`` s, then advance()."""
    evs.sort(key=lambda e: e[1])
    out: list[object] = []
    i, t = 0, evs[0][1]
    end = evs[-1][1] + 2.0
    while t < end:
        j = i
        while j < len(evs) and evs[j][1] <= t:
            j += 1
        out += lf.ingest(evs[i:j])
        out += lf.advance(t)
        i, t = j, t + step
    return out + lf.close()


def solo_stalls(times: np.ndarray) -> list[tuple[float, float, int, bool]]:
    tr = StallTracker(PRM, reorder=0.0)
    evs = tr.feed(times) + tr.advance(float(times[-1]) + 2.0) + tr.close()
    return [(e.start, e.end, e.candidates, e.truncated) for e in evs if isinstance(e, StallEnded)]


FLOOD = DEFAULT_MAX_FLOWS + 1_000  # more one-packet flows than the table holds


def test_flood_of_one_packet_flows_mid_stall_does_not_cut_the_stall() -> None:
    """65,536 + 1,000 one-packet flows between two bursts of a 3 s signal,
    1 s into it, through a default-size table (no per-source limit: the
    eviction order alone must protect the stall). The viewer is then the
    least recently seen flow: a plain LRU would evict it."""
    sig = viewer_times(1, T0, T0 + 3.0)
    viewer = raw_key("198.18.0.1", 443, "198.18.0.2", 50001)
    lf = LiveFlows(PRM, reorder=0.0, source_rate=0)
    k = int(np.searchsorted(sig, T0 + 1.0))
    gap0, gap = float(sig[k - 1]) + 0.001, float(sig[k] - sig[k - 1]) - 0.002
    assert gap > 0.1, "no gap between bursts there"
    flood = [(flood_key(i), gap0 + gap * i / FLOOD, 1250) for i in range(FLOOD)]
    out = drive(lf, [(viewer, float(t), 1250) for t in sig] + flood)
    got = [(e.start, e.end, e.candidates, e.truncated) for e in out
           if isinstance(e, StallEnded) and e.flow == decode_key(viewer)]
    assert got == solo_stalls(sig) and got and not got[0][3], got
    assert all(e.flow == decode_key(viewer) for e in out if isinstance(e, StallEnded))
    assert len(lf.table) == DEFAULT_MAX_FLOWS
    assert lf.table.evicted == 1 + FLOOD - DEFAULT_MAX_FLOWS  # one evicted per flow over the bound


def test_one_source_cannot_flood_out_other_servers_flows() -> None:
    """The same flood from one server address against a 4,096-flow table with
    the default --source-rate: that source gets its burst plus the rate's worth
    into the table, every other flow is refused and counted, and 500 calm flows
    of other servers (between stalls, so eviction does not protect them) stay."""
    rate = DEFAULT_SOURCE_RATE
    lf = LiveFlows(PRM, max_flows=4096, reorder=0.0)
    calm = [raw_key(f"198.18.3.{1 + i % 250}", 443, "198.18.0.2", 30000 + i) for i in range(500)]
    evs = [(k, T0 + 0.001 * i, 1250) for i, k in enumerate(calm)]
    secs = 1.2
    evs += [(flood_key(i), T0 + 1.0 + secs * i / FLOOD, 1250) for i in range(FLOOD)]
    drive(lf, evs)
    tracked = {lf.info(tr.flow).server for tr in lf.table}
    assert all(lf.table.get(decode_key(k)) is not None for k in calm), "a calm flow was pushed out"
    admitted = FLOOD - lf.refused
    assert rate <= admitted <= rate + rate * secs + 1, (admitted, lf.refused)
    assert lf.refused_events == lf.refused  # one candidate per refused flow
    assert tracked >= {"198.18.200.1"} and lf.table.evicted == 0


def test_source_limit_bucket() -> None:
    lim = SourceLimit(8.0)
    assert [lim.admit("a", 5.0) for _ in range(9)] == [True] * 8 + [False]  # a burst of rate
    assert lim.admit("b", 5.0)  # another source has its own bucket
    assert not lim.admit("a", 5.0625)  # half a token back
    assert lim.admit("a", 5.125) and not lim.admit("a", 5.125)  # one token per 1/rate s
    assert not lim.admit("a", 4.0)  # a clock that goes back adds nothing
    assert [lim.admit("a", 100.0) for _ in range(9)] == [True] * 8 + [False]  # full again, not more
    assert all(SourceLimit(0).admit("a", 5.0) for _ in range(1000))  # 0: no limit
    many = SourceLimit(1.0)
    for i in range(3 * MAX_SOURCES):
        assert many.admit(f"10.{i}", 7.0)
    assert len(many._buckets) <= MAX_SOURCES


# -- the record says when the bulk check could not tell ----------------------------------

OLD_SCHEMA = """
CREATE TABLE stalls (
    id INTEGER PRIMARY KEY AUTOINCREMENT, iface TEXT NOT NULL, flow TEXT NOT NULL,
    client TEXT NOT NULL, server TEXT NOT NULL, start REAL NOT NULL, "end" REAL NOT NULL,
    candidates INTEGER NOT NULL, detected_at REAL NOT NULL,
    truncated INTEGER NOT NULL DEFAULT 0, estimator TEXT NOT NULL DEFAULT '');
INSERT INTO stalls (iface, flow, client, server, start, "end", candidates, detected_at, truncated,
    estimator) VALUES ('eth0', 'f', 'c', 's', 1.0, 2.0, 8, 2.5, 0, 'count');
"""


@pytest.mark.parametrize("create", [True, False])
def test_history_written_by_an_older_agent_gains_bulk_check(tmp_path: Path, create: bool) -> None:
    """A history file from before the field: opened by the agent (create) or
    by ``iqn-ctl stalls`` (not), its rows read with bulk_check "" and new rows
    keep theirs."""
    db = sqlite3.connect(tmp_path / "stalls.sqlite")
    db.executescript(OLD_SCHEMA)
    db.close()
    with History(tmp_path, create=create) as h:
        (old,) = h.query()
        assert (old.flow, old.bulk_check) == ("f", "")
        new = StallRecord("eth0", "g", "c", "s", 3.0, 4.0, 8, 4.5, False, "count", bulk_check="unknown")
        h.add([new])
        assert [(r.flow, r.bulk_check, r.as_json()["bulk_check"]) for r in h.query()] == [
            ("f", "", ""), ("g", "unknown", "unknown")]


# -- live: a flood through real XDP mid-stall ---------------------------------------------

LIVE_P = 0.5  # w_end = 2 s: the flood is sent well before the stall can end
LIVE_MAX_FLOWS = 256
LIVE_FLOOD = 3000

#: two packets per flow: the kernel's LRU recycles entries that were never hit
#: again first, so a flood of one-packet flows only replaces its own entries
#: (tested: the viewer's entry survives 3,000 of them); flows hit twice push
#: the older entries, the viewer's among them, out. Each CPU keeps new entries
#: on a local list that only its own inserts flush, so the flood is sent from
#: every CPU in turn: wherever the viewer's entry was made, it is reached
FLOOD_SENDER = """
import json, os, socket, sys, time
src, dst, at, count, size = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 443))
data = bytes(size)
while time.time() < at:
    time.sleep(0.001)
cpus = sorted(os.sched_getaffinity(0))
t0 = time.time()
for i in range(count):
    if i % 500 == 0:  # alternate CPUs: each CPU's share of the LRU (its pending list) is flushed
        os.sched_setaffinity(0, {cpus[(i // 500) % len(cpus)]})
    s.sendto(data, (dst, 10000 + i))
    s.sendto(data, (dst, 10000 + i))
print(json.dumps({"t0": t0, "t1": time.time()}))
"""


def _flow_slot(src: str, dst: str, dport: int) -> int:
    import ipaddress

    from iqn_ctl.live.datapath import VOL_SLOTS
    from iqn_ctl.live.layout import flow_hashes, slot_tag

    addr = [ipaddress.ip_address(a).packed.ljust(16, b"\0") for a in (src, dst)]
    raw = addr[0] + addr[1] + (443).to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes([4, 17, 0, 0])
    return int(slot_tag(flow_hashes([raw]), VOL_SLOTS)[0][0])


def test_live_flood_mid_stall_keeps_the_stall_and_its_bulk_check(tmp_path: Path) -> None:
    """A real agent with ``--max-flows 256`` (the engine's table): viewer A
    signals for 3 s; right after its last candidate, 3,000 two-packet flows
    of candidates from another server address flood the interface. The
    kernel's volume array keeps A's counters unless a flood flow's candidate
    claims A's slot (computed here: then the check is ``unknown``, said in the
    record and the log, else ``ok``); the engine keeps A's stall (not
    truncated, right duration); the flood is partly refused (one source) and
    evicts only calm flows. Viewer B's stall ended before the flood: ``ok``."""
    need_xdp()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    state = tmp_path / "s"
    model = SignalModel(params=SignalParams(LIVE_P))
    with Lab() as lab:
        agent = subprocess.Popen(
            # the flood has no client side: it reaches the engine only without the forgery
            # guard (--pairing off, a mirror port), which is what this test is about
            lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(state), "--p", str(LIVE_P),
                          "--max-flows", str(LIVE_MAX_FLOWS), "--pairing", "off", "--cap", "0"),
            env=env, stderr=subprocess.PIPE, text=True)
        snd: subprocess.Popen[str] | None = None
        try:
            sock = sock_path(tmp_path / "run", lab.cli_if)
            wait_ready(sock, agent)
            base = time.time() + 2.0  # absolute send times: both senders start up first
            sig_a = [float(t) for t in signal_times([(0.0, 3.0)], model, np.random.default_rng(21))]
            sig_b = [float(t) for t in signal_times([(0.0, 1.0)], model, np.random.default_rng(22))]
            v = dict(src=lab.srv4, dst=lab.cli4, frame=1250)
            snd = lab.send({"flows": [
                {"name": "a", **v, "dport": 40031, "times": [base + t for t in sig_a]},
                {"name": "b", **v, "dport": 40032, "times": [base + t for t in sig_b]},
            ]})
            flood_at = base + sig_a[-1] + 0.1
            flood = subprocess.run(
                ["ip", "netns", "exec", lab.srv_ns, PY, "-c", FLOOD_SENDER, lab.srv4b, lab.cli4,
                 repr(flood_at), str(LIVE_FLOOD), str(payload_len(1250, 4, False))],
                capture_output=True, text=True, timeout=60)
            assert flood.returncode == 0, flood.stderr
            flooded = json.loads(flood.stdout)
            out, err = snd.communicate(timeout=60)
            assert snd.returncode == 0, err
            sent = json.loads(out)["sent"]
            st = poll_until(lambda: request(sock, "status"),
                            lambda s: s["stalls_ended"] + s["stalls_discarded"] >= 2
                            and s["flows_in_stall"] == 0)
        finally:
            log = stop(agent)
            if snd is not None and snd.poll() is None:
                snd.kill()
                snd.communicate(timeout=60)
        recs = [json.loads(x) for x in cli(lab, env, "stalls", "--json", "--state-dir", str(state))
                .stdout.splitlines()]
    by = {r["flow"].rsplit(":", 1)[1]: r for r in recs}
    assert sorted(by) == ["40031", "40032"], (recs, log[-3000:])
    a, b = by["40031"], by["40032"]
    assert flooded["t1"] < a["detected_at"], "the flood came after A's stall had ended: test too slow"
    taken = _flow_slot(lab.srv4, lab.cli4, 40031) in {
        _flow_slot(lab.srv4b, lab.cli4, 10000 + i) for i in range(LIVE_FLOOD)}
    assert a["truncated"] is False and a["bulk_check"] == ("unknown" if taken else "ok"), (a, log[-3000:])
    assert a["duration"] == pytest.approx(sent["a"][-1] - sent["a"][0] + LIVE_P, abs=0.4)
    assert b["truncated"] is False and b["bulk_check"] == "ok", b
    end_a = next(x for x in log.splitlines() if "stall end" in x and ":40031 " in x)
    assert ("bulk check unknown" in end_a) == taken
    assert st["evicted"] > 0 and st["refused"] > 0, st
    assert st["refused_events"] >= st["refused"] and st["source_rate"] == DEFAULT_SOURCE_RATE, st
    assert st["stalls_discarded"] == 0, st
