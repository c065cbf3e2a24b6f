"""The agent as the unit runs it: the ``iqn`` user with only the unit's
capabilities (issue 20, point 2), on a real veth, seeing a real stall.

No systemd runs here, so the unit's ``User``/``Group``/``AmbientCapabilities``/
``CapabilityBoundingSet``/``NoNewPrivileges`` are applied with setpriv to the
unit's own ExecStart line (expanded as systemd would). The user is created if
missing and removed afterwards. A capability taken away from that set is one
error line that names it.
"""

from __future__ import annotations

import json
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need
from test_agent_live import LEAD, burst_times, need_xdp, poll_until, settled, stop, wait_ready
from test_systemd_unit import UNIT, expand, settings

from iqn_ctl.live.api import request, sock_path
from iqn_ctl.live.caps import CAP_NUMBERS
from iqn_lab.testbed import Testbed as Lab


@pytest.fixture
def iqn_user() -> Iterator[str]:
    """The unit's user and group, created for the test when missing, removed after."""
    need_xdp()
    need(shutil.which("setpriv") is not None and shutil.which("useradd") is not None,
         "needs setpriv and useradd")  # fmt: skip
    unit = settings(UNIT.read_text())
    (user,) = unit["User"]
    (group,) = unit["Group"]
    assert user == group == "iqn"
    try:
        pwd.getpwnam(user)
        created = False
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", user],
                       check=True, capture_output=True)  # fmt: skip
        created = True
    try:
        yield user
    finally:
        if created:
            subprocess.run(["userdel", user], capture_output=True)


def unit_caps() -> list[str]:
    unit = settings(UNIT.read_text())
    (ambient,) = unit["AmbientCapabilities"]
    (bounding,) = unit["CapabilityBoundingSet"]
    assert ambient.split() == bounding.split()
    assert unit["NoNewPrivileges"] == ["true"]
    return ambient.split()


def as_unit(user: str, caps: list[str], argv: list[str]) -> list[str]:
    """setpriv doing what systemd does with User=, Group=, AmbientCapabilities=,
    CapabilityBoundingSet= and NoNewPrivileges=."""
    c = ",".join("+" + x.removeprefix("CAP_").lower() for x in caps)
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--no-new-privs",
            f"--inh-caps=-all,{c}", f"--ambient-caps=-all,{c}", f"--bounding-set=-all,{c}",
            "--", *argv]  # fmt: skip


def test_agent_as_iqn_user_with_only_the_units_capabilities_sees_a_stall(iqn_user: str) -> None:
    caps = unit_caps()
    assert set(caps) <= set(CAP_NUMBERS) and "CAP_SYS_ADMIN" not in caps
    base = Path(tempfile.mkdtemp(prefix="iqn-lp-", dir="/tmp"))
    try:
        base.chmod(0o755)
        for d in ("state", "run"):
            (base / d).mkdir(mode=0o700)
            shutil.chown(base / d, iqn_user, iqn_user)
        (start,) = settings(UNIT.read_text())["ExecStart"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "IQN_RUN_DIR": str(base / "run")}
        with Lab() as lab:
            argv = expand(start, lab.cli_if, {"IQN_ARGS": ""})
            argv = [str(Path(a.replace("/opt/iqn/.venv/bin/", f"{Path(sys.executable).parent}/")))
                    if a.startswith("/opt/iqn/") else a.replace("/var/lib/iqn", str(base / "state"))
                    for a in argv]  # fmt: skip
            ns = ["ip", "netns", "exec", lab.cli_ns]
            # one capability fewer: one line naming it, nothing attached
            for gone in caps:
                r = subprocess.run([*ns, *as_unit(iqn_user, [c for c in caps if c != gone], argv)], env=env,
                                   capture_output=True, text=True, timeout=120)  # fmt: skip
                assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
                assert r.stderr.startswith(f"iqn-ctl: error: attach needs {gone}: "), r.stderr
                assert lab.xdp_on_client() is None
            agent = subprocess.Popen([*ns, *as_unit(iqn_user, caps, argv)], env=env, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
            try:
                sock = sock_path(base / "run", lab.cli_if)
                wait_ready(sock, agent)
                status = Path(f"/proc/{agent.pid}/status").read_text()
                fields = dict(line.split(":", 1) for line in status.splitlines())
                assert fields["Uid"].split()[1] == str(pwd.getpwnam(iqn_user).pw_uid)  # effective uid
                want = sum(1 << CAP_NUMBERS[c] for c in caps)
                assert int(fields["CapEff"], 16) == want and int(fields["CapBnd"], 16) == want, status
                assert lab.xdp_on_client() == "iqn_xdp"
                one = {"name": "v4", "src": lab.srv4, "dst": lab.cli4, "dport": 40001, "frame": 1250,
                       "times": burst_times(0.0, 1)}  # fmt: skip
                spec = {"lead": LEAD, "flows": [one]}
                snd = lab.send(spec)
                flow = f"{lab.srv4}:443>{lab.cli4}:40001"
                mid = poll_until(lambda: request(sock, "flows"),
                                 lambda fs: any(f["flow"] == flow and f["state"] == "stall" for f in fs))
                assert any(f["flow"] == flow and f["state"] == "stall" for f in mid), mid
                out, err = snd.communicate(timeout=60)
                assert snd.returncode == 0, err
                sent = sum(len(v) for v in json.loads(out)["sent"].values())
                st = poll_until(lambda: request(sock, "status"), settled(sent))
                assert settled(sent)(st), st
            finally:
                log = stop(agent)
            assert agent.returncode == 0, log
            # the history is the iqn user's, and holds the stall
            hist = base / "state" / "stalls.sqlite"
            assert hist.stat().st_uid == pwd.getpwnam(iqn_user).pw_uid
            r = subprocess.run([str(Path(sys.executable).with_name("iqn-ctl")), "stalls", "--json",
                                "--state-dir", str(base / "state")],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
            stalls = [json.loads(x) for x in r.stdout.splitlines()]
            assert [s["flow"] for s in stalls] == [flow], (r.stderr, stalls)
            assert stalls[0]["duration"] > 0, stalls
            assert lab.xdp_on_client() is None
    finally:
        shutil.rmtree(base, ignore_errors=True)
