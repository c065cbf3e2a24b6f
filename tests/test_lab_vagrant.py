"""The Vagrant VM pair, as far as it can be tested without a box: the
Vagrantfile validates (libvirt provider and generic), a broken one does not,
the host-side certificates it makes are usable, and every provisioning script
passes shellcheck."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from iqn_lab.certs import fingerprint
from tests.conftest import need

ROOT = Path(__file__).resolve().parent.parent
VAGRANT_DIR = ROOT / "vagrant"
SCRIPTS = [*sorted(VAGRANT_DIR.glob("*.sh")), ROOT / "iqn_lab" / "templates" / "shape.sh"]


def need_vagrant() -> None:
    need(shutil.which("vagrant") is not None, "needs Debian's vagrant")
    plugins = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True).stdout
    need("vagrant-libvirt" in plugins, "needs Debian's vagrant-libvirt")


def validate(cwd: Path, tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = dict(
        os.environ,
        VAGRANT_DOTFILE_PATH=str(tmp / "dot"),
        VAGRANT_CHECKPOINT_DISABLE="1",
        VAGRANT_CWD=str(cwd),
        VAGRANT_HOME=str(tmp / "vhome"),
        VAGRANT_DEFAULT_PROVIDER="libvirt",
    )
    e.update(env)
    return subprocess.run(["vagrant", "validate", *args], capture_output=True, text=True, env=e, timeout=120)


def test_shellcheck_provisioning_scripts() -> None:
    need(shutil.which("shellcheck") is not None, "needs shellcheck")
    assert len(SCRIPTS) >= 4
    r = subprocess.run(
        ["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=VAGRANT_DIR
    )
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("extra", [(), ("--ignore-provider",)])
def test_vagrantfile_validates(tmp_path: Path, extra: tuple[str, ...]) -> None:
    need_vagrant()
    r = validate(VAGRANT_DIR, tmp_path, *extra)
    assert r.returncode == 0 and "validated successfully" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "pki").exists()


def test_broken_vagrantfile_fails_validation(tmp_path: Path) -> None:
    need_vagrant()
    broken = tmp_path / "vm"
    shutil.copytree(VAGRANT_DIR, broken)
    text = (broken / "Vagrantfile").read_text()
    (broken / "Vagrantfile").write_text(
        text.replace("lv.cpus = 2", "lv.cpus = 2\n    lv.no_such_setting = 1")
    )
    r = validate(broken, tmp_path)
    assert r.returncode != 0 and "no_such_setting" in (r.stdout + r.stderr)


def test_vagrantfile_makes_pinned_certificates(tmp_path: Path) -> None:
    need_vagrant()
    pki = tmp_path / "pki"
    r = validate(VAGRANT_DIR, tmp_path, IQN_MAKE_PKI="1", IQN_PKI_DIR=str(pki))
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("server", "client"):
        crt, key = pki / f"{name}.crt", pki / f"{name}.key"
        assert key.stat().st_mode & 0o077 == 0
        fp = fingerprint(crt)
        assert len(fp.split(":")) == 32
        check = subprocess.run(
            ["openssl", "x509", "-in", str(crt), "-noout", "-subject", "-checkend", "86400"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert check.returncode == 0 and f"iqn-{name}" in check.stdout
        # the key matches the certificate
        pub_c = subprocess.run(["openssl", "x509", "-in", str(crt), "-noout", "-pubkey"], capture_output=True)
        pub_k = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout"], capture_output=True)
        assert pub_c.stdout == pub_k.stdout and pub_c.stdout
    assert fingerprint(pki / "server.crt") != fingerprint(pki / "client.crt")
