"""Files, sockets and privileges of the live agent (issue 10, part C).

The agent runs as root and writes files by name in its run and state dirs;
these tests play the unprivileged user (``nobody`` via setpriv) who tries to
make it write, kill or serve what it should not: a run dir of theirs, a
symlinked pid file, an interface name that climbs out of the run dir, a state
dir whose name breaks a URI, the metrics port and the log's client addresses.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need, need_root
from test_agent_cli import one_error, run
from test_agent_live import DEADLINE, LEAD, burst_times, cli, need_xdp, poll_until

from iqn_ctl.errors import IqnError
from iqn_ctl.live.agent import DaemonLog
from iqn_ctl.live.api import request, sock_path
from iqn_ctl.live.history import History, StallRecord
from iqn_lab.testbed import Testbed as Lab

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
PRECIOUS = "precious: must never be overwritten\n"


def need_setpriv() -> None:
    need_root()
    need(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")


def as_nobody(*argv: str) -> None:
    subprocess.run([*NOBODY, *argv], check=True, capture_output=True, timeout=30)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory nobody can reach (pytest's own tmp dirs are root's, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="iqn-priv-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def xdp_lab() -> Iterator[Lab]:
    need_xdp()
    need_setpriv()
    with Lab() as lab:
        yield lab


def victim_file(tmp_path: Path) -> Path:
    """A root-owned file outside the run dir that a planted symlink points at."""
    v = tmp_path / "victim"
    v.write_text(PRECIOUS)
    v.chmod(0o644)
    return v


def attach_daemon(lab: Lab, run_dir: Path, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, IQN_RUN_DIR=str(run_dir))
    return cli(lab, env, "attach", lab.cli_if, "--daemon", "--state-dir", str(state), *extra)


def detach_quietly(lab: Lab, run_dir: Path) -> None:
    """Clean up after a test whose attach wrongly succeeded (a regression)."""
    cli(lab, dict(os.environ, IQN_RUN_DIR=str(run_dir)), "detach", lab.cli_if)


def one_line_refusal(r: subprocess.CompletedProcess[str], text: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iqn-ctl: error: "), r.stderr
    assert text in lines[0], lines[0]


# -- run dir and pid file -----------------------------------------------------------


def test_run_dir_owned_by_another_user_is_refused(xdp_lab: Lab, tmp_path: Path) -> None:
    lab = xdp_lab
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    shutil.chown(run_dir, "nobody", "nogroup")
    r = attach_daemon(lab, run_dir, tmp_path / "state")
    try:
        one_line_refusal(r, f"refusing run dir {run_dir}: owned by uid")
    finally:
        if r.returncode == 0:
            detach_quietly(lab, run_dir)
    assert list(run_dir.iterdir()) == [] and lab.xdp_on_client() is None


def test_symlink_planted_in_a_writable_run_dir_is_not_followed(
    xdp_lab: Lab, tmp_path: Path, open_tmp: Path
) -> None:
    """A root-owned run dir that others may write: nobody plants the pid file as
    a symlink to a root file; the agent refuses the dir and the file is intact."""
    lab = xdp_lab
    victim = victim_file(tmp_path)
    run_dir = open_tmp / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    as_nobody("ln", "-s", str(victim), str(run_dir / f"{lab.cli_if}.pid"))
    r = attach_daemon(lab, run_dir, tmp_path / "state")
    try:
        one_line_refusal(r, f"refusing run dir {run_dir}: writable by group or others (mode 777)")
    finally:
        if r.returncode == 0:
            detach_quietly(lab, run_dir)
    assert victim.read_text() == PRECIOUS
    assert lab.xdp_on_client() is None


def test_symlinked_pid_file_is_refused(xdp_lab: Lab, tmp_path: Path, open_tmp: Path) -> None:
    """The link was planted while the dir was open, then the dir was closed
    (0700, root's): the pid file is still opened without following it."""
    lab = xdp_lab
    victim = victim_file(tmp_path)
    run_dir = open_tmp / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    pid = run_dir / f"{lab.cli_if}.pid"
    as_nobody("ln", "-s", str(victim), str(pid))
    run_dir.chmod(0o700)
    r = attach_daemon(lab, run_dir, tmp_path / "state")
    try:
        one_line_refusal(r, f"refusing pid file {pid}: it is a symbolic link")
        d = run("detach", lab.cli_if, env=dict(os.environ, IQN_RUN_DIR=str(run_dir)), ns=lab.cli_ns)
        one_line_refusal(d, f"refusing pid file {pid}: it is a symbolic link")
    finally:
        if r.returncode == 0:
            detach_quietly(lab, run_dir)
    assert victim.read_text() == PRECIOUS
    assert pid.is_symlink() and lab.xdp_on_client() is None


# -- interface names that are paths --------------------------------------------------

HOLD_LOCK = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def test_detach_and_flows_refuse_a_path_as_interface(tmp_path: Path) -> None:
    """``detach '../x'`` used to kill the process named in ``<run dir>/../x.pid``
    (held like an agent's lock) and ``flows --iface '../x'`` to talk to
    ``../x.sock``; both are now one error line, and nothing is touched."""
    need_root()
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    env = dict(os.environ, IQN_RUN_DIR=str(run_dir))
    victim = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "x.pid")],
                              stdout=subprocess.PIPE, text=True)
    outside = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    outside.bind(str(tmp_path / "x.sock"))
    outside.listen(4)
    outside.settimeout(0.2)
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = outside.accept()
            except TimeoutError:
                continue
            accepted.append(1)
            conn.sendall(b'{"ok": true, "result": []}\n')
            conn.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "locked"
        for name in ("../x", "..", "a:b", "a b", "x" * 16):
            one_error(run("detach", name, env=env), f"{name!r} is not a valid interface name")
        one_error(run("flows", "--iface", "../x", env=env), "'../x' is not a valid interface name")
        one_error(run("flows", "--iface", "../x", "--json", env=env), "'../x' is not a valid interface name")
        time.sleep(0.3)  # a connection, had there been one, is accepted within 0.2 s
        assert victim.poll() is None, "detach killed a process named outside the run dir"
        assert accepted == [], "flows connected to a socket outside the run dir"
        assert (tmp_path / "x.pid").exists() and (tmp_path / "x.sock").exists()
    finally:
        stop.set()
        server.join(2)
        outside.close()
        victim.kill()
        victim.wait(10)


# -- the history's URI -----------------------------------------------------------------


def test_state_dir_with_question_mark_and_hash_opens_the_right_file(tmp_path: Path) -> None:
    """``stalls`` opens the history read-write through a ``file:`` URI; unescaped,
    ``.../st?x#y/stalls.sqlite`` named the file ``.../st`` (here a decoy history)."""
    state = tmp_path / "st?x#y"
    with History(state) as h:
        h.add([StallRecord("eth0", "real", "198.18.0.2", "198.18.0.1", 1.0, 2.0, 8, 2.5)])
    with History(tmp_path / "decoy") as h:  # a valid history with another row...
        h.add([StallRecord("eth0", "decoy", "198.18.9.9", "198.18.9.1", 1.0, 2.0, 8, 2.5)])
    shutil.copy(tmp_path / "decoy" / "stalls.sqlite", tmp_path / "st")  # ...where the bad URI points
    r = run("stalls", "--json", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["flow"] for x in r.stdout.splitlines()] == ["real"]


# -- metrics address, --redact, the daemon's log ----------------------------------------


def listening(ns: str, port: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltnH", f"sport = :{port}"],
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


def test_metrics_on_loopback_by_default_and_redacted_logs(xdp_lab: Lab, tmp_path: Path) -> None:
    """One daemon with --metrics-port (no --metrics-addr) and --redact: /metrics
    listens on 127.0.0.1 only; after a real stall the daemon log (0600) names the
    client only as ``anon-...`` (the same hash in every line of that client), the
    metrics name no client, and the root-only history keeps the address."""
    lab = xdp_lab
    run_dir, state = tmp_path / "run", tmp_path / "state"
    port = random.randrange(20000, 60000)
    env = dict(os.environ, IQN_RUN_DIR=str(run_dir))
    a = attach_daemon(lab, run_dir, state, "--metrics-port", str(port), "--redact")
    try:
        assert a.returncode == 0, a.stderr
        assert listening(lab.cli_ns, port) == [f"127.0.0.1:{port}"]
        snd = lab.send({"lead": LEAD, "flows": [
            {"name": "v4", "src": lab.srv4, "dst": lab.cli4, "dport": 40021, "frame": 1250,
             "times": burst_times(0.0, 7)}]})
        out, err = snd.communicate(timeout=60)
        assert snd.returncode == 0, err
        sent = len(json.loads(out)["sent"]["v4"])
        sock = sock_path(run_dir, lab.cli_if)
        st = poll_until(lambda: request(sock, "status"),
                        lambda s: s["events"] + s["lost"] >= sent and s["stalls_ended"] >= 1,
                        timeout=DEADLINE)
        assert st["stalls_ended"] >= 1, st
        metrics = subprocess.run(
            ["ip", "netns", "exec", lab.cli_ns, sys.executable, "-c",
             f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics')"
             ".read().decode())"], capture_output=True, text=True, timeout=30)
        assert "iqn_stalls_ended_total" in metrics.stdout, metrics.stderr
        stalls = [json.loads(x) for x in cli(lab, env, "stalls", "--json", "--state-dir",
                                              str(state)).stdout.splitlines()]
    finally:
        d = cli(lab, env, "detach", lab.cli_if)
    assert d.returncode == 0, d.stderr
    assert lab.cli4 not in metrics.stdout
    log_path = state / f"{lab.cli_if}.log"
    assert log_path.stat().st_mode & 0o777 == 0o600
    log = log_path.read_text()
    lines = [ln for ln in log.splitlines() if " stall " in ln]
    assert any("stall start" in ln for ln in lines) and any("stall end" in ln for ln in lines), log
    assert lab.cli4 not in log, log
    hashes = {ln.split("client=")[1].split()[0] for ln in lines}
    assert len(hashes) == 1 and next(iter(hashes)).startswith("anon-"), lines
    assert all(f"{lab.srv4}:443>{next(iter(hashes))}:40021" in ln for ln in lines), lines
    assert [s["client"] for s in stalls] == [lab.cli4]


def test_daemon_log_rotates_and_is_never_a_symlink(tmp_path: Path) -> None:
    """DaemonLog: size-based rotation keeping N old files, each 0600; the fds
    it was asked to redirect follow the current file; a symlink is refused."""
    path = tmp_path / "eth9.log"
    handler = DaemonLog(path, max_bytes=2000, backups=2)
    spare = os.open(os.devnull, os.O_WRONLY)
    handler.redirect(spare)
    logger = logging.getLogger("iqn.test.rotation")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for i in range(200):
            logger.info("line %03d %s", i, "x" * 40)
        os.write(spare, b"stray output after the last rotation\n")
    finally:
        logger.removeHandler(handler)
        handler.close()
        os.close(spare)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["eth9.log", "eth9.log.1", "eth9.log.2"]
    for name in files:  # the current file also holds the stray line written past the limit
        p, limit = tmp_path / name, 2000 if name != "eth9.log" else 2100
        assert p.stat().st_mode & 0o777 == 0o600 and p.stat().st_size <= limit, (name, p.stat())
    current = path.read_text()
    assert "line 199" in current and "stray output after the last rotation" in current
    assert "line 000" not in "".join((tmp_path / n).read_text() for n in files)

    victim = victim_file(tmp_path)
    link = tmp_path / "eth8.log"
    link.symlink_to(victim)
    with pytest.raises(IqnError, match="it is a symbolic link"):
        DaemonLog(link)
    assert victim.read_text() == PRECIOUS
