"""The Vagrant VM pair: the Vagrantfile validates (libvirt provider and
generic), a broken one does not, the host-side certificates it makes are
usable, every provisioning script passes shellcheck, the local box's recipe
carries what the roles need, the accelerator is chosen as documented, and
(the long one) both VMs really boot from the local box and a real stall
crosses them (iqn_lab.vmpair)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest

from iqn_lab.certs import fingerprint
from tests.conftest import need, need_root

ROOT = Path(__file__).resolve().parent.parent
VAGRANT_DIR = ROOT / "vagrant"
SCRIPTS = [
    *sorted(VAGRANT_DIR.glob("*.sh")),
    ROOT / "iqn_lab" / "templates" / "shape.sh",
    ROOT / "scripts" / "make-box.sh",
    ROOT / "scripts" / "vm-accel.sh",
]


def need_vagrant() -> None:
    need(shutil.which("vagrant") is not None, "needs Debian's vagrant")
    plugins = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True).stdout
    need("vagrant-libvirt" in plugins, "needs Debian's vagrant-libvirt")


def need_libvirtd() -> None:
    need(shutil.which("virsh") is not None, "needs virsh (bash scripts/setup.sh)")
    need(
        subprocess.run(["virsh", "-c", "qemu:///system", "uri"], capture_output=True).returncode == 0,
        "needs a running libvirtd (bash scripts/setup.sh starts it)",
    )


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
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0 and f"iqn-{name}" in check.stdout
        # the key matches the certificate
        pub_c = subprocess.run(["openssl", "x509", "-in", str(crt), "-noout", "-pubkey"], capture_output=True)
        pub_k = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout"], capture_output=True)
        assert pub_c.stdout == pub_k.stdout and pub_c.stdout
    assert fingerprint(pki / "server.crt") != fingerprint(pki / "client.crt")


# -- the local box and the accelerator ------------------------------------------------------------


def _words(path: Path) -> set[str]:
    return {w for line in path.read_text().splitlines() for w in line.split("#")[0].split()}


def _apt_need(script: Path, *, desktop: bool) -> set[str]:
    """The packages a provisioning script installs with apt_need (the desktop's only if asked)."""
    out: set[str] = set()
    for line in script.read_text().splitlines():
        line = line.strip()
        if line.startswith("apt_need ") and (desktop or "xfce4" not in line):
            out |= set(line.split()[1:])
    return out


def test_box_recipe_lists_what_the_roles_need() -> None:
    """The local box must carry every package provisioning would otherwise download (the
    VMs have no way out), the router's data plane as setup.sh installs it, the VM
    kernel's headers (bcc compiles against them), and the project's Python dependencies."""
    box = _words(VAGRANT_DIR / "box" / "packages.txt")
    need_pkgs = _apt_need(VAGRANT_DIR / "provision-router.sh", desktop=False)
    need_pkgs |= _apt_need(VAGRANT_DIR / "provision-client.sh", desktop=False)
    assert {"openvpn", "nftables", "rsync"} <= need_pkgs  # the parser found the lists
    router = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh"), "--role", "router", "--print-packages"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    apt = set(router.splitlines()[0].removeprefix("apt: ").split())
    build_only = {"python3-pip", "python3-dev"}  # the box's venv is filled from wheels at build time
    missing = (
        need_pkgs
        | (apt - build_only)
        | {"linux-image-amd64", "linux-headers-amd64", "openssh-server", "sudo", "python3-venv"}
    ) - box
    assert not missing, f"vagrant/box/packages.txt lacks {sorted(missing)}"
    reqs = {
        re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower().replace("_", "-")
        for r in (VAGRANT_DIR / "box" / "requirements.txt").read_text().splitlines()
        if r.strip() and not r.startswith("#")
    }
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {
        re.split(r"[<>=\[ ]", d, maxsplit=1)[0].lower().replace("_", "-")
        for d in [*meta["dependencies"], *meta["optional-dependencies"]["router"], "aioquic"]
    }
    assert not wanted - reqs, f"vagrant/box/requirements.txt lacks {sorted(wanted - reqs)}"


def _show(tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return validate(VAGRANT_DIR, tmp, IQN_VAGRANT_SHOW="1", **env)


def test_vagrantfile_names_the_box_by_its_recipe(tmp_path: Path) -> None:
    """The Vagrantfile's default box is the one make-box.sh builds for this recipe (same
    hash), and IQN_BOX still selects a public one."""
    need_vagrant()
    key = subprocess.run(
        ["bash", str(ROOT / "scripts" / "make-box.sh"), "--print-key"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", key)
    r = _show(tmp_path)
    assert r.returncode == 0 and f"box=iqn-bookworm-{key} " in r.stderr, r.stdout + r.stderr
    r = _show(tmp_path, IQN_BOX="debian/bookworm64")
    assert "box=debian/bookworm64 " in r.stderr


def test_accelerator_choice(tmp_path: Path) -> None:
    """IQN_VAGRANT_ACCEL wins; else the probe's record in the box cache; a bad value is a
    one-line error. The probe itself says tcg when the kernel does not start under KVM."""
    need_vagrant()
    cache = tmp_path / "cache"
    cache.mkdir()
    for rec in ("kvm", "tcg"):
        (cache / "accel").write_text(rec + "\n")
        shown = _show(tmp_path, IQN_BOX_CACHE=str(cache)).stderr
        assert f"accel={rec} " in shown
        # TCG boots slowly: up waits 1500 s for SSH (Vagrant's 300 s failed a loaded CI run)
        assert f"boot_timeout={1500 if rec == 'tcg' else 300}" in shown, shown
        other = "tcg" if rec == "kvm" else "kvm"
        assert f"accel={other} " in _show(tmp_path, IQN_BOX_CACHE=str(cache), IQN_VAGRANT_ACCEL=other).stderr
    bad = _show(tmp_path, IQN_VAGRANT_ACCEL="xen")
    assert (
        bad.returncode != 0 and 'IQN_VAGRANT_ACCEL must be kvm or tcg, not "xen"' in bad.stdout + bad.stderr
    )
    # a "kernel" that is not one never prints Linux's banner: the probe must answer tcg
    need(shutil.which("qemu-system-x86_64") is not None, "needs Debian's qemu-system-x86")
    box = tmp_path / "box"
    box.mkdir()
    (box / "vmlinuz").write_bytes(b"\0" * 4096)
    (box / "initrd.img").write_bytes(b"\0" * 4096)
    probe = subprocess.run(
        ["bash", str(ROOT / "scripts" / "vm-accel.sh"), str(box)],
        capture_output=True,
        text=True,
        env=dict(os.environ, IQN_BOX_CACHE=str(cache), IQN_ACCEL_PROBE_S="10"),
        timeout=60,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "tcg", probe.stdout + probe.stderr
    assert (cache / "accel").read_text().strip() == "tcg"


def test_vagrant_error_keeps_the_message_not_the_frames(tmp_path: Path) -> None:
    """A failed `vagrant up` is reported by what Vagrant said and the exception's own line,
    not by the 25 backtrace frames (nor Vagrant's own log lines) that hid the message in a
    CI run; the log, written as VmPair writes it, has each line's time."""
    from iqn_lab.vmpair import _stamped, tail, vagrant_error

    gems = "/usr/share/rubygems-integration/all/gems/vagrant-2.3.4/lib/vagrant"
    frames = [f"{gems}/action/warden.rb:{i}:in `call'" for i in range(40)]
    exc = f"{gems}/x.rb:9:in `wait': boom (Vagrant::Errors::VMBootTimeout)"
    up = [
        "Bringing machine 'router' up with 'libvirt' provider...",
        " INFO machine: Calling action: up on provider Libvirt (router)",
        "==> router: Waiting for SSH to become available...\r==> router: Progress: 40%",
        "Timed out while waiting for the machine to boot. This means that",
        exc,
        *frames, "\tfrom /usr/lib/ruby/3.1.0/y.rb:3:in `run'",
    ]
    log = tmp_path / "vagrant.log"
    with log.open("w") as f:
        added = ["==> box: Successfully added box", ""]
        for cmd, lines, rc in (("box add --force x", added, 0), ("up", up, 1)):
            f.write(f"\n$ vagrant {cmd}\n")
            f.flush()
            said = tmp_path / "said.txt"
            said.write_text("\n".join(lines) + "\n")
            assert _stamped(["bash", "-c", f"cat {said}; exit {rc}"], f, dict(os.environ), 30) == rc
    stamp = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} ")
    text = log.read_text()
    assert all(stamp.match(ln) for ln in text.splitlines() if ln and not ln.startswith("$ ")), text
    got = [stamp.sub("", ln) for ln in vagrant_error(log).splitlines()]
    assert got == [
        "Bringing machine 'router' up with 'libvirt' provider...",
        "==> router: Waiting for SSH to become available...",
        "Timed out while waiting for the machine to boot. This means that",
        exc,
    ], got
    assert "Successfully added box" in tail(log) and "warden.rb" not in tail(log)
    # a command that outlives its timeout is killed, and the log says so
    with log.open("a") as f:
        assert _stamped(["sleep", "30"], f, dict(os.environ), 0.5) < 0
    assert log.read_text().endswith("(killed after 0 s)\n")


def test_libvirt_answers_from_its_capabilities_cache(tmp_path: Path) -> None:
    """After one probe, libvirt answers a look at QEMU's capabilities from its cache. Where
    /dev/kvm is in a group libvirt's qemu user is not in (a container without udev; a box
    build that bound the host's /dev into its chroot), it
    probes QEMU again on every call, ~4 s each; `vagrant up` spent 4-5 minutes so and a CI
    run failed at 297 s. scripts/setup.sh gives /dev/kvm to the kvm group; the VM pair
    checks the look-up time before `up` and says what is wrong (shown here by taking
    /dev/kvm from the kvm group for a moment)."""
    need_root()
    need_libvirtd()
    need(Path("/dev/kvm").exists(), "needs /dev/kvm")
    from iqn_lab import vmpair
    from iqn_lab.errors import LabError

    pair = vmpair.VmPair(tmp_path)
    pair.accel = "tcg"
    pair.warm_libvirt()
    assert pair.times["libvirt_lookup_s"] <= vmpair.LIBVIRT_LOOKUP_MAX_S, pair.times
    group = Path("/dev/kvm").group()
    assert group == "kvm", f"/dev/kvm's group is {group}: scripts/setup.sh did not give it to kvm"
    try:
        shutil.chown("/dev/kvm", group="root")
        with pytest.raises(LabError, match="probes QEMU again on every call.*group is root"):
            stale = vmpair.VmPair(tmp_path)
            stale.accel = "tcg"
            stale.warm_libvirt()
    finally:
        shutil.chown("/dev/kvm", group="kvm")
    pair.warm_libvirt()  # libvirt probes once more after the change back, then keeps it
    assert pair.times["libvirt_lookup_s"] <= vmpair.LIBVIRT_LOOKUP_MAX_S, pair.times


def test_vm_pair_needs_virtlogd_not_its_socket_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CI run failed at `vagrant up` with "virtlogd-sock: Connection refused": the machine
    kept /run/libvirt's socket files with no virtlogd behind them, and setup only looked for
    the file. Setup now asks the socket; so does the VM pair, which names the daemon before
    `up` (shown with a socket file no daemon holds)."""
    need_root()
    need_libvirtd()
    from iqn_lab import vmpair
    from iqn_lab.errors import LabError

    assert vmpair.answers(vmpair.VIRTLOGD_SOCK), "virtlogd is not running: scripts/setup.sh starts it"
    dead = tmp_path / "virtlogd-sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(dead))  # the file stays when the socket closes
    assert dead.is_socket() and not vmpair.answers(dead)
    monkeypatch.setattr(vmpair, "VIRTLOGD_SOCK", dead)
    pair = vmpair.VmPair(tmp_path)
    pair.accel = "tcg"
    with pytest.raises(LabError, match=f"virtlogd does not answer on {dead}"):
        pair.warm_libvirt()
    assert "libvirt_probe_s" not in pair.times


def test_match_joins_a_stall_reported_in_pieces() -> None:
    """A run's stalls (2026-12-02, TCG): the agent reported the player's 9.91 s stall as
    two touching pieces, and 2.5 s after it a short stall of retransmitted answers; the
    pieces are one stall, the late one is not part of it, an unseen stall pairs with none."""
    from iqn_lab.vmpair import match

    real = [{"start": 329.53, "end": 331.79}, {"start": 344.79, "end": 354.70},
            {"start": 400.0, "end": 403.0}]
    agent = [{"start": 352.61, "end": 354.36}, {"start": 329.73, "end": 331.83},
             {"start": 344.73, "end": 352.61}, {"start": 356.89, "end": 357.94}]
    got = [[(s["start"], s["end"]) for s in pieces] for _, pieces in match(real, agent)]
    assert got == [[(329.73, 331.83)], [(344.73, 352.61), (352.61, 354.36)], []]


# -- the VM pair, for real -------------------------------------------------------------------------


def test_vm_pair_stall_crosses_the_tunnel(tmp_path: Path) -> None:
    """Budget: 15 min on a quiet 2-core CI box from scratch (box build ~2 min, `vagrant up`
    of both VMs under TCG, the agent's first compile, the signal run and destroy); measured
    here on a quiet box (2026-12-02): box 115 s, up 122-159 s, agent 100-111 s, signal 49-52 s,
    destroy 6-8 s (this test: 340 s with a cached box); under load 6-12: box 149-475 s, up
    619-865 s, agent 144-465 s (856-1273 s with a cached box; `up` waits up to 1500 s per VM
    for SSH). `up` took 4-5 minutes more while libvirt re-probed QEMU on every call (see
    test_libvirt_answers_from_its_capabilities_cache).
    The box is cached in /var/cache/iqn between runs.
    ``make vagrant-check`` runs the same check.

    Both VMs boot from the local box (built here from Debian's packages), the router runs
    the packaged agent unit on its WAN NIC, the client's only way to the OTT is the
    tunnel, the headless signal player stalls for real behind the router's bottleneck,
    ``iqn-ctl stalls --json`` on the router reports each of its stalls, and
    ``vagrant destroy -f`` leaves nothing of the run in libvirt."""
    need_root()
    need_vagrant()
    for tool in ("virsh", "qemu-system-x86_64", "debootstrap", "ssh"):
        need(shutil.which(tool) is not None, f"needs {tool} (bash scripts/setup.sh)")
    need_libvirtd()
    from iqn_lab import vmpair

    work = Path(tempfile.mkdtemp(prefix="iqn-vmpair-", dir="/var/tmp"))
    try:
        report = vmpair.check(work)
    except Exception:
        for name in ("vmpair.log", "vagrant.log"):
            if (work / name).exists():
                print(f"--- {name}", vmpair.tail(work / name, 60), sep="\n")
        raise
    finally:
        for big in ("pool", "vhome"):  # the box's copies (~1 GB each); the logs stay
            shutil.rmtree(work / big, ignore_errors=True)
    print(json.dumps({k: report[k] for k in ("times", "accel", "pairs", "agent")}, indent=1, default=str))

    # the agent runs on the router's WAN NIC, in a mode the kernel accepted
    assert report["agent"]["iface"] == report["wan_iface"]
    assert report["agent"]["xdp_mode"] in ("native", "skb"), report["agent"]  # skb: generic XDP
    # the client reaches the OTT only through the tunnel, and the OTT saw only the router
    assert " dev tun0 " in report["client_route"], report["client_route"]
    # each VM has its own SSH host key (none is baked into the box)
    keys = report["host_keys"]
    assert len(set(keys.values())) == 2 and all(k.startswith("SHA256:") for k in keys.values()), keys
    assert report["ott_peers"] == [report["router_wan_ip"]], report["ott_peers"]
    assert report["autoplay_posts"] > 0
    # the player really stalled behind the bottleneck, and the agent reported each of its
    # stalls (an agent stall overlapping it), with its duration (vmpair.match joins a stall
    # the agent reported in pieces; docs/lab.md, "Known limits").
    assert report["pairs"], f"the player logged no stall of {vmpair.MIN_STALL_S} s or more"
    for p in report["pairs"]:
        assert p["inferred_s"] is not None, (
            f"a {p['real_s']:.1f} s stall was not reported: {report['agent_stalls']}; "
            f"the agent at the end: {report['agent_end']}"
        )
        # ... with the duration the player measured (the agent's pieces of it joined)
        tol = vmpair.DURATION_TOL_S + vmpair.DURATION_TOL_FRAC * p["real_s"]
        assert abs(p["error_s"]) <= tol, (p, report["agent_stalls"], report["player_stalls"])
    assert report["router_wan_ip"] in report["flows"]  # the client, as the WAN sees it (NAT)
    # nothing of the run is left in libvirt
    assert report["leftovers"] == {"domains": [], "networks": [], "pools": [], "volumes": []}
    assert report["vagrant_left"] == {"domains": [], "networks": []}  # `vagrant destroy -f` did it
