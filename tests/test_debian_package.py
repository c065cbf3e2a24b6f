"""packaging/debian (issue 20, point 7): the router's .deb is built with
dpkg-deb, installed, removed and purged for real. Installed: the venv under
/opt/iqn runs, the unit and its drop-in are in place, the ``iqn`` user exists.
Removed: the program and unit are gone, the drop-in (a conffile), the history
and the user stay. Purged: nothing of it is left.

It changes the machine (/opt/iqn, /var/lib/iqn, a user), so it runs only where
none of these exist yet: it never touches an operator's install."""

from __future__ import annotations

import grp
import pwd
import shutil
import subprocess
from pathlib import Path

from conftest import ROOT, need, need_root

UNIT = Path("/lib/systemd/system/iqn-ctl@.service")
DROPIN = Path("/etc/systemd/system/iqn-ctl@.service.d/iqn.conf")
CONFIG, CONFIG_UNIT = Path("/etc/iqn/iqn.toml"), Path("/lib/systemd/system/iqn-ctl.service")
OPT, STATE = Path("/opt/iqn"), Path("/var/lib/iqn")


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dpkg", *args], capture_output=True, text=True, timeout=300)


def test_router_deb_builds_installs_removes_and_purges(tmp_path: Path) -> None:
    need_root()
    need(shutil.which("dpkg-deb") is not None, "needs dpkg-deb")
    for p in (OPT, STATE, DROPIN.parent, UNIT, Path("/usr/bin/iqn-ctl"), CONFIG.parent, CONFIG_UNIT):
        need(not p.exists(), f"{p} exists: not touching an existing install")
    need(not user_exists("iqn") and not group_exists("iqn"),
         "the iqn user or group exists: not touching an existing install")
    need(dpkg("-s", "iqn-router").returncode != 0, "iqn-router is installed: not touching it")
    r = subprocess.run(["bash", str(ROOT / "packaging" / "debian" / "build.sh"), str(tmp_path)],
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr
    deb = Path(r.stdout.strip().splitlines()[-1])
    assert deb.name.startswith("iqn-router_") and deb.suffix == ".deb", deb
    info = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Depends"], capture_output=True, text=True)
    assert "iqn-router" in info.stdout and "python3-bpfcc" in info.stdout, info.stdout
    try:
        inst = dpkg("-i", str(deb))
        assert inst.returncode == 0, inst.stderr
        assert UNIT.is_file() and DROPIN.is_file() and user_exists("iqn")
        assert grp.getgrgid(pwd.getpwnam("iqn").pw_gid).gr_name == "iqn"  # the access group
        assert CONFIG_UNIT.is_file() and CONFIG.read_text() == (ROOT / "packaging" / "iqn.toml").read_text()
        # the unit's command line reads the installed config (it attaches nothing: no section yet)
        chk = subprocess.run([str(OPT / ".venv" / "bin" / "iqn-ctl"), "attach", "--config", str(CONFIG)],
                             capture_output=True, text=True, timeout=120)
        assert chk.returncode == 2 and "no [interfaces.NAME] section" in chk.stderr, chk.stderr
        ctl = OPT / ".venv" / "bin" / "iqn-ctl"
        assert ctl.read_text().splitlines()[0] == f"#!{OPT}/.venv/bin/python"
        run = subprocess.run([str(ctl), "attach", "--help"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "--metrics-port" in run.stdout, run.stderr
        ver = subprocess.run(["/usr/bin/iqn-ctl", "--version"], capture_output=True, text=True, timeout=60)
        assert ver.returncode == 0 and ver.stdout.startswith("iqn-ctl "), ver.stderr  # on PATH, no git
        # the router venv: no browser or lab package; Debian's bcc through the system site
        pkgs = subprocess.run([str(OPT / ".venv" / "bin" / "python"), "-c", "import bcc, pyroute2"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert pkgs.returncode == 0, pkgs.stderr
        assert not list((OPT / ".venv").glob("lib/python3*/site-packages/selenium"))
        STATE.mkdir(mode=0o700)  # what the agent leaves: its history
        (STATE / "stalls.sqlite").write_bytes(b"history")
        rm = dpkg("-r", "iqn-router")
        assert rm.returncode == 0, rm.stderr
        assert not OPT.exists() and not UNIT.exists() and not Path("/usr/bin/iqn-ctl").is_symlink()
        assert DROPIN.is_file() and CONFIG.is_file() and user_exists("iqn")  # conffiles stay
        assert not CONFIG_UNIT.exists()
        assert (STATE / "stalls.sqlite").read_bytes() == b"history"
        purge = dpkg("-P", "iqn-router")
        assert purge.returncode == 0, purge.stderr
        assert not DROPIN.exists() and not STATE.exists() and not user_exists("iqn")
        assert not group_exists("iqn")
        assert not CONFIG.parent.exists()
        assert dpkg("-s", "iqn-router").returncode != 0
    finally:
        if dpkg("-s", "iqn-router").returncode == 0:
            dpkg("-P", "iqn-router")
