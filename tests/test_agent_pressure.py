"""The live agent under flow-table pressure and on SIGINT, from the outside.

``--max-flows`` bounds the flows tracked (least recently seen go first) and idle
flows are forgotten after ``IDLE_WINDOWS`` stall-end windows; both must show in
``iqn-ctl status`` (``evicted``, ``expired``, ``flows``) and ``iqn-ctl flows``.
SIGINT (Ctrl-C on a foreground agent, ``kill -INT`` on a daemon) must detach as
cleanly as SIGTERM: program, socket and pid file gone, an open stall recorded.
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
from test_agent_live import DEADLINE, LEAD, cli, need_xdp, poll_until, stop, wait_ready

from iqn_ctl.engine.flowtable import IDLE_WINDOWS
from iqn_ctl.engine.params import SignalParams
from iqn_ctl.engine.synth import SignalModel, signal_times
from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import Testbed as Lab

MAX_FLOWS = 8
#: a short signalling interval makes the idle timeout (IDLE_WINDOWS x 4p) 6 s
FAST_P = 0.01


def status_of(lab: Lab, env: dict[str, str]) -> dict[str, Any]:
    r = cli(lab, env, "status", "--json")
    assert r.returncode == 0, r.stderr
    (st,) = [x for x in json.loads(r.stdout) if x["iface"] == lab.cli_if]
    return dict(st)


def flows_of(lab: Lab, env: dict[str, str]) -> list[dict[str, Any]]:
    r = cli(lab, env, "flows", "--json", "--iface", lab.cli_if)
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


def test_eviction_idle_expiry_and_sigint_on_a_daemon(tmp_path: Path) -> None:
    """12 flows through an agent that tracks 8: the 4 least recent are evicted,
    counted and gone from ``flows``; then all 8 fall idle and expire, not before
    their idle timeout; then ``kill -INT`` detaches the daemon cleanly."""
    need_xdp()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    run, state = tmp_path / "run", tmp_path / "s"
    idle = IDLE_WINDOWS * SignalParams(FAST_P).w_end
    with Lab() as lab:
        a = cli(lab, env, "attach", lab.cli_if, "--daemon", "--state-dir", str(state),
                "--max-flows", str(MAX_FLOWS), "--p", str(FAST_P))
        try:
            assert a.returncode == 0, a.stderr
            pid = int((run / f"{lab.cli_if}.pid").read_text())
            ports = list(range(42000, 42012))
            spec = {"lead": LEAD, "flows": [
                {"name": str(port), "src": lab.srv4, "dst": lab.cli4, "dport": port, "frame": 1250,
                 "times": [0.01 * i]} for i, port in enumerate(ports)]}
            out, err = lab.send(spec).communicate(timeout=60)
            assert out, err
            st = poll_until(lambda: status_of(lab, env), lambda s: s["events"] >= len(ports))
            fl = flows_of(lab, env)
            assert (st["events"], st["lost"], st["max_flows"]) == (len(ports), 0, MAX_FLOWS), st
            assert (st["flows"], st["evicted"], st["expired"]) == (MAX_FLOWS, len(ports) - MAX_FLOWS, 0), st
            # the least recently seen went first: the last 8 ports are left
            assert sorted(int(f["flow"].rsplit(":", 1)[1]) for f in fl) == ports[-MAX_FLOWS:], fl
            last_seen = max(f["last_seen"] for f in fl)

            # idle expiry: nothing more is sent; every flow goes, none before its time
            def idle_check() -> tuple[float, list[dict[str, Any]]]:
                got = flows_of(lab, env)
                return time.time(), got  # the agent answered before this instant

            seen_at, left = poll_until(idle_check, lambda r: not r[1], timeout=idle + DEADLINE)
            assert left == [], left
            for f in fl:
                # a flow is expired once its last arrival is idle s behind the agent's clock
                assert seen_at > f["last_seen"] + idle
            assert seen_at > last_seen + idle
            st = status_of(lab, env)
            assert (st["flows"], st["evicted"], st["expired"]) == (
                0, len(ports) - MAX_FLOWS, MAX_FLOWS), st

            # SIGINT detaches a daemon like SIGTERM does
            os.kill(pid, signal.SIGINT)
            poll_until(lambda: (run / f"{lab.cli_if}.pid").exists(), lambda x: not x)
            gone = poll_until(lambda: _alive(pid), lambda x: not x)
        finally:
            d = cli(lab, env, "detach", lab.cli_if)
        assert not gone, f"agent {pid} still running after SIGINT"
        assert d.returncode == 0, d.stderr
        assert "stopped agent" not in d.stdout and "removed the IQN XDP program" not in d.stdout, d.stdout
        assert lab.xdp_on_client() is None
        assert not sock_path(run, lab.cli_if).exists() and not (run / f"{lab.cli_if}.pid").exists()
    log = (state / f"{lab.cli_if}.log").read_text()
    assert "SIGINT received, detaching" in log and f"{lab.cli_if}: detached" in log, log[-2000:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigint_on_a_foreground_agent_mid_stall(tmp_path: Path) -> None:
    """Ctrl-C on ``iqn-ctl attach`` in a terminal: exit status 0, no traceback,
    nothing left on the interface or in the run dir, and the stall still open is
    closed and recorded as truncated."""
    need_xdp()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    run, state = tmp_path / "run", tmp_path / "s"
    with Lab() as lab:
        agent = subprocess.Popen(lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(state)),
                                 env=env, stderr=subprocess.PIPE, text=True)
        snd: subprocess.Popen[str] | None = None
        try:
            sock = sock_path(run, lab.cli_if)
            wait_ready(sock, agent)
            # a long signal: the agent is interrupted while the flow is still in a stall
            times = [float(t) for t in signal_times([(0.0, 30.0)], SignalModel(), np.random.default_rng(11))]
            snd = lab.send({"lead": LEAD, "flows": [{"name": "x", "src": lab.srv4, "dst": lab.cli4,
                                                     "dport": 40020, "frame": 1250, "times": times}]})
            flows = poll_until(lambda: request(sock, "flows"),
                               lambda fs: any(f["state"] == "stall" for f in fs))
            assert [f["state"] for f in flows] == ["stall"], flows
            agent.send_signal(signal.SIGINT)
            code = agent.wait(DEADLINE)
            err = agent.stderr.read() if agent.stderr else ""
        finally:
            stop(agent)
            if snd is not None:
                snd.kill()
                snd.communicate(timeout=60)
        assert code == 0, err
        assert "Traceback" not in err and "SIGINT received, detaching" in err, err
        assert f"{lab.cli_if}: detached" in err, err
        assert lab.xdp_on_client() is None
        assert not sock.exists() and not (run / f"{lab.cli_if}.pid").exists()
        recs = [json.loads(x) for x in cli(lab, env, "stalls", "--json", "--state-dir", str(state))
                .stdout.splitlines()]
    assert len(recs) == 1 and recs[0]["truncated"] is True, recs
    assert recs[0]["flow"].endswith(":40020")
