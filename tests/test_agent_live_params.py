"""The live agent with a non-default filter: ``iqn-ctl attach --port 8443
--min-size 600 --max-size 700`` on a real veth, real UDP from another namespace.

Every other live test uses the defaults (443, 1180..1288), which is also what
a program compiled without the loader's -D constants would filter for; here
only the operator's filter finds the one intended stall. One traffic phase:

- the signal: bursts of 650-byte frames from port 8443 (a stall's worth);
- band edges on one flow from 8443: three 600- and 700-byte frames (candidates,
  fewer than n, so never a stall even if the sender runs late and bunches them)
  and bursts of 599- and 701-byte frames (not candidates);
- decoys in a stall's pattern: from 443 in the new band and in the default band,
  from 8443 at 599, 701 and in the default band. None may become a candidate.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_agent_live import P, burst_times, by_port, cli, need_xdp, poll_until, stop, wait_ready

from iqn_ctl.engine.params import DEFAULT_N, CandidateFilter
from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import Testbed as Lab

FILT = CandidateFilter(port=8443, min_size=600, max_size=700)
SIGNAL = 40101  # client ports: one flow each
EDGES = 40102
DECOYS = {  # name: (client port, frame length, from port 443 instead of FILT.port)
    "d443_band": (40103, 650, True),
    "d443_default": (40104, 1250, True),
    "d_min-1": (40105, FILT.min_size - 1, False),
    "d_max+1": (40106, FILT.max_size + 1, False),
    "d_default": (40107, 1250, False),
}
DEADLINE = 30.0


def _wait_settled(sock: Path, sent_total: int) -> dict[str, Any]:
    """Poll the agent until the kernel has seen every packet sent, user space has
    every candidate event and no flow is in a stall; returns the last status.
    Event-driven: no planned times."""
    st = poll_until(lambda: request(sock, "status"),
                    lambda st: (st["packets"] >= sent_total and st["events"] == st["candidates"]
                                and st["flows_in_stall"] == 0))
    assert st["packets"] >= sent_total and st["flows_in_stall"] == 0, f"agent did not settle: {st}"
    return st


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need_xdp()
    base = tmp_path_factory.mktemp("params")
    env = dict(os.environ, IQN_RUN_DIR=str(base / "run"))
    state = str(base / "s")
    with Lab() as lab:
        agent = subprocess.Popen(
            # --vol-sample 1: the edge flow's out-of-band packets are counted exactly (sampled
            # 1 in 8, its 8 of them came out as 8 only when exactly one was picked: a fresh-clone
            # CI run counted 0 or 16)
            lab.agent_cmd("attach", lab.cli_if, "--state-dir", state, "--port", str(FILT.port),
                          "--min-size", str(FILT.min_size), "--max-size", str(FILT.max_size),
                          "--vol-sample", "1"),
            env=env, stderr=subprocess.PIPE, text=True)
        try:
            sock = sock_path(base / "run", lab.cli_if)
            wait_ready(sock, agent)
            t0 = time.time() + 0.8  # head start for the sender's start-up; times are compared as sent
            # srv4 sends only from FILT.port, srv4b only from 443
            ours = {"src": lab.srv4, "dst": lab.cli4, "sport": FILT.port}
            flows: list[dict[str, Any]] = [
                {"name": "signal", **ours, "dport": SIGNAL, "frame": 650, "times": burst_times(t0, 11)},
                {"name": "e_min", **ours, "dport": EDGES, "frame": FILT.min_size,
                 "times": [t0 + 0.05, t0 + 1.05]},
                {"name": "e_max", **ours, "dport": EDGES, "frame": FILT.max_size, "times": [t0 + 0.55]},
                {"name": "e_min-1", **ours, "dport": EDGES, "frame": FILT.min_size - 1,
                 "times": [t0 + 0.3 + 0.002 * i for i in range(DEFAULT_N)]},
                {"name": "e_max+1", **ours, "dport": EDGES, "frame": FILT.max_size + 1,
                 "times": [t0 + 0.8 + 0.002 * i for i in range(DEFAULT_N)]},
            ]
            for seed, (name, (dport, frame, from443)) in enumerate(DECOYS.items(), start=20):
                src = {"src": lab.srv4b, "sport": 443} if from443 else {"src": lab.srv4, "sport": FILT.port}
                flows.append({"name": name, **src, "dst": lab.cli4, "dport": dport, "frame": frame,
                              "times": burst_times(t0, seed)})
            out, err = lab.send({"flows": flows}).communicate(timeout=60)
            assert out, err
            sent: dict[str, list[float]] = json.loads(out)["sent"]
            status = _wait_settled(sock, sum(len(v) for v in sent.values()))
            res: dict[str, Any] = {
                "lab": lab, "sent": sent, "status": status,
                "stalls": [json.loads(x) for x in cli(lab, env, "stalls", "--json", "--state-dir",
                                                      state).stdout.splitlines()],
                "flows": json.loads(cli(lab, env, "flows", "--json").stdout),
            }
            yield res
        finally:
            stop(agent)


def test_exactly_the_signal_makes_a_stall(run: dict[str, Any]) -> None:
    lab, sig = run["lab"], run["sent"]["signal"]
    (st,) = run["stalls"]
    assert st["flow"] == f"{lab.srv4}:{FILT.port}>{lab.cli4}:{SIGNAL}"
    assert st["server"] == lab.srv4 and st["client"] == lab.cli4
    # count estimator, from the observed sends: start one p before the first
    # burst, duration (candidates / n + 1/2) p
    assert st["start"] == pytest.approx(sig[0] - P, abs=0.1)
    assert st["duration"] == pytest.approx((len(sig) / DEFAULT_N + 0.5) * P, abs=P / DEFAULT_N + 0.01)
    assert st["end"] == pytest.approx(st["start"] + st["duration"])
    s = run["status"]
    assert (s["stalls_started"], s["stalls_ended"], s["stalls_discarded"]) == (1, 1, 0), s


def test_band_edges_are_candidates_and_one_past_them_are_not(run: dict[str, Any]) -> None:
    sent = run["sent"]
    (edges,) = by_port(run["flows"], EDGES)
    assert edges["candidates"] == len(sent["e_min"]) + len(sent["e_max"]) == 3
    # the kernel counted every packet of the flow from FILT.port, whatever its size
    assert edges["packets"] == sum(len(sent[k]) for k in ("e_min", "e_max", "e_min-1", "e_max+1"))
    assert edges["stalls"] == 0


def test_decoys_are_no_candidates(run: dict[str, Any]) -> None:
    """Nothing from 443 and nothing outside 600..700 reached the engine: the
    kernel's candidate count is exactly the in-band frames from 8443."""
    sent, s = run["sent"], run["status"]
    want = len(sent["signal"]) + len(sent["e_min"]) + len(sent["e_max"])
    assert s["candidates"] == want and s["events"] == want and s["lost"] == 0, s
    assert all(len(sent[name]) >= 2 * DEFAULT_N for name in DECOYS)  # each a stall's worth
    for dport, _, _ in DECOYS.values():
        assert by_port(run["flows"], dport) == []
        assert by_port(run["stalls"], dport) == []
    (sig,) = by_port(run["flows"], SIGNAL)
    assert (sig["candidates"], sig["packets"], sig["stalls"]) == (len(sent["signal"]),) * 2 + (1,)


def test_status_reports_the_operator_filter(run: dict[str, Any]) -> None:
    s = run["status"]
    assert (s["port"], s["min_size"], s["max_size"]) == (FILT.port, FILT.min_size, FILT.max_size)
