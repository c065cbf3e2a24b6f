"""attach / detach / flows / stalls / status from the outside: every expected
failure is one ``iqn-ctl: error:`` line and exit status 2; the history is
readable with no agent running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need, need_root
from test_agent_live import need_xdp

from iqn_ctl.live.history import History, StallRecord
from iqn_lab.testbed import IQN_CTL
from iqn_lab.testbed import Testbed as Lab


def run(*args: str, env: dict[str, str] | None = None, user: str | None = None,
        ns: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [IQN_CTL, *args]
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def one_error(r: subprocess.CompletedProcess[str], text: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iqn-ctl: error: "), r.stderr
    assert text in lines[0], lines[0]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"), IQN_STATE_DIR=str(tmp_path / "state"))


def test_impossible_sizes_and_flags(env: dict[str, str]) -> None:
    one_error(run("attach", "lo", "--min-size", "1300", "--max-size", "1200", env=env),
              "--min-size 1300 is larger than --max-size 1200")
    one_error(run("attach", "lo", "--max-size", "70000", env=env), "sizes must lie in 0..65535")
    one_error(run("attach", "lo", "--key", "server", env=env), "--key must be one of 5tuple, client")
    one_error(run("attach", "lo", "--hook", "bpf", env=env), "--hook must be one of auto, xdp, tc")
    one_error(run("attach", "lo", "--hook", "xdp", "--direction", "egress", env=env),
              "--direction egress needs the TC hook")
    one_error(run("attach", "lo", "--estimator", "magic", env=env), "unknown --estimator 'magic'")
    one_error(run("attach", "lo", "--xdp-mode", "hw", env=env), "--xdp-mode must be one of")
    one_error(run("attach", "lo", "--pairing", "maybe", env=env), "--pairing must be on or off, got 'maybe'")
    one_error(run("attach", "lo", "--pair-window", "0", env=env), "--pair-window must be in (0, 60]")
    one_error(run("attach", "lo", "--cap", "-1", env=env), "--cap must be a number of bursts per second >= 0")


def test_not_root(env: dict[str, str]) -> None:
    need_root()
    need(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    caps = "needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON: run it as root or grant"
    one_error(run("attach", "lo", env=env, user="nobody"), f"attach {caps}")
    one_error(run("detach", "lo", env=env, user="nobody"), f"detach {caps}")
    Path(env["IQN_RUN_DIR"]).mkdir(mode=0o700)
    one_error(run("flows", env=env, user="nobody"), "the IQN API is for root and the agent's group")
    one_error(run("status", env=env, user="nobody"), "the IQN API is for root and the agent's group")
    with History(Path(env["IQN_STATE_DIR"])) as h:
        h.add([StallRecord("eth0", "f", "c", "s", 1.0, 2.0, 8, 2.5)])
    one_error(run("stalls", env=env, user="nobody"),
              "the stall history is for root and the agent's group (use sudo")


def test_no_such_interface(env: dict[str, str]) -> None:
    need_root()
    one_error(run("attach", "iqnope0", env=env), "no such interface: iqnope0")
    one_error(run("detach", "iqnope0", env=env), "no such interface: iqnope0")
    one_error(run("flows", "--iface", "iqnope0", env=env), "no agent attached to iqnope0")


def test_nothing_running(env: dict[str, str]) -> None:
    r = run("status", env=env)
    assert (r.returncode, r.stdout.strip()) == (0, "no IQN agents running")
    assert json.loads(run("status", "--json", env=env).stdout) == []
    assert json.loads(run("flows", "--json", env=env).stdout) == []
    r = run("stalls", env=env)
    assert r.returncode == 0 and "no stalls recorded" in r.stdout


def test_stalls_from_history_without_agent(env: dict[str, str]) -> None:
    recs = [StallRecord("eth0", "198.18.0.1:443>198.18.0.2:5000", "198.18.0.2", "198.18.0.1",
                        1.7e9 + i * 60, 1.7e9 + i * 60 + 1.25 * (i + 1), 4 * i + 8, 1.7e9 + i * 60 + 2)
            for i in range(3)]
    recs.append(StallRecord("eth1", "198.18.1.1:443>198.18.1.2:5000", "198.18.1.2", "198.18.1.1",
                            1.7e9 + 30, 1.7e9 + 31, 8, 1.7e9 + 32))
    with History(Path(env["IQN_STATE_DIR"])) as h:
        h.add(recs)
    lines = [json.loads(x) for x in run("stalls", "--json", env=env).stdout.splitlines()]
    assert [(x["iface"], x["start"]) for x in lines] == [
        ("eth0", 1.7e9), ("eth1", 1.7e9 + 30), ("eth0", 1.7e9 + 60), ("eth0", 1.7e9 + 120)]
    for x in lines:
        assert {"flow", "client", "start", "end", "duration"} <= set(x)
        assert x["duration"] == pytest.approx(x["end"] - x["start"])
    got = run("stalls", "--json", "--iface", "eth0", "--since", str(1.7e9 + 61), env=env).stdout.splitlines()
    assert [json.loads(x)["end"] for x in got] == [1.7e9 + 60 + 2.5, 1.7e9 + 120 + 3.75]
    table = run("stalls", env=env).stdout
    assert "198.18.1.1:443>198.18.1.2:5000" in table and "4 stall(s)" in table and "1.250s" in table


@pytest.fixture
def xdp_lab() -> Iterator[Lab]:
    """A lab for a test that needs XDP: the prerequisite is checked before any
    namespace is built, so a box without XDP skips (or CI fails) with the reason."""
    need_xdp()
    with Lab() as lab:
        yield lab


def test_foreign_xdp_program_is_refused(xdp_lab: Lab, env: dict[str, str]) -> None:
    """Someone else's XDP program stays put unless --force (with --hook xdp; the
    default, auto, attaches at TC beside it: tests/test_hooks_live.py)."""
    lab = xdp_lab
    lab.attach_foreign_xdp("other_prog")
    one_error(run("attach", lab.cli_if, "--hook", "xdp", ns=lab.cli_ns, env=env),
              f"{lab.cli_if} already carries another XDP program 'other_prog'")
    assert lab.xdp_on_client() == "other_prog"
    r = run("detach", lab.cli_if, ns=lab.cli_ns, env=env)  # not ours: detach leaves it alone
    assert r.returncode == 0 and lab.xdp_on_client() == "other_prog"


#: run in the lab's client namespace: the library's own agent (AgentConfig.metrics_port,
#: as bench/soak_agent.py uses it) on a port that is taken
OWN_METRICS = """
import sys, urllib.request
from pathlib import Path
from iqn_ctl.live.agent import Agent, AgentConfig, AgentError
iface, port, tmp = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
agent = Agent(AgentConfig(iface=iface, metrics_port=port, state_dir=tmp / "s", run_dir=tmp / "run"))
try:
    agent.start()
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    print(next(ln for ln in page.splitlines() if ln.startswith("iqn_dataplane_info{")))
except AgentError as e:
    print(e)
finally:
    agent.shutdown()
"""


def test_metrics_port_taken(xdp_lab: Lab, env: dict[str, str], tmp_path: Path) -> None:
    """A taken --metrics-port is one line naming the address, whether the
    metrics are the process's (iqn-ctl attach: the supervisor's hub) or one
    library agent's own; either way nothing is left attached. On a free port the
    library agent's own /metrics has its data-plane labels."""
    from iqn_lab.testbed import PY

    lab = xdp_lab
    hold = subprocess.Popen(["ip", "netns", "exec", lab.cli_ns, PY, "-c",
                             "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
                             "print(s.getsockname()[1], flush=True); time.sleep(300)"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert hold.stdout is not None
        port = int(hold.stdout.readline())
        want = f"cannot serve metrics on 127.0.0.1:{port}: Address already in use"
        one_error(run("attach", lab.cli_if, "--metrics-port", str(port), ns=lab.cli_ns, env=env), want)
        assert lab.xdp_on_client() is None
        r = subprocess.run(["ip", "netns", "exec", lab.cli_ns, PY, "-c", OWN_METRICS, lab.cli_if, str(port),
                            str(tmp_path)], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.stdout.strip() == want, (r.stdout, r.stderr)
        assert lab.xdp_on_client() is None
    finally:
        hold.kill()
        hold.wait(10)
    r = subprocess.run(["ip", "netns", "exec", lab.cli_ns, PY, "-c", OWN_METRICS, lab.cli_if, str(port),
                        str(tmp_path)], capture_output=True, text=True, timeout=120)  # fmt: skip
    line = r.stdout.strip()
    assert line.startswith("iqn_dataplane_info{") and f'iface="{lab.cli_if}"' in line, (r.stdout, r.stderr)
    assert 'hook="xdp"' in line and 'link="ethernet"' in line, line
    assert lab.xdp_on_client() is None
