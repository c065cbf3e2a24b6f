"""Wall-clock steps (issue 10, part A): the agent infers on CLOCK_MONOTONIC
and reads the wall clock only to show times.

Stepping the machine's clock would disturb every other test on a shared box,
so the agent takes its wall clock as a parameter (``Agent(cfg, wall=...)``,
``serve(..., wall=...)``) and these tests hand it one that jumps: -10 s (NTP
correcting a fast clock) and +60 s, in the middle of stalls, on a live agent
with real XDP, plus the same at the agent's output layer without a kernel.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_agent_flows import raw_key
from test_agent_live import DEADLINE, LEAD, STALL, cli, need_xdp, poll_until, stop, wait_ready

from iqn_ctl.engine.synth import SignalModel, signal_times
from iqn_ctl.engine.tracker import StallEnded, StallStarted
from iqn_ctl.live.agent import Agent, AgentConfig
from iqn_ctl.live.api import request, sock_path
from iqn_ctl.live.history import History
from iqn_lab.testbed import PY
from iqn_lab.testbed import Testbed as Lab

P = 0.2
BACK, FORWARD = -10.0, 60.0


class SteppedClock:
    """A wall clock that is the real one plus steps the test makes."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


# -- the output layer, no kernel ----------------------------------------------------------


def test_records_and_flows_take_the_wall_clock_at_output_and_keep_monotonic_durations(
    tmp_path: Path,
) -> None:
    """A stall that starts, sees the clock stepped back 10 s and ends: its
    record's times are monotonic + the offset at output, its duration the
    monotonic one; then a +60 s step moves what ``flows`` shows, nothing else."""
    clock = SteppedClock()
    agent = Agent(AgentConfig(iface="lo", state_dir=tmp_path, bulk_ratio=0), wall=clock)
    agent.history = History(tmp_path)
    try:
        sig = signal_times([(0.0, 2.0)], SignalModel(), np.random.default_rng(1)) + time.monotonic()
        raw = raw_key("198.18.0.1", 443, "198.18.0.2", 50001)
        out = agent.flows.ingest([(raw, float(t), 1250) for t in sig[:8]])
        assert any(isinstance(e, StallStarted) for e in out)
        agent._on_events(out)
        clock.offset = BACK
        out = agent.flows.ingest([(raw, float(t), 1250) for t in sig[8:]])
        out += agent.flows.advance(float(sig[-1]) + 5.0)
        (end,) = [e for e in out if isinstance(e, StallEnded)]
        agent._on_events(out)
        (rec,) = agent.history.query()
        off = clock() - time.monotonic()
        assert rec.duration == pytest.approx(end.end - end.start, abs=1e-6)  # epoch floats: ~0.2 us
        assert rec.start == pytest.approx(end.start + off, abs=0.05)
        assert rec.start == pytest.approx(time.time() + BACK - (time.monotonic() - end.start), abs=0.05)
        assert (rec.bulk_check, rec.truncated) == ("off", False)
        before = agent._handle({"cmd": "flows", "kernel": False})
        clock.offset = BACK + FORWARD
        after = agent._handle({"cmd": "flows", "kernel": False})
        (f0,), (f1,) = json.loads(before), json.loads(after)
        assert f1["last_seen"] - f0["last_seen"] == pytest.approx(FORWARD, abs=0.05)
        assert f1["candidates"] == f0["candidates"] == sig.size
    finally:
        agent.history.close()


# -- live: a real agent, a stepping wall clock ------------------------------------------

#: runs the agent like ``iqn-ctl attach`` does (serve()), with a wall clock that
#: SIGUSR1 steps back 10 s and SIGUSR2 forward 60 s
AGENT = f"""
import logging, signal, sys, time
from pathlib import Path
from iqn_ctl.live.agent import AgentConfig, serve
step = [0.0]
signal.signal(signal.SIGUSR1, lambda *_: step.__setitem__(0, step[0] + {BACK}))
signal.signal(signal.SIGUSR2, lambda *_: step.__setitem__(0, step[0] + {FORWARD}))
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
cfg = AgentConfig(iface=sys.argv[1], state_dir=Path(sys.argv[2]), run_dir=Path(sys.argv[3]))
serve(cfg, wall=lambda: time.time() + step[0])
"""


def signal_spec(lab: Lab, dport: int, seed: int) -> dict[str, Any]:
    times = signal_times([(0.0, 2 * STALL)], SignalModel(), np.random.default_rng(seed))
    return {"lead": LEAD, "flows": [{"name": "s", "src": lab.srv4, "dst": lab.cli4, "dport": dport,
                                     "frame": 1250, "times": [float(t) for t in times]}]}


def in_stall(sock: Path, port: int) -> list[dict[str, Any]]:
    return [f for f in request(sock, "flows") if f["flow"].endswith(f":{port}") and f["state"] == "stall"]


@pytest.fixture(scope="module")
def stepped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Stall A gets a -10 s step in its middle, stall B (later) a +60 s step."""
    need_xdp()
    base = tmp_path_factory.mktemp("clock")
    run, state = base / "run", base / "s"
    env = dict(os.environ, IQN_RUN_DIR=str(run))
    with Lab() as lab:
        agent = subprocess.Popen(["ip", "netns", "exec", lab.cli_ns, PY, "-c", AGENT, lab.cli_if, str(state),
                                  str(run)], env=env, stderr=subprocess.PIPE, text=True)
        res: dict[str, Any] = {"sent": {}, "seen": {}}
        try:
            sock = sock_path(run, lab.cli_if)
            wait_ready(sock, agent)
            for name, port, seed, sig, shift in (("a", 40041, 1, signal.SIGUSR1, BACK),
                                                 ("b", 40042, 2, signal.SIGUSR2, FORWARD)):
                snd = lab.send(signal_spec(lab, port, seed))
                flows = poll_until(lambda port=port: in_stall(sock, port), bool)  # type: ignore[misc]
                assert flows, f"stall {name} never showed"
                shown = flows[0]["last_seen"]
                agent.send_signal(sig)  # the agent's wall clock steps in the middle of the stall
                # wait until the agent shows times on the stepped clock
                poll_until(lambda: request(sock, "flows"),
                           lambda fs, shown=shown, shift=shift:  # type: ignore[misc]
                           abs(fs[0]["last_seen"] - shown - shift) < 5 if fs else False)
                out, err = snd.communicate(timeout=60)
                assert snd.returncode == 0, err
                res["sent"][name] = json.loads(out)["sent"]["s"]
                st = poll_until(lambda: request(sock, "status"),
                                lambda s: s["flows_in_stall"] == 0, timeout=DEADLINE)
                res["seen"][name] = time.time()  # the stall was over by now (real clock)
                res["status_" + name] = st
        finally:
            res["log"] = stop(agent)
        res["stalls"] = [json.loads(x) for x in cli(lab, env, "stalls", "--json", "--state-dir", str(state))
                         .stdout.splitlines()]
        yield res


def test_live_steps_leave_one_stall_each_with_its_real_duration(stepped: dict[str, Any]) -> None:
    recs = stepped["stalls"]
    assert [r["flow"].rsplit(":", 1)[1] for r in recs] == ["40041", "40042"], (recs, stepped["log"][-3000:])
    for r, name in zip(recs, ("a", "b"), strict=True):
        sent = stepped["sent"][name]
        assert r["truncated"] is False, r
        assert r["candidates"] == len(sent), r
        assert r["duration"] == pytest.approx(sent[-1] - sent[0] + P, abs=0.3), (name, r)
    st = stepped["status_b"]
    assert st["late"] == 0 and st["stalls_ended"] == 2 and st["lost"] == 0, st


def test_live_back_step_does_not_hold_a_stall_open(stepped: dict[str, Any]) -> None:
    """-10 s: the stall ends when its signal stops (w_end later), not when the
    wall clock has caught up 10 s later."""
    sent = stepped["sent"]["a"]
    assert stepped["seen"]["a"] - sent[-1] < -BACK / 2, stepped["status_a"]


def test_live_times_shown_follow_the_stepped_clock(stepped: dict[str, Any]) -> None:
    """Output is wall time on the agent's clock at output: A's record was
    written 10 s behind the real clock, B's 50 s ahead."""
    a, b = stepped["stalls"]
    assert a["start"] == pytest.approx(stepped["sent"]["a"][0] - P + BACK, abs=0.15)
    assert b["start"] == pytest.approx(stepped["sent"]["b"][0] - P + BACK + FORWARD, abs=0.15)
