"""The bulk-discard rule (``iqn_ctl.engine.discard``, the agent's ``--bulk-ratio``).

The pure rule is pinned exactly (its threshold, ratio 0, unknown counters,
which connections count); then one live traffic phase checks that the agent
applies it to the kernel's real per-flow counters: three labs, three agents
(default, ``--bulk-ratio 0``, ``--key client``) and, at once, a video flow
whose segment tails look like a signal, a signal with modest other traffic
beside it, a signal with heavy other traffic, and a client-keyed signal next
to a bulk connection that once sent a forged candidate.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_agent_live import STALL, burst_times, by_port, cli, need_xdp, poll_until, stop, wait_ready

from iqn_ctl.engine.discard import Counters, bulk_check, bulk_reason, delta
from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import Testbed as Lab

MAX = 1288  # the default candidate band's top: one full-size packet
BASE = Counters(100, 7, 100 * 1000)


def after(base: Counters, packets: int, cands: int, nbytes: int) -> Counters:
    return Counters(base.packets + packets, base.candidates + cands, base.bytes + nbytes, base.epoch)


def one(d_cand: int, other_packets: int, other_bytes: int, ratio: float = 2.0) -> str:
    """The rule on one connection that carried ``d_cand`` full-size candidates
    and ``other_bytes`` in ``other_packets`` beside them."""
    end = after(BASE, d_cand + other_packets, d_cand, d_cand * MAX + other_bytes)
    return bulk_reason({"f": BASE}, {"f": end}, MAX, ratio)


# -- the rule, exactly --------------------------------------------------------------


def test_threshold_is_inclusive_one_byte_more_discards() -> None:
    limit = 2 * 3 * MAX  # ratio 2, 3 candidates: 7,728 other bytes are still a signal
    assert one(3, 6, limit) == ""
    assert one(3, 6, limit + 1) == (
        f"bulk flow: 6 other packets ({limit + 1} bytes) beside 3 candidates during it (--bulk-ratio 2)"
    )


def test_sampled_volume_must_exceed_the_limit_beyond_its_spread() -> None:
    """With the data plane's volume sampling (1 in k counted as k), one sampled
    full-size datagram beside 4 candidates reads as k of them: over the limit
    for the exact rule, but within the estimate's spread, so the stall is
    kept; a flow far over the limit on many samples is discarded as before,
    and sample 1 is the exact rule."""
    k = 8
    end = after(BASE, 4 + k, 4, 4 * MAX + k * 1350)  # 4 candidates + one sample of a 1,350 B datagram
    assert bulk_reason({"f": BASE}, {"f": end}, MAX, 2.0) != ""  # exact rule: bulk
    assert bulk_reason({"f": BASE}, {"f": end}, MAX, 2.0, sample=k) == ""
    assert bulk_reason({"f": BASE}, {"f": end}, MAX, 2.0, sample=1) != ""
    video = after(BASE, 4 + 50 * k, 4, 4 * MAX + 50 * k * 1350)  # 50 samples, 50x the limit
    assert bulk_reason({"f": BASE}, {"f": video}, MAX, 2.0, sample=k) != ""
    # the margin: 2 sigma of sqrt((k - 1) / other packets) of the estimate
    edge = after(BASE, 4 + 10 * k, 4, 4 * MAX + 10 * k * 1350)  # 80 packets: 59 % spread
    assert bulk_reason({"f": BASE}, {"f": edge}, MAX, 2.0, sample=k) != ""  # 108 kB x 0.41 > 10.3 kB
    assert bulk_reason({"f": BASE}, {"f": edge}, MAX, 10.0, sample=k) == ""  # 44 kB <= 51.5 kB


def test_fractional_ratio_threshold() -> None:
    limit = 3 * MAX // 2  # ratio 0.5, 3 candidates: 1,932 bytes
    assert one(3, 2, limit, ratio=0.5) == ""
    assert one(3, 2, limit + 1, ratio=0.5).startswith("bulk flow: 2 other packets (1933 bytes)")


def test_ratio_zero_disables_the_rule() -> None:
    assert one(4, 5000, 5000 * 1292, ratio=2.0) != ""
    assert one(4, 5000, 5000 * 1292, ratio=0.0) == ""


def test_no_candidate_during_the_stall_counts_as_one() -> None:
    """The candidates that started a stall arrive before the start snapshot: a
    flow showing none since is judged as carrying one (the agent's old rule)."""
    limit = 2 * MAX
    end = after(BASE, 3, 0, limit + MAX)  # other bytes = total - one candidate's allowance
    assert bulk_reason({"f": BASE}, {"f": end}, MAX, 2.0) == ""
    end = after(BASE, 3, 0, limit + MAX + 1)
    assert bulk_reason({"f": BASE}, {"f": end}, MAX, 2.0) == (
        f"bulk flow: 2 other packets ({limit + 1} bytes) beside 1 candidates during it (--bulk-ratio 2)"
    )
    assert bulk_reason({"f": BASE}, {"f": BASE}, MAX, 2.0) == ""  # nothing happened at all


@settings(max_examples=300, deadline=None)
@given(
    base=st.builds(Counters, st.integers(0, 10**9), st.integers(0, 10**6), st.integers(0, 10**12)),
    d_cand=st.integers(0, 500),
    other_packets=st.integers(0, 10**5),
    other_bytes=st.integers(-(10**6), 10**8),
    quarters=st.integers(1, 40),
)
def test_one_connection_matches_exact_arithmetic(
    base: Counters, d_cand: int, other_packets: int, other_bytes: int, quarters: int
) -> None:
    """Over a large input space the decision is exactly "other bytes >
    ratio x candidates x max_size", in integer arithmetic (ratios in quarters,
    so the float product in the rule is exact too)."""
    c = max(d_cand, 1)
    nbytes = max(c * MAX + other_bytes, 0)
    end = after(base, d_cand + other_packets, d_cand, nbytes)
    got = bulk_reason({"k": base}, {"k": end}, MAX, quarters / 4)
    other = nbytes - c * MAX
    bulk = (d_cand > 0 or other_packets > 0) and Fraction(other) > Fraction(quarters, 4) * c * MAX
    assert (got != "") == bulk, (got, other)
    if bulk:
        assert f"({other} bytes) beside {c} candidates" in got


# -- counters that cannot be compared: unknown, the stall is kept -------------------

HUGE = after(BASE, 10**5, 4, 10**5 * 1292)  # megabytes beside 4 candidates: bulk if known


def test_counters_restarted_in_between_are_unknown_even_when_higher() -> None:
    """The flow lost its kernel slot to another flow's candidate and won it back
    (the slot's claim count, ``epoch``, moved): its counters restarted, so
    even higher values than at the start say nothing; the stall is kept."""
    start = Counters(10, 4, 10 * 1250, epoch=1)
    end = Counters(10**5, 8, 10**5 * 1292, epoch=2)
    assert delta(start, end) is None
    assert bulk_check({"f": start}, {"f": end}, MAX, 2.0) == ("unknown", "", None)
    assert bulk_check({"f": start}, {"f": end._replace(epoch=1)}, MAX, 2.0)[1] != ""


def test_huge_is_bulk_when_known() -> None:
    assert bulk_reason({"f": BASE}, {"f": HUGE}, MAX, 2.0).startswith("bulk flow:")


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(range(3)), drop=st.integers(1, 10**6))
def test_a_counter_that_went_down_is_unknown(field: int, drop: int) -> None:
    """The LRU evicted the flow and it started again from zero: keep the stall."""
    start = list(HUGE)
    start[field] = HUGE[field] + drop
    assert delta(Counters(*start), HUGE) is None
    assert bulk_reason({"f": Counters(*start)}, {"f": HUGE}, MAX, 2.0) == ""


def test_a_missing_entry_is_unknown() -> None:
    assert bulk_reason({"f": BASE}, {"f": None}, MAX, 2.0) == ""  # evicted during the stall
    assert bulk_reason({"f": BASE}, {}, MAX, 2.0) == ""
    assert bulk_reason({"f": None}, {"f": HUGE}, MAX, 2.0) == ""  # evicted at its start
    assert bulk_reason({}, {"f": HUGE}, MAX, 2.0) == ""


def test_an_unknown_connection_that_never_carried_a_candidate_is_ignored() -> None:
    """Seen only at the end with no candidate ever: it carried no part of the signal."""
    bulk_only = Counters(10**5, 0, 10**5 * 1292)
    assert bulk_reason({"v": BASE}, {"v": HUGE, "b": bulk_only}, MAX, 2.0).startswith("bulk flow:")
    assert bulk_reason({"v": BASE, "b": None}, {"v": HUGE, "b": bulk_only}, MAX, 2.0).startswith(
        "bulk flow:")


# -- several connections (--key client) ---------------------------------------------

SIGNAL_END = after(BASE, 44, 40, 40 * 1250 + 4 * 100)  # 40 candidates and 4 ACK-sized packets


def test_bulk_of_a_connection_without_candidates_does_not_count() -> None:
    """A forged candidate filed another server's connection under the client;
    its bulk traffic during the stall must not discard the client's real one."""
    forged0 = Counters(1, 1, 1250)
    forged1 = after(forged0, 800, 0, 800 * 1292)
    assert bulk_reason({"s": BASE, "x": forged0}, {"s": SIGNAL_END, "x": forged1}, MAX, 2.0) == ""


def test_one_signal_like_connection_keeps_the_stall() -> None:
    """The client's own video connection carried a few tails during the stall:
    it is bulk, but the signalling connection beside it is not."""
    video1 = after(BASE, 800, 3, 800 * 1292)
    assert bulk_reason({"s": BASE, "v": BASE}, {"s": SIGNAL_END, "v": video1}, MAX, 2.0) == ""
    # when every connection that carried candidates is bulk, the stall goes
    video2 = after(BASE, 600, 2, 600 * 1292)
    got = bulk_reason({"v": BASE, "w": BASE}, {"v": video1, "w": video2}, MAX, 2.0)
    assert got.startswith("bulk flows (2 connections): ") and " beside 5 candidates " in got


def test_verdict_gives_the_figure_the_rule_judged_by() -> None:
    """``other``: the most signal-like connection's other bytes per candidate in
    full-size packets, the number the agent logs with each kept stall so an operator
    sees how close a real signal came to the limit; None when nothing was compared."""
    limit = 2 * 3 * MAX
    at = after(BASE, 9, 3, 3 * MAX + limit)
    assert bulk_check({"f": BASE}, {"f": at}, MAX, 2.0) == ("ok", "", 2.0)
    over = bulk_check({"f": BASE}, {"f": after(BASE, 9, 3, 3 * MAX + limit + 3 * MAX)}, MAX, 2.0)
    assert over.reason and over.other == 3.0
    video1 = after(BASE, 800, 3, 800 * 1292)
    both = bulk_check({"s": BASE, "v": BASE}, {"s": at, "v": video1}, MAX, 2.0)
    assert both == ("ok", "", 2.0)  # the signal's figure, not the video's beside it
    assert bulk_check({"f": BASE}, {"f": None}, MAX, 2.0).other is None
    assert bulk_check({"f": BASE}, {"f": at}, MAX, 0.0) == ("off", "", None)


def test_idle_connections_do_not_mask_a_bulk_one() -> None:
    """No candidate rose anywhere: judge the connections that carried packets."""
    video = after(BASE, 800, 0, 800 * 1292)
    got = bulk_reason({"v": BASE, "idle": BASE}, {"v": video, "idle": BASE}, MAX, 2.0)
    assert got.startswith("bulk flow: 799 other packets")


counters = st.builds(Counters, st.integers(0, 10**6), st.integers(0, 10**4), st.integers(0, 10**9))
growth = st.tuples(st.integers(0, 10**4), st.integers(0, 50), st.integers(0, 10**7))


@settings(max_examples=300, deadline=None)
@given(
    flows=st.dictionaries(st.integers(0, 20), st.tuples(counters, growth), min_size=1, max_size=5),
    extra=st.tuples(counters, st.integers(0, 10**5), st.integers(0, 10**9)),
)
def test_adding_a_connection_without_candidates_never_changes_the_decision(
    flows: dict[int, tuple[Counters, tuple[int, int, int]]], extra: tuple[Counters, int, int]
) -> None:
    """Any bulk a connection sends while carrying no candidate is ignored, as
    long as some other connection carried candidates during the stall."""
    start = {k: s for k, (s, _) in flows.items()}
    end = {k: after(s, g[0] + g[1], g[1], g[2] + g[1] * MAX) for k, (s, g) in flows.items()}
    if not any(g[1] for _, g in flows.values()):
        k0 = next(iter(flows))
        end[k0] = after(end[k0], 1, 1, MAX)
    before = bulk_reason(start, end, MAX, 2.0)
    s, packets, nbytes = extra
    start[99], end[99] = s, after(s, packets, 0, nbytes)
    assert bulk_reason(start, end, MAX, 2.0) == before


# -- live: the agent applies the rule to the kernel's counters ----------------------

LEAD = 1.5  # s from the sender's start to the traffic (the sender times from its own start)
VIDEO_PPS = 400  # 1,292-byte frames (above the band): about 4 Mbit/s of video
LOW_PPS = 20  # 40 frames beside a signal: under 2 x 1,288 bytes per candidate
HIGH_PPS = 150  # 300 frames: well over it


def video_flows(lab: Lab, dport: int) -> list[dict[str, Any]]:
    """A video flow whose 8 segment tails fall in the band within 0.28 s."""
    v = dict(src=lab.srv4, dst=lab.cli4, dport=dport)
    return [
        {"name": "video", **v, "frame": 1292, "bulk_pps": VIDEO_PPS, "from": 0.0, "to": 1.6},
        {"name": "tails", **v, "frame": 1250, "times": [0.3 + 0.04 * i for i in range(8)]},
    ]


def signal_with_other(lab: Lab, name: str, dport: int, seed: int, pps: int) -> list[dict[str, Any]]:
    v = dict(src=lab.srv4, dst=lab.cli4, dport=dport)
    return [
        {"name": name, **v, "frame": 1250, "times": burst_times(0.0, seed)},
        {"name": f"{name}_other", **v, "frame": 1292, "bulk_pps": pps, "from": 0.0, "to": STALL},
    ]


def settled(sock: Path, started: int, deadline: float) -> dict[str, Any]:
    """The agent's status once ``started`` stalls began and all of them ended
    or were discarded (polled: stall ends are noticed w_end after the signal)."""
    st = poll_until(lambda: request(sock, "status"),
                    lambda st: (st["stalls_started"] >= started
                                and st["stalls_ended"] + st["stalls_discarded"] == st["stalls_started"]),
                    timeout=max(0.0, deadline - time.time()))
    assert st["stalls_started"] >= started, f"stalls did not settle: {st}"
    assert st["stalls_ended"] + st["stalls_discarded"] == st["stalls_started"], f"stalls did not settle: {st}"
    return st


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need_xdp()
    base = tmp_path_factory.mktemp("bulk")
    env = dict(os.environ, IQN_RUN_DIR=str(base / "run"))
    with Lab() as a, Lab() as b, Lab() as c:
        labs = {"default": (a, []), "ratio0": (b, ["--bulk-ratio", "0", "--vol-sample", "1"]),
                "client": (c, ["--key", "client"])}
        procs: dict[str, subprocess.Popen[str]] = {}
        try:
            for name, (lab, extra) in labs.items():
                procs[name] = subprocess.Popen(
                    lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(base / name), *extra),
                    env=env, stderr=subprocess.PIPE, text=True)
            for name, (lab, _) in labs.items():
                wait_ready(sock_path(base / "run", lab.cli_if), procs[name])
            c_sig = dict(src=c.srv4, dst=c.cli4)
            specs = {
                "default": video_flows(a, 40010)
                + signal_with_other(a, "low", 40011, 7, LOW_PPS)
                + signal_with_other(a, "high", 40012, 8, HIGH_PPS),
                "ratio0": video_flows(b, 40010),
                "client": [
                    # one forged candidate files srv4b's connection under the client ...
                    {"name": "forged", "src": c.srv4b, "dst": c.cli4, "dport": 40021, "frame": 1250,
                     "times": [0.0]},
                    # ... which then sends bulk all through the client's real stall
                    {"name": "forged_bulk", "src": c.srv4b, "dst": c.cli4, "dport": 40021, "frame": 1292,
                     "bulk_pps": VIDEO_PPS, "from": 1.0, "to": 1.0 + STALL},
                    {"name": "signal", **c_sig, "dport": 40020, "frame": 1250, "times": burst_times(1.0, 9)},
                    # and the client's own video connection carries a tail before (so it, too, is
                    # known when the stall starts) and 3 during it: too few for a stall of their own
                    {"name": "video", **c_sig, "dport": 40022, "frame": 1292, "bulk_pps": VIDEO_PPS,
                     "from": 1.0, "to": 1.0 + STALL},
                    {"name": "tails", **c_sig, "dport": 40022, "frame": 1250,
                     "times": [0.2, 1.6, 2.0, 2.4]},
                ],
            }
            senders = {n: labs[n][0].send({"lead": LEAD, "flows": f}) for n, f in specs.items()}
            sent: dict[str, dict[str, list[float]]] = {}
            for n, snd in senders.items():
                out, err = snd.communicate(timeout=60)
                assert snd.returncode == 0, err
                sent[n] = json.loads(out)["sent"]
            deadline = time.time() + 30
            want = {"default": 3, "ratio0": 1, "client": 1}
            res: dict[str, Any] = {"sent": sent, "labs": {n: lab for n, (lab, _) in labs.items()}}
            for n, (lab, _) in labs.items():
                sock = sock_path(base / "run", lab.cli_if)
                res[n] = {
                    "status": settled(sock, want[n], deadline),
                    "flows": request(sock, "flows"),
                    "stalls": [json.loads(x) for x in cli(lab, env, "stalls", "--json", "--state-dir",
                                                          str(base / n)).stdout.splitlines()],
                }
        finally:
            logs = {n: stop(p) for n, p in procs.items()}
        for n in labs:
            res[n]["log"] = logs[n]
        yield res


def counts(status: dict[str, Any]) -> tuple[int, int, int]:
    return status["stalls_started"], status["stalls_ended"], status["stalls_discarded"]


def test_live_default_discards_the_video_flow(live: dict[str, Any]) -> None:
    d = live["default"]
    assert by_port(d["stalls"], 40010) == []
    (line,) = [x for x in d["log"].splitlines() if "stall discarded" in x and ":40010 " in x]
    assert ": bulk flow: " in line and line.endswith("(--bulk-ratio 4)")


def test_live_ratio_zero_keeps_the_stall_the_default_discards(live: dict[str, Any]) -> None:
    """The same video traffic as on the default agent, which discards it
    (test above): --bulk-ratio 0 records it."""
    r = live["ratio0"]
    assert counts(r["status"]) == (1, 1, 0), r["status"]
    (st_,) = by_port(r["stalls"], 40010)
    tails = live["sent"]["ratio0"]["tails"]
    assert tails[0] - 0.3 <= st_["start"] <= tails[-1] and st_["candidates"] == len(tails)
    assert "stall discarded" not in r["log"]
    # --vol-sample 1: the kernel counted every datagram of the flow since its first candidate
    # claimed its slot (a sampled count would be about 1 in 8, each as 8)
    assert r["status"]["vol_sample"] == 1
    (f,) = [x for x in r["flows"] if x["flow"].endswith(":40010")]
    video = sum(t > tails[0] for t in live["sent"]["ratio0"]["video"])
    assert f["candidates"] == len(tails) and abs(f["packets"] - len(tails) - video) <= 1, (f, video)
    assert f["bytes"] == 1250 * len(tails) + 1292 * (f["packets"] - len(tails))


def other_bytes_between(sent: list[float], t0: float, t1: float) -> int:
    return 1292 * sum(t0 <= t <= t1 for t in sent)


def test_live_signal_with_modest_other_traffic_is_kept(live: dict[str, Any]) -> None:
    sent = live["sent"]["default"]
    cands = sent["low"]
    # every other byte sent at all is under the threshold for the candidates after the first burst
    assert 1292 * len(sent["low_other"]) <= 2 * (len(cands) - 4) * MAX
    (st_,) = by_port(live["default"]["stalls"], 40011)
    assert st_["start"] == pytest.approx(cands[0] - 0.2, abs=0.1)
    assert st_["duration"] == pytest.approx(cands[-1] - cands[0] + 0.2, abs=0.3)
    assert ":40011 " not in "".join(x for x in live["default"]["log"].splitlines(True)
                                    if "stall discarded" in x)
    # the kept stall's end line says how close it came to the limit (sampled volume: the
    # estimate may pass 2 within its spread and still keep the stall)
    (end,) = [x for x in live["default"]["log"].splitlines() if "stall end" in x and ":40011 " in x]
    m = re.search(r" other_per_candidate=(\d+\.\d\d)$", end)
    assert m and 0.0 <= float(m[1]) <= 4.0, end
    assert "other_per_candidate" not in live["ratio0"]["log"]  # --bulk-ratio 0: nothing compared


def test_live_signal_with_heavy_other_traffic_is_discarded(live: dict[str, Any]) -> None:
    d = live["default"]
    sent = live["sent"]["default"]
    cands = sent["high"]
    # the other bytes sent while its candidates came exceed the threshold for all of them
    assert other_bytes_between(sent["high_other"], cands[4], cands[-1]) > 2 * len(cands) * MAX
    assert by_port(d["stalls"], 40012) == []
    (line,) = [x for x in d["log"].splitlines() if "stall discarded" in x and ":40012 " in x]
    # the reason reports what the kernel counted: what was sent during the stall, as the
    # data plane estimates it (1 in vol_sample counted, each as vol_sample): within 5 sigma
    # (2 sigma failed once in a fresh CI run, 515,432 B against a bound of 506,019 B: a
    # two-sided 2-sigma bound is broken by chance about once in 40 runs; sampling switched
    # off counts 8x and still breaks this one, a weight of 1 breaks the lower bound)
    other = int(line.split("other packets (")[1].split(" bytes")[0])
    k, n = d["status"]["vol_sample"], len(sent["high_other"])
    assert k == 8
    assert 2 * len(cands) * MAX < other <= 1292 * n * (1 + 5 * math.sqrt((k - 1) / n))
    assert counts(d["status"]) == (3, 1, 2), d["status"]


def test_live_client_key_bulk_on_another_connection_keeps_the_stall(live: dict[str, Any]) -> None:
    """--key client: the stall is the client's; a forged candidate filed another
    server's connection under it, and that connection and the client's own
    video (3 tails during the stall) carry megabytes during it. Only the
    connections that carried candidates are judged, each on its own: the
    signal is kept. All three connections were known when the stall started,
    so none is "unknown" (which would keep the stall for another reason)."""
    c, sent, lab = live["client"], live["sent"]["client"], live["labs"]["client"]
    sig = sent["signal"]
    # what summing every connection of the client would have had to discard
    bulk = other_bytes_between(sent["forged_bulk"] + sent["video"], sig[4], sig[-1])
    assert bulk > 2 * (len(sig) + 3) * MAX
    assert max(sent["forged"] + sent["tails"][:1]) < sig[0] - 0.5
    # the forged and the tail candidates did reach the client's flow
    (f,) = c["flows"]
    assert f["flow"] == lab.cli4 and f["candidates"] == len(sig) + 1 + 4
    assert counts(c["status"]) == (1, 1, 0), (c["status"], c["log"])
    (st_,) = c["stalls"]
    assert st_["client"] == lab.cli4 and st_["start"] == pytest.approx(sig[0] - 0.2, abs=0.1)
    assert st_["duration"] == pytest.approx(sig[-1] - sig[0] + 0.2, abs=0.3)
