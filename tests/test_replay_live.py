"""Replay equals live: a capture taken on the agent's interface while the
live agent runs, replayed with the agent's options, gives exactly the stalls
the agent recorded.

Each of two testbeds runs a real ``iqn-ctl attach`` (real XDP, ``--key
5tuple`` on one, ``--key client`` on the other) and ``tcpdump -Q in`` on the
same veth, while one sender plays the same traffic on both:

* an IPv4 signal on one connection (a stall in either mode);
* a second IPv4 signal to the same client split over two connections, every
  other toggle on each (``--key client`` joins them; per connection each sees
  half the toggles);
* an IPv6 video flow (1,292-byte frames, 400 a second) whose segment tails
  fall in the size band, eight of them in 0.28 s: the engine starts a stall,
  and ``--bulk-ratio`` (default 4) discards it - so replaying with
  ``--bulk-ratio 0`` must record one stall more.

Then ``iqn-ctl replay CAPTURE --key K --json`` must give the agent's records:
same number of stalls, same flows and clients, same candidate counts and bulk
checks, and start/end within :data:`CLOCK_TOL`.

Why a tolerance at all: the agent timestamps a candidate in XDP
(``bpf_ktime_get_ns``, CLOCK_MONOTONIC, turned into epoch seconds with the
wall-minus-monotonic offset read when the stall is written), tcpdump with the
skb's receive time (CLOCK_REALTIME, taken in the same softirq a few
microseconds later). Stall edges are arrival times (or arrivals shifted by a
fixed p), so they differ by at most the largest per-packet difference of the
two clocks: microseconds on an idle box, up to a millisecond or two when the
softirq is preempted on a loaded one. 5 ms stays far below every window of the
engine (p = 200 ms), so it cannot hide a wrong stall.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import need
from test_agent_live import LEAD, burst_times, cli, need_xdp, poll_until, settled, stop, wait_ready

from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import IQN_CTL
from iqn_lab.testbed import Testbed as Lab

#: largest difference allowed between a live stall edge and the replayed one (see the docstring)
CLOCK_TOL = 0.005


def _spec(lab: Lab) -> dict[str, Any]:
    split = burst_times(3.5, 8)
    v6 = dict(src=lab.srv6, dst=lab.cli6, dport=40010)
    return {"lead": LEAD, "flows": [
        {"name": "sig", "src": lab.srv4, "dst": lab.cli4, "dport": 40011, "frame": 1250,
         "times": burst_times(0.0, 7)},
        {"name": "split0", "src": lab.srv4, "dst": lab.cli4, "dport": 40012, "frame": 1250,
         "times": split[0::2]},
        {"name": "split1", "src": lab.srv4, "dst": lab.cli4, "dport": 40013, "frame": 1250,
         "times": split[1::2]},
        {"name": "video", **v6, "frame": 1292, "bulk_pps": 400, "from": 0.0, "to": 1.6},
        {"name": "tails", **v6, "frame": 1250, "times": [0.3 + 0.04 * i for i in range(8)]},
    ]}


def _tcpdump(lab: Lab, path: Path) -> subprocess.Popen[str]:
    """tcpdump on the agent's interface, ingress only (what XDP sees), ns timestamps;
    returns once it is listening."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.cli_ns, "tcpdump", "-i", lab.cli_if, "-Q", "in", "-U", "-n",
         "--time-stamp-precision", "nano", "-w", str(path), "udp"],
        stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # "tcpdump: listening on ..."
    assert "listening" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
    return proc


def _stop_tcpdump(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    return proc.stderr.read() if proc.stderr else ""


def _run_live(tmp: Path, key: str) -> dict[str, Any]:
    """One testbed: agent with --key KEY plus tcpdump, the traffic, the agent's records."""
    env = dict(os.environ, IQN_RUN_DIR=str(tmp / "run"))
    state, cap = tmp / "state", tmp / "cap.pcap"
    with Lab() as lab:
        agent = subprocess.Popen(lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(state), "--key", key),
                                 env=env, stderr=subprocess.PIPE, text=True)
        dump = None
        try:
            sock = sock_path(tmp / "run", lab.cli_if)
            wait_ready(sock, agent)
            dump = _tcpdump(lab, cap)
            out, err = lab.send(_spec(lab)).communicate(timeout=90)
            assert out, err
            sent = json.loads(out)["sent"]
            cands = sum(len(v) for k, v in sent.items() if k != "video")
            st = poll_until(lambda: request(sock, "status"), settled(cands))
            assert settled(cands)(st), st
            # nothing lost, nothing passed on twice: the kernel counted each candidate sent
            # once, and the engine was fed each of them once (a fresh-clone run once had a
            # stall of 21 candidates on a flow sent 20; this says which side counted wrong)
            assert (st["candidates"], st["events"], st["lost"]) == (cands, cands, 0), (cands, st)
            # every packet sent is in the capture before it is closed
            poll_until(lambda: cap.stat().st_size, lambda size: size > 0)
            time.sleep(0.5)
            dump_err = _stop_tcpdump(dump)
            dump = None
            stalls = [json.loads(x) for x in cli(lab, env, "stalls", "--json", "--state-dir",
                                                 str(state)).stdout.splitlines()]
        finally:
            if dump is not None:
                _stop_tcpdump(dump)
            log = stop(agent)
    return {"lab": lab, "status": st, "stalls": stalls, "capture": cap, "log": log, "tcpdump": dump_err,
            "sent": sent}


def _replay(cap: Path, *args: str) -> tuple[list[dict[str, Any]], str]:
    r = subprocess.run([IQN_CTL, "replay", str(cap), "--json", *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines()], r.stderr


def _same(live: list[dict[str, Any]], replay: list[dict[str, Any]]) -> float:
    """Assert the records match; returns the largest edge difference (s)."""
    live = sorted(live, key=lambda s: (s["start"], s["flow"]))
    assert [(s["flow"], s["client"], s["candidates"], s["bulk_check"]) for s in replay] == [
        (s["flow"], s["client"], s["candidates"], s["bulk_check"]) for s in live], (live, replay)
    worst = 0.0
    for a, b in zip(live, replay, strict=True):
        for edge in ("start", "end"):
            worst = max(worst, abs(a[edge] - b[edge]))
            assert b[edge] == pytest.approx(a[edge], abs=CLOCK_TOL), (edge, a, b)
    return worst


@pytest.mark.parametrize("key", ["5tuple", "client"])
def test_replay_of_a_live_capture_gives_the_agents_stalls(tmp_path: Path, key: str) -> None:
    need_xdp()
    need(subprocess.run(["which", "tcpdump"], capture_output=True).returncode == 0, "needs tcpdump")
    got = _run_live(tmp_path, key)
    lab, live, st = got["lab"], got["stalls"], got["status"]
    # the traffic did what it is for: one stall discarded as bulk, the split signal per --key
    assert st["stalls_discarded"] == 1, st
    assert "stall discarded" in got["log"]
    flows = {s["flow"] for s in live}
    if key == "client":
        assert flows == {lab.cli4}, live
        assert len(live) == 2  # the unsplit signal and the split one: one client, two stalls
    else:
        assert f"{lab.srv4}:443>{lab.cli4}:40011" in flows, live
        assert all(lab.cli6 not in s["client"] for s in live), live
    replay, err = _replay(got["capture"], "--key", key)
    assert "0 packets dropped by kernel" in got["tcpdump"], got["tcpdump"]  # the capture is whole
    worst = _same(live, replay)
    assert "1 stall(s) discarded as bulk traffic" in err, err
    print(f"--key {key}: {len(live)} stall(s), largest edge difference {1e6 * worst:.0f} us")
    # --bulk-ratio matters: without it the video flow's stall is recorded too
    everything, _ = _replay(got["capture"], "--key", key, "--bulk-ratio", "0")
    extra = [s for s in everything if lab.cli6 in s["client"]]
    assert len(everything) == len(live) + 1 and len(extra) == 1, everything
    assert {s["bulk_check"] for s in everything} == {"off"}
    assert np.isfinite(extra[0]["duration"])
