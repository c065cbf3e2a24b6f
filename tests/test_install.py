"""``pip install .`` (not only ``-e``) gives a working ``iqn-ctl attach``: the
BPF source ships as package data and is found inside the installed package.

The project is copied out of the checkout and installed into a fresh venv
(``--system-site-packages`` for Debian's bcc; the dependencies come from the
development venv through a path file, so the test needs no network), then the
installed ``iqn-ctl`` attaches to a veth in a namespace and detaches again,
run from a directory outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT
from test_agent_live import need_xdp

from iqn_lab.testbed import Testbed

SKIP = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build", "data", "results",
                              ".*_cache", ".hypothesis")  # fmt: skip


def _install(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    venv = tmp / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                   check=True, timeout=120)  # fmt: skip
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    (Path(purelib) / "zz_dev_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
         "--no-build-isolation", str(src)],
        capture_output=True, text=True, timeout=300, cwd=tmp,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    shutil.rmtree(src)  # nothing may come from the copy either
    return venv


def test_pip_install_attaches(tmp_path: Path) -> None:
    need_xdp()
    venv = _install(tmp_path)
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import iqn_ctl, iqn_ctl.live.datapath as d; "
         "print(iqn_ctl.__file__); print(d.SRC, d.SRC.is_file())"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout.split("\n")  # fmt: skip
    assert where[0].startswith(str(venv)), where  # the installed copy, not the checkout
    assert where[1].startswith(str(venv)) and where[1].endswith("/iqn_ctl/live/bpf/iqn_xdp.c True"), where
    ctl = str(venv / "bin" / "iqn-ctl")
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"), IQN_STATE_DIR=str(tmp_path / "state"))
    with Testbed() as lab:
        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["ip", "netns", "exec", lab.cli_ns, ctl, *args], capture_output=True,
                                  text=True, timeout=180, env=env, cwd=tmp_path)  # fmt: skip

        r = run("attach", lab.cli_if, "--daemon", "--xdp-mode", "skb")
        assert r.returncode == 0, r.stderr
        try:
            assert lab.xdp_on_client() == "iqn_xdp"
            st = run("status", "--json")
            assert st.returncode == 0, st.stderr
            (agent,) = json.loads(st.stdout)
            assert (agent["iface"], agent["xdp_mode"]) == (lab.cli_if, "skb")
        finally:
            d = run("detach", lab.cli_if)
        assert d.returncode == 0, d.stderr
        assert lab.xdp_on_client() is None
