"""The access group (issue 20 item 2): a member of the agent's ``--group``
runs ``iqn-ctl flows``, ``status`` and ``stalls`` without root; a user outside
it cannot, with one error line each. Real unprivileged users (created for the
test, removed after), a real agent on a real veth, a real stall.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need
from test_agent_live import burst_times, need_xdp, poll_until, stop, wait_ready

from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import Testbed

IQN_CTL = str(Path(sys.executable).with_name("iqn-ctl"))


@pytest.fixture
def people() -> Iterator[tuple[str, str, str]]:
    """(group, a member, a user outside it), made for this test and removed after."""
    need_xdp()
    need(all(shutil.which(t) for t in ("setpriv", "useradd", "groupadd")), "needs setpriv, useradd, groupadd")
    tag = secrets.token_hex(3)
    group, inside, outside = f"iqg{tag}", f"iqi{tag}", f"iqo{tag}"
    made: list[list[str]] = []
    try:
        subprocess.run(["groupadd", "--system", group], check=True, capture_output=True)
        made.append(["groupdel", group])
        for user, extra in ((inside, ["--groups", group]), (outside, [])):
            subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                            "/nonexistent", "--shell", "/usr/sbin/nologin", *extra, user],
                           check=True, capture_output=True)  # fmt: skip
            made.append(["userdel", user])
        yield group, inside, outside
    finally:
        for cmd in reversed(made):
            subprocess.run(cmd, capture_output=True)


def as_user(user: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``iqn-ctl ARGS`` as ``user`` with its groups, no capabilities at all."""
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                           "--inh-caps=-all", "--bounding-set=-all", IQN_CTL, *args],
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip


def mode_and_group(p: Path) -> tuple[int, str]:
    st = os.lstat(p)
    return stat.S_IMODE(st.st_mode), grp.getgrgid(st.st_gid).gr_name


def test_group_member_reads_flows_status_and_stalls_others_cannot(people: tuple[str, str, str]) -> None:
    group, inside, outside = people
    base = Path(tempfile.mkdtemp(prefix="iqn-grp-", dir="/tmp"))
    base.chmod(0o755)  # only the agent's own dirs decide who gets in
    run_dir, state = base / "run", base / "state"
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "IQN_RUN_DIR": str(run_dir)}
    try:
        with Testbed() as lab:
            # a group that does not exist: one line, nothing attached
            attach = lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(state), "--group")
            r = subprocess.run([*attach, f"{group}x"], env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode == 2 and r.stderr.strip().splitlines() == [
                f"iqn-ctl: error: --group {group}x: no such group (create it: groupadd --system {group}x)"]
            assert lab.xdp_on_client() is None
            agent = subprocess.Popen([*attach, group], env=env, stderr=subprocess.PIPE, text=True)
            try:
                sock = sock_path(run_dir, lab.cli_if)
                wait_ready(sock, agent)
                snd = lab.send({"lead": 0.3, "flows": [{"name": "x", "src": lab.srv4, "dst": lab.cli4,
                                                        "dport": 40041, "frame": 1250,
                                                        "times": burst_times(0.0, 41)}]})
                _, err = snd.communicate(timeout=60)
                assert snd.returncode == 0, err
                poll_until(lambda: request(sock, "status"), lambda s: s["stalls_ended"] >= 1)
                db = state / "stalls.sqlite"
                assert mode_and_group(run_dir) == (0o750, group)
                assert mode_and_group(sock) == (0o660, group)
                assert mode_and_group(state) == (0o750, group)
                for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                    assert mode_and_group(f) == (0o640, group), f
                flow = f"{lab.srv4}:443>{lab.cli4}:40041"
                # the member: every read command, no root, no capability
                st = as_user(inside, "status", "--json", env=env)
                assert st.returncode == 0, st.stderr
                (mine,) = [a for a in json.loads(st.stdout) if a["iface"] == lab.cli_if]
                assert mine["stalls_ended"] == 1
                fl = as_user(inside, "flows", "--json", "--iface", lab.cli_if, env=env)
                assert fl.returncode == 0 and [f["flow"] for f in json.loads(fl.stdout)] == [flow], fl.stderr
                sl = as_user(inside, "stalls", "--json", "--state-dir", str(state), env=env)
                assert sl.returncode == 0, sl.stderr
                assert [json.loads(x)["flow"] for x in sl.stdout.splitlines()] == [flow]
                # the outsider: one line each, nothing shown
                for args, why in ((("status",), "the IQN API is for root and the agent's group"),
                                  (("flows",), "the IQN API is for root and the agent's group"),
                                  (("stalls", "--state-dir", str(state)),
                                   "the stall history is for root and the agent's group")):
                    r = as_user(outside, *args, env=env)
                    assert r.returncode == 2 and r.stdout == "", (args, r.stdout)
                    assert len(r.stderr.splitlines()) == 1 and why in r.stderr, (args, r.stderr)
                # the agent's own files stay its own
                assert not list(run_dir.glob("*.pid")) or all(
                    mode_and_group(p)[0] == 0o600 for p in run_dir.glob("*.pid"))
            finally:
                log = stop(agent)
            assert agent.returncode == 0, log
            # no agent running, its WAL files gone: the member still reads the history
            assert not Path(f"{db}-wal").exists()
            sl = as_user(inside, "stalls", "--json", "--state-dir", str(state), env=env)
            assert sl.returncode == 0, sl.stderr
            assert [json.loads(x)["flow"] for x in sl.stdout.splitlines()] == [flow]
            assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()  # it wrote nothing
    finally:
        shutil.rmtree(base, ignore_errors=True)
