"""The Vagrant VM pair, end to end: two real VMs, a real tunnel, a real stall.

``vagrant/Vagrantfile`` describes the paper's topology as two machines; this
module is the check that it works (``make vagrant-check``, and the CI test in
tests/test_lab_vagrant.py). It

1. builds (or reuses) the local box (``scripts/make-box.sh``: Debian's
   packages only, cached by its recipe's hash) and learns the accelerator
   (``scripts/vm-accel.sh``: KVM if a kernel boots under it, else TCG);
2. brings both VMs up with ``vagrant up`` under libvirt, in a storage pool,
   networks and domains all named with a per-run ``iqn-`` prefix and /24s
   nobody else routes, so that several runs (and other users) never collide;
   the router gets a WAN NIC on an isolated network and runs the ISP agent
   there (the packaged systemd unit, XDP native or generic);
3. puts the OTT emulator in a host namespace plugged into that WAN network,
   runs the headless signal player (``iqn_lab.player``) in the client VM, where
   the tunnel is its only way out, and starves it for a while with the
   router's bottleneck so that it really stalls;
4. pairs ``iqn-ctl stalls --json`` on the router with the stalls the player
   logged (durations measured by the player, not planned ones; the errors are
   reported, docs/lab.md says why they are large under TCG);
5. ``vagrant destroy -f`` and removes the pool, and lists whatever libvirt
   object of the run is left (nothing, or the check fails).

Times (box, up, signal, destroy) are measured and reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from iqn_lab import procs
from iqn_lab import topology as T
from iqn_lab.certs import make_cert
from iqn_lab.errors import LabError
from iqn_lab.ott.media import MediaSpec, ensure_media
from iqn_lab.quic_cc import PAGE_STREAMS

ROOT = Path(__file__).resolve().parent.parent
VAGRANT_DIR = ROOT / "vagrant"
VIRSH = ["virsh", "-q", "-c", "qemu:///system"]
#: the check's /24s come from here (198.19.128-254.0/24: the lab's range, away from
#: the namespace labs' fixed 198.19.0-1.x), picked free of any host route
SUBNET_POOL = [f"198.19.{c}" for c in range(128, 255)]
#: the access link's and WAN's last octets (Vagrantfile), the OTT's two hosts
ROUTER_HOST, OTT_WWW_HOST, OTT_MEDIA_HOST = 11, 2, 3
#: how long the player plays, when the router starves it, and for how long
PLAY_S, STARVE_AT_S, STARVE_S, STARVE_RATE = 45.0, 12.0, 12.0, "100kbit"
#: a lighter clip than the lab's: QUIC in an emulated CPU must keep up with it when unstarved
MEDIA = MediaSpec(kbit=400)
#: a player stall this long must be reported; shorter ones (the startup wait) may be
MIN_STALL_S = 1.5
#: agent stalls closer than this are one stall in pieces (see :func:`match`). Under TCG the
#: signal may pause when the bottleneck lifts (the client VM's one emulated CPU refills the
#: video buffer): pieces 0.0 and 0.71 s apart in two runs of 2026-12-02 (before the page
#: host's stream grant, which may have been the cause); retransmitted answers after a stall
#: came 2.5 s after its end, and are not joined
PIECE_GAP_S = 1.5
#: an inferred duration may differ from the player's by this much plus a share of it
#: (measured under TCG, both ends of the page connection on a fixed window and 4096 streams:
#: -0.30 and +0.76 s; on a fixed window with 128 streams -0.16, -0.28, +0.63 and -4.3 s; with
#: Reno at the client -4.1 s of 12.7: toggles held back by what the starved path delays)
DURATION_TOL_S, DURATION_TOL_FRAC = 1.0, 0.2
UP_TIMEOUT = 1800
LIBVIRT_PROBE_TIMEOUT = 900
#: a look-up libvirt answers from its capabilities cache takes ~0.03 s; a fresh probe ~4 s
LIBVIRT_LOOKUP_MAX_S = 1.5
AGENT_TIMEOUT = 600
#: libvirt's log daemon: QEMU's console goes through it, so no domain starts without it
VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")


def answers(sock: Path) -> bool:
    """True when a daemon accepts connections on unix socket ``sock``. A socket file alone
    says nothing: a machine restored from an image keeps /run/libvirt's sockets with no
    daemon behind them (a CI run failed so, at ``vagrant up``: "Connection refused")."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(sock))
    except OSError:
        return False
    finally:
        s.close()
    return True


def _run(
    argv: list[str], timeout: float = 600, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
        raise LabError(f"{' '.join(argv[:4])} failed ({r.returncode}): " + "\n".join(tail))
    return r


def _stamped(argv: list[str], out: TextIO, env: dict[str, str], timeout: float) -> int:
    """Run ``argv``, writing each line of its output (stdout and stderr) to ``out`` after
    the wall-clock time it came (``HH:MM:SS.mmm``); kill it after ``timeout`` seconds."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        for line in proc.stdout:  # text mode: Vagrant's carriage-return redraws become lines
            now = time.time()
            out.write(f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d} {line}")
            out.flush()
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if killed.is_set():
        out.write(f"(killed after {timeout:.0f} s)\n")
    return rc


def free_subnets(count: int, rng: random.Random | None = None) -> list[str]:
    """``count`` distinct A.B.C prefixes from :data:`SUBNET_POOL` that no host route,
    address or libvirt network uses now."""
    used = _run(["ip", "-4", "route", "show", "table", "all"]).stdout + _run(["ip", "-4", "addr"]).stdout
    nets = _run([*VIRSH, "net-list", "--all", "--name"], check=False).stdout.split()
    for n in nets:
        used += _run([*VIRSH, "net-dumpxml", n], check=False).stdout
    free = [s for s in SUBNET_POOL if f"{s}." not in used]
    if len(free) < count:
        raise LabError("no free 198.19.x.0/24 left for the VM pair")
    return (rng or random.Random()).sample(free, count)


@dataclass
class Leftovers:
    domains: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.domains or self.networks or self.pools or self.volumes)


class VmPair:
    """One run's VM pair: its prefix, subnets, pool, Vagrant state and host namespace."""

    def __init__(self, work: Path, prefix: str | None = None) -> None:
        self.work = work
        self.prefix = prefix or f"iqn-{secrets.token_hex(3)}-"
        self.access, self.wan, self.mgmt = free_subnets(3)
        self.pool = f"{self.prefix}pool"
        self.ott_ns = f"{self.prefix}ott"
        self.log = work / "vmpair.log"
        self.times: dict[str, float] = {}
        #: what `vagrant destroy -f` left in libvirt (before destroy() removed it)
        self.vagrant_left = Leftovers()
        self.box_dir: Path | None = None
        self.box_name = ""

    # -- plumbing ------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e.update(
            VAGRANT_HOME=str(self.work / "vhome"),
            VAGRANT_DOTFILE_PATH=str(self.work / "dot"),
            VAGRANT_CWD=str(VAGRANT_DIR),
            VAGRANT_DEFAULT_PROVIDER="libvirt",
            VAGRANT_CHECKPOINT_DISABLE="1",
            IQN_VAGRANT_PREFIX=self.prefix,
            IQN_ACCESS_NET=self.access,
            IQN_WAN_NET=self.wan,
            IQN_MGMT_NET=self.mgmt,
            IQN_STORAGE_POOL=self.pool,
            IQN_PKI_DIR=str(self.work / "pki"),
            IQN_AGENT="1",
        )
        e.pop("IQN_BOX", None)
        return e

    def say(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, file=sys.stderr, flush=True)
        with self.log.open("a") as f:
            f.write(line + "\n")

    def vagrant(self, *args: str, timeout: float = 600, trace: bool = False) -> None:
        """Run ``vagrant ARGS``, its output appended to vagrant.log with each line's time
        (a CI run's ``up`` failed after 297 s with no clue where the time went);
        ``trace``: Vagrant's own log (VAGRANT_LOG=info) too."""
        env = self.env()
        if trace:
            env["VAGRANT_LOG"] = "info"
        with (self.work / "vagrant.log").open("a") as f:
            f.write(f"\n$ vagrant {' '.join(args)}\n")
            f.flush()
            rc = _stamped(["vagrant", *args], f, env, timeout)
        if rc != 0:
            raise LabError(
                f"vagrant {' '.join(args)} failed ({rc}):\n" + vagrant_error(self.work / "vagrant.log")
            )

    def ssh(
        self, host: str, cmd: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on a VM as root, over the ssh Vagrant set up (``vagrant ssh-config``):
        one Ruby start per VM, not one per command."""
        cfg = self.work / "ssh_config"
        argv = [
            "ssh",
            "-F",
            str(cfg),
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=30",
            host,
            "sudo sh -c " + _q(cmd),
        ]
        return _run(argv, timeout=timeout, check=check)

    # -- steps -----------------------------------------------------------------------------------

    def build_box(self) -> None:
        t0 = time.monotonic()
        out = _run(["bash", str(ROOT / "scripts" / "make-box.sh")], timeout=3600).stdout.strip().splitlines()
        self.box_dir = Path(out[-1])
        self.box_name = "iqn-bookworm-" + self.box_dir.name.removeprefix("box-")
        self.times["box_s"] = time.monotonic() - t0
        accel = (
            os.environ.get("IQN_VAGRANT_ACCEL")
            or _run(
                ["bash", str(ROOT / "scripts" / "vm-accel.sh"), str(self.box_dir)], timeout=120
            ).stdout.strip()
        )
        self.accel = accel
        self.say(f"box {self.box_name} ready in {self.times['box_s']:.0f} s; accelerator {accel}")

    def warm_libvirt(self) -> None:
        """libvirt probes QEMU's capabilities the first time a domain is defined on a machine
        (its cache, /var/cache/libvirt/qemu/capabilities, starts empty): done here, on its
        own clock. Then a second look must come from the cache: where libvirt finds its
        cache stale on every call it probes QEMU again each time (~4 s), and `vagrant up`,
        which makes dozens of calls, spent 4-5 minutes so (a CI run failed at 297 s). The
        cause seen: /dev/kvm in a group libvirt's qemu user is not in (scripts/setup.sh).
        First, virtlogd must answer: without it every domain fails to start, late in `up`."""
        if not answers(VIRTLOGD_SOCK):
            raise LabError(
                f"virtlogd does not answer on {VIRTLOGD_SOCK} and libvirt starts no domain without "
                "it: run scripts/setup.sh (or virtlogd -d)"
            )
        virt = "qemu" if self.accel == "tcg" else "kvm"
        argv = [*VIRSH, "domcapabilities", "--virttype", virt, "--arch", "x86_64"]
        for name in ("libvirt_probe_s", "libvirt_lookup_s"):
            t0 = time.monotonic()
            _run(argv, timeout=LIBVIRT_PROBE_TIMEOUT)
            self.times[name] = time.monotonic() - t0
        self.say(f"libvirt has QEMU's capabilities for {virt}: probe {self.times['libvirt_probe_s']:.1f} s, "
                 f"then {self.times['libvirt_lookup_s']:.2f} s from its cache")
        if self.times["libvirt_lookup_s"] > LIBVIRT_LOOKUP_MAX_S:
            try:
                group = Path("/dev/kvm").group()
            except (OSError, KeyError):  # no /dev/kvm, or a group with no name
                group = "?"
            raise LabError(
                f"libvirt probes QEMU again on every call ({self.times['libvirt_lookup_s']:.1f} s for a "
                f"cached look-up; /dev/kvm's group is {group}): run scripts/setup.sh, which gives "
                "/dev/kvm to the kvm group"
            )

    def up(self) -> None:
        assert self.box_dir is not None
        self.work.mkdir(parents=True, exist_ok=True)
        pool_dir = self.work / "pool"
        pool_dir.mkdir(exist_ok=True)
        _run([*VIRSH, "pool-define-as", self.pool, "dir", "--target", str(pool_dir)])
        _run([*VIRSH, "pool-start", self.pool])
        t0 = time.monotonic()
        self.vagrant(
            "box", "add", "--force", "--name", self.box_name, str(self.box_dir / f"{self.box_name}.box")
        )
        self.warm_libvirt()
        self.say(
            f"vagrant up ({self.prefix}router, {self.prefix}client; access {self.access}, "
            f"WAN {self.wan}, management {self.mgmt})"
        )
        self.vagrant("up", timeout=UP_TIMEOUT, trace=True)
        self.times["up_s"] = time.monotonic() - t0
        cfg = _run(["vagrant", "ssh-config"], env=self.env(), timeout=300).stdout
        (self.work / "ssh_config").write_text(cfg)
        self.say(f"both VMs up and provisioned in {self.times['up_s']:.0f} s")

    def wait_agent(self) -> dict[str, Any]:
        """The router's agent is attached once ``iqn-ctl status --json`` lists its NIC
        (bcc compiles the program first: tens of seconds under TCG)."""
        t0 = time.monotonic()
        deadline = t0 + AGENT_TIMEOUT
        while True:
            r = self.ssh("router", "iqn-ctl status --json", check=False)
            if r.returncode == 0 and r.stdout.strip():
                rows = [a for a in json.loads(r.stdout) if a.get("running")]
                if rows:
                    self.times["agent_s"] = time.monotonic() - t0
                    return rows[0]  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                j = self.ssh(
                    "router", "journalctl -u 'iqn-ctl@*' --no-pager | tail -n 20", check=False
                ).stdout
                raise LabError(
                    f"the router's agent did not attach in {AGENT_TIMEOUT} s: {r.stderr.strip()}\n{j}"
                )
            time.sleep(3)

    def ott_up(self) -> None:
        """The OTT emulator in a host namespace whose veth is a port of the WAN network's
        bridge: the router reaches it on its WAN NIC, the client only through the router."""
        bridge = re.search(r"Bridge:\s+(\S+)", _run([*VIRSH, "net-info", f"{self.prefix}wan"]).stdout)
        if bridge is None:
            raise LabError("the WAN network has no bridge")
        ns, outer, inner = self.ott_ns, f"{self.prefix}ob", f"{self.prefix}oi"
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns])
        _run(["ip", "link", "set", outer, "master", bridge.group(1), "up"])
        for host in (OTT_WWW_HOST, OTT_MEDIA_HOST):
            _run(["ip", "-n", ns, "addr", "add", f"{self.wan}.{host}/24", "dev", inner])
        _run(["ip", "-n", ns, "link", "set", inner, "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        s = self.work
        make_cert(s / "ott.crt", s / "ott.key", T.WWW_HOST, (T.WWW_HOST, T.MEDIA_HOST))
        ready = s / "ott.ready"
        procs.spawn(
            s,
            "ott",
            [
                sys.executable,
                "-m",
                "iqn_lab.ott.server",
                "--cert",
                str(s / "ott.crt"),
                "--key",
                str(s / "ott.key"),
                "--media-dir",
                str(ensure_media(MEDIA)),
                "--www-host",
                T.WWW_HOST,
                "--media-host",
                T.MEDIA_HOST,
                "--www-addr",
                f"{self.wan}.{OTT_WWW_HOST}",
                "--media-addr",
                f"{self.wan}.{OTT_MEDIA_HOST}",
                "--log",
                str(s / "ott-requests.jsonl"),
                "--ready",
                str(ready),
                "--www-cc",
                "fixed",  # the slow client's toggles arrive together: one answer per packet still
                "--www-streams",  # toggles never wait for the starved path back (iqn_lab.quic_cc)
                str(PAGE_STREAMS),
            ],
            ns=ns,
        )
        deadline = time.monotonic() + 60
        while not ready.exists():
            if time.monotonic() > deadline:
                raise LabError(f"the OTT emulator did not start: {(s / 'ott.log').read_text()[-500:]}")
            time.sleep(0.2)

    def client_route(self) -> str:
        """The client VM's route to the OTT: the tunnel's device, or the check fails."""
        return self.ssh("client", f"ip -o route get {self.wan}.{OTT_WWW_HOST}").stdout.strip()

    def signal(self) -> list[dict[str, Any]]:
        """Play in the client VM while the router starves it for a while; return the
        player's log events."""
        access = self.ssh("router", "cat /etc/iqn/access").stdout.strip()
        starve = subprocess.Popen(
            [
                "ssh",
                "-F",
                str(self.work / "ssh_config"),
                "-o",
                "BatchMode=yes",
                "router",
                "sudo sh -c "
                + _q(
                    f"sleep {STARVE_AT_S}; /etc/iqn/shape.sh {access} {STARVE_RATE}; "
                    f"sleep {STARVE_S}; /etc/iqn/shape.sh {access} none"
                ),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        t0 = time.monotonic()
        play = self.ssh(
            "client",
            (
                "rm -rf /tmp/iqn-play && /opt/iqn/venv/bin/python -m iqn_lab.player "
                f"--www {self.wan}.{OTT_WWW_HOST} --media {self.wan}.{OTT_MEDIA_HOST} "
                f"--duration {PLAY_S} --log-dir /tmp/iqn-play --www-cc fixed >/tmp/iqn-play.out 2>&1; "
                "cat /tmp/iqn-play/*.jsonl"
            ),
            timeout=PLAY_S + 600,
            check=False,
        )
        out, _ = starve.communicate(timeout=STARVE_AT_S + STARVE_S + 300)
        self.times["signal_s"] = time.monotonic() - t0
        if play.returncode != 0 or starve.returncode != 0:
            err = self.ssh("client", "cat /tmp/iqn-play.out", check=False).stdout[-1500:]
            raise LabError(
                f"the signal run failed: player {play.returncode}: {err}; shaping {starve.returncode}: {out}"
            )
        return [json.loads(line) for line in play.stdout.splitlines() if line.startswith("{")]

    def stalls(self) -> list[dict[str, Any]]:
        """``iqn-ctl stalls --json`` on the router (its history: ended stalls)."""
        raw = self.ssh("router", "iqn-ctl stalls --json").stdout
        return [json.loads(line) for line in raw.splitlines() if line.strip()]

    def agent_end(self) -> dict[str, Any]:
        """After the run: the router agent's counters (``iqn-ctl status --json``: stalls
        started, ended and discarded as bulk, history writes waiting or dropped) and its
        log's stall lines, so a stall missing from the history says where it went."""
        r = self.ssh("router", "iqn-ctl status --json", check=False)
        rows = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []
        keys = ("stalls_started", "stalls_ended", "stalls_discarded", "history_pending", "history_dropped",
                "history_failures", "candidates", "events", "lost", "unpaired", "capped")
        out: dict[str, Any] = {k: rows[0].get(k) for k in keys} if rows else {"status": r.stderr.strip()}
        log = self.ssh("router", "journalctl -u 'iqn-ctl@*' --no-pager | grep ' stall ' | tail -n 20",
                       check=False).stdout
        out["log"] = [ln for ln in log.splitlines() if ln.strip()]
        return out

    def flows(self) -> str:
        """``vagrant ssh router -c 'iqn-ctl flows'``, as a user would type it."""
        with (self.work / "vagrant.log").open("a") as f:
            f.write("\n$ vagrant ssh router -c 'sudo iqn-ctl flows'\n")
        r = _run(["vagrant", "ssh", "router", "-c", "sudo iqn-ctl flows"], env=self.env(), timeout=300)
        return r.stdout

    def destroy(self) -> Leftovers:
        """``vagrant destroy -f``, then the box volume and the pool, the OTT namespace;
        return what is left of this run in libvirt (nothing, when all went well)."""
        t0 = time.monotonic()
        if (self.work / "dot").exists():
            try:
                self.vagrant("destroy", "-f", timeout=600)
            except (LabError, subprocess.TimeoutExpired) as e:
                self.say(f"vagrant destroy: {e}")
        self.times["destroy_s"] = time.monotonic() - t0
        pid = procs.pid_of(self.work, "ott")
        if pid is not None:
            procs.stop([pid])
        _run(["ip", "netns", "del", self.ott_ns], check=False)
        _run(["ip", "link", "del", f"{self.prefix}ob"], check=False)
        left = self.vagrant_left = self.leftovers()
        # what Vagrant left after a failed `up` (a CI run kept its WAN network): the names
        # carry this run's random prefix, so they are ours
        for dom in left.domains:
            _run([*VIRSH, "destroy", dom], check=False)
            _run([*VIRSH, "undefine", dom, "--nvram"], check=False)
        for net in left.networks:
            _run([*VIRSH, "net-destroy", net], check=False)
            _run([*VIRSH, "net-undefine", net], check=False)
        # the box's image, uploaded by vagrant-libvirt, is the pool's; Vagrant never removes it
        if self.pool in left.pools:
            for vol in _run([*VIRSH, "vol-list", self.pool], check=False).stdout.split("\n"):
                if vol.split():
                    _run([*VIRSH, "vol-delete", vol.split()[0], "--pool", self.pool], check=False)
            _run([*VIRSH, "pool-destroy", self.pool], check=False)
            _run([*VIRSH, "pool-undefine", self.pool], check=False)
        return self.leftovers()

    def leftovers(self) -> Leftovers:
        def named(kind: str) -> list[str]:
            out = _run([*VIRSH, kind, "--all", "--name"], check=False).stdout.split()
            return [n for n in out if n.startswith(self.prefix)]

        pools = named("pool-list")
        volumes: list[str] = []
        for pool in _run([*VIRSH, "pool-list", "--all", "--name"], check=False).stdout.split():
            for line in _run([*VIRSH, "vol-list", pool], check=False).stdout.splitlines():
                parts = line.split()
                if parts and (parts[0].startswith(self.prefix) or pool in pools):
                    volumes.append(f"{pool}/{parts[0]}")
        return Leftovers(named("list"), named("net-list"), pools, volumes)


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _shown(text: str) -> list[str]:
    """A log's lines without blanks, Vagrant's progress bars (carriage-return redrawn
    lines) and Ruby backtrace frames (a CI failure's 60-line tail was all frames: the
    message above them never showed)."""
    return [
        ln for ln in text.replace("\r", "\n").splitlines()
        if _BARE.sub("", ln).strip() and "Progress:" not in ln
        and not _FRAME.match(ln) and not _LOGLINE.match(ln)
    ]


def tail(path: Path, lines: int = 40) -> str:
    """The end of a log, without Vagrant's progress bars and Ruby's backtrace frames."""
    return "\n".join(_shown(path.read_text(errors="replace"))[-lines:])


#: the time :func:`_stamped` puts before each line of a command's output
_STAMP = r"(\d\d:\d\d:\d\d\.\d{3} )?"
#: a Ruby backtrace line with no message of its own ("/usr/.../x.rb:12:in `call'")
_FRAME = re.compile(_STAMP + r"\s*(from )?/\S+\.rb:\d+:in [`'][^`']*'$")
_BARE = re.compile("^" + _STAMP)
#: a line of Vagrant's own log (VAGRANT_LOG=info: " INFO machine: ..."), kept in the file only
_LOGLINE = re.compile(_STAMP + r"\s*(INFO|WARN|DEBUG) \S+:")


def vagrant_error(path: Path, lines: int = 25) -> str:
    """What the last ``vagrant`` command in the log said, without the Ruby backtrace
    frames that bury it (a CI failure showed 25 frames and no message): Vagrant's own
    output and the exception line (``x.rb:12:in `m': message (Class)``)."""
    last = path.read_text(errors="replace").replace("\r", "\n").rsplit("\n$ vagrant ", 1)[-1]
    return "\n".join(_shown(last.split("\n", 1)[1] if "\n" in last else "")[-lines:])


def player_stalls(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "stall"]


def match(
    real: list[dict[str, Any]], inferred: list[dict[str, Any]], slack: float = 5.0, join: float = PIECE_GAP_S
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Pair each real stall (player's log) with the inferred stall (agent's) that overlaps it
    most, and with that stall's neighbours less than ``join`` seconds apart: one stall the
    agent reported in pieces (the signal paused, so the end condition held, and resumed).
    The VMs' clocks may differ by a little, so intervals are widened by ``slack`` to pick
    the overlapping stall. An empty list: the stall was not reported."""
    pairs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    ordered = sorted(inferred, key=lambda s: s["start"])
    for r in real:
        best, best_ov = None, 0.0
        for i, s in enumerate(ordered):
            ov = min(r["end"] + slack, s["end"]) - max(r["start"] - slack, s["start"])
            if ov > best_ov:
                best, best_ov = i, ov
        if best is None:
            pairs.append((r, []))
            continue
        lo = hi = best
        while lo > 0 and ordered[lo]["start"] - ordered[lo - 1]["end"] < join:
            lo -= 1
        while hi + 1 < len(ordered) and ordered[hi + 1]["start"] - ordered[hi]["end"] < join:
            hi += 1
        pairs.append((r, ordered[lo : hi + 1]))
    return pairs


def check(work: Path, keep: bool = False) -> dict[str, Any]:
    """The whole check; returns its report (times, the stalls, the pairs); raises
    :class:`LabError` on any failure, after destroying what it made (unless ``keep``)."""
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # QEMU runs as libvirt-qemu: it must reach the pool and the box's kernel
    pair = VmPair(work)
    report: dict[str, Any] = {"prefix": pair.prefix, "work": str(work)}
    try:
        pair.build_box()
        report["accel"] = pair.accel
        pair.up()
        t0 = time.monotonic()
        report["agent"] = pair.wait_agent()
        pair.say(f"agent attached: {report['agent']}")
        report["client_route"] = pair.client_route()
        # each VM made its own SSH host key at first boot (scripts/make-box.sh): none is baked
        # into the box, where every VM of it would share it
        report["host_keys"] = {
            vm: pair.ssh(vm, "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[1]
            for vm in ("router", "client")
        }
        report["wan_iface"] = pair.ssh("router", "cat /etc/iqn/wan").stdout.strip()
        report["router_wan_ip"] = f"{pair.wan}.{ROUTER_HOST}"
        report["client_tun_ip"] = pair.ssh(
            "client", "ip -o -4 addr show dev tun0 | awk '{print $4}' | cut -d/ -f1"
        ).stdout.strip()
        pair.ott_up()
        events = pair.signal()
        report["flows"] = pair.flows()  # while the flow is fresh
        stalls = pair.stalls()  # by now (a Ruby start later) the last stall has ended
        report["agent_end"] = pair.agent_end()
        pair.times["check_s"] = time.monotonic() - t0
        real = [s for s in player_stalls(events) if s["end"] - s["start"] >= MIN_STALL_S]
        report["player_stalls"] = player_stalls(events)
        report["agent_stalls"] = stalls
        report["pairs"] = []
        for r, pieces in match(real, stalls):
            got = pieces[-1]["end"] - pieces[0]["start"] if pieces else None
            report["pairs"].append({
                "real_s": r["end"] - r["start"],
                "inferred_s": got,
                "error_s": got - (r["end"] - r["start"]) if got is not None else None,
                "pieces": len(pieces),
            })
        report["ott_peers"], report["autoplay_posts"] = _ott_requests(work / "ott-requests.jsonl")
    finally:
        if keep:
            pair.say(f"kept: VAGRANT_CWD={VAGRANT_DIR} VAGRANT_DOTFILE_PATH={work / 'dot'} ...")
        else:
            left = pair.destroy()
            report["leftovers"] = left.__dict__
            # Vagrant's own part: all but the box's pool (never Vagrant's to remove)
            report["vagrant_left"] = {"domains": pair.vagrant_left.domains,
                                      "networks": pair.vagrant_left.networks}
            pair.say(f"destroyed; left in libvirt: {left.__dict__}")
        report["times"] = {k: round(v, 1) for k, v in pair.times.items()}
        (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _ott_requests(log: Path) -> tuple[list[str], int]:
    """The peer addresses the OTT emulator saw (the router's WAN address only, when the
    client is NATed behind the tunnel) and how many autoplay POSTs it answered."""
    peers: set[str] = set()
    posts = 0
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec.get("peer"), str):
            peers.add(rec["peer"].rsplit(":", 1)[0])
        posts += (
            rec.get("method") == "POST" and "autoplay" in str(rec.get("path")) and rec.get("status") == 200
        )
    return sorted(peers), posts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m iqn_lab.vmpair", description=__doc__.split("\n")[0])
    ap.add_argument("--work", help="directory for the run's state and logs (default: a new temporary one)")
    ap.add_argument(
        "--keep", action="store_true", help="leave the VMs up (destroy them with vagrant destroy -f)"
    )
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.exit(2, "iqn-vmpair: error: run as root (libvirt, namespaces, debootstrap)\n")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="iqn-vmpair-", dir="/var/tmp"))
    try:
        report = check(work, keep=a.keep)
    except LabError as e:
        ap.exit(1, f"iqn-vmpair: error: {e}\n(logs in {work})\n")
    print(json.dumps(report, indent=2, default=str))
    for big in ("pool", "vhome"):  # the box's copies (~1 GB each); the logs and report stay
        shutil.rmtree(work / big, ignore_errors=True)


if __name__ == "__main__":
    main()
