"""The mitigation lab: viewers and bulk downloads behind one bottleneck, with the ISP agent
on the router, run the same way without and with ``--mitigate``.

::

    P-srv (www .2, media .3, bulk .4)  198.19.X.0/24
       │ P-s ── P-u   <- the agent (XDP ingress: server-to-client; pairing at egress)
     P-rtr
       │ P-d ── P-c   <- the bottleneck: HTB at --link at P-d's egress (toward the clients)
    P-cli (viewers .10.., bulk downloads .100..)  198.18.X.0/24

Without mitigation the lab shapes P-d itself (an HTB with one class at the link
rate, the same leaf queue); with it, the agent does (its own HTB at the same
rate, plus the boost classes): the link, the queue and everything upstream are
the same in both runs. Names carry the prefix P; X is drawn per lab so that
concurrent labs do not collide. ``down`` removes everything, also after a crash.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from iqn_lab import netns, procs
from iqn_lab.certs import make_cert
from iqn_lab.errors import LabError
from iqn_lab.localise.lab import CLIP, preflight
from iqn_lab.ott.daemons import all_ready, spawn_service
from iqn_lab.ott.media import ensure_media
from iqn_lab.topology import MEDIA_HOST, WWW_HOST

STATE_ROOT = Path(os.environ.get("IQN_LAB_STATE", "/run/iqn-lab"))
BULK_PORT = 5001
ROLES = ("srv", "rtr", "cli")
AGENT_TIMEOUT = 120.0
#: packets the bottleneck's queue holds (the leaf's pfifo, from the device's txqueuelen)
QUEUE = 500


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


def _size(text: str) -> int:
    """tc's queue size: ``0``, ``1514``, ``30280K`` (bytes)."""
    mult = {"K": 1000, "M": 1000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KM") or 0) * mult)


class MitigationLab:
    @staticmethod
    def valid(prefix: str) -> bool:
        """Short enough for interface names (``P-u``, ``P-srv``), plain letters and digits."""
        return prefix.isascii() and prefix.isalnum() and prefix == prefix.lower() and 1 <= len(prefix) <= 10

    def __init__(self, prefix: str = "iqnmit", state_root: Path | None = None) -> None:
        if not self.valid(prefix):
            raise LabError(f"--prefix must be 1-10 lower-case letters or digits, got {prefix!r}")
        self.prefix = prefix
        self.state = (state_root or STATE_ROOT) / f"{prefix}-mitigation"
        x = random.SystemRandom().randrange(20, 250)
        self.srv_net, self.cli_net = f"198.19.{x}", f"198.18.{x}"
        self.www, self.media, self.bulk = f"{self.srv_net}.2", f"{self.srv_net}.3", f"{self.srv_net}.4"
        self.up_if, self.down_if = f"{prefix}-u", f"{prefix}-d"

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def viewer(self, i: int) -> str:
        return f"{self.cli_net}.{10 + i}"

    def downloader(self, i: int) -> str:
        return f"{self.cli_net}.{100 + i}"

    # -- up and down ---------------------------------------------------------------------------
    def up(self, viewers: int, downloaders: int) -> None:
        preflight()
        self.down()
        try:
            self._build(viewers, downloaders)
        except BaseException:
            self.down()
            raise

    def _build(self, viewers: int, downloaders: int) -> None:
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        media_dir = ensure_media(CLIP)
        make_cert(self.state / "ott.crt", self.state / "ott.key", WWW_HOST, (WWW_HOST, MEDIA_HOST))
        for r in ROLES:
            _run("ip", "netns", "add", self.ns(r))
            _run("ip", "-n", self.ns(r), "link", "set", "lo", "up")
        p = self.prefix
        _run("ip", "link", "add", f"{p}-s", "netns", self.ns("srv"), "type", "veth", "peer", "name",
             self.up_if, "netns", self.ns("rtr"))
        _run("ip", "link", "add", self.down_if, "netns", self.ns("rtr"), "type", "veth", "peer", "name",
             f"{p}-c", "netns", self.ns("cli"))
        for ns, dev in (("srv", f"{p}-s"), ("rtr", self.up_if), ("rtr", self.down_if), ("cli", f"{p}-c")):
            _run("ip", "-n", self.ns(ns), "link", "set", dev, "up")
        _run("ip", "-n", self.ns("rtr"), "link", "set", self.down_if, "txqueuelen", str(QUEUE))
        for a in (self.www, self.media, self.bulk):
            _run("ip", "-n", self.ns("srv"), "addr", "add", f"{a}/24", "dev", f"{p}-s")
        _run("ip", "-n", self.ns("rtr"), "addr", "add", f"{self.srv_net}.1/24", "dev", self.up_if)
        _run("ip", "-n", self.ns("rtr"), "addr", "add", f"{self.cli_net}.1/24", "dev", self.down_if)
        for i in range(viewers):
            _run("ip", "-n", self.ns("cli"), "addr", "add", f"{self.viewer(i)}/24", "dev", f"{p}-c")
        for i in range(downloaders):
            _run("ip", "-n", self.ns("cli"), "addr", "add", f"{self.downloader(i)}/24", "dev", f"{p}-c")
        _run("ip", "-n", self.ns("srv"), "route", "add", "default", "via", f"{self.srv_net}.1")
        _run("ip", "-n", self.ns("cli"), "route", "add", "default", "via", f"{self.cli_net}.1")
        with netns.entered(self.ns("rtr")), open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
        daemons = spawn_service(self.state, "ott", self.ns("srv"), media_dir, self.www, self.media)
        procs.spawn(self.state, "bulk-server", [sys.executable, "-m", "iqn_lab.mitigation.bulk", "serve",
                                                "--addr", self.bulk, "--port", str(BULK_PORT)],
                    ns=self.ns("srv"))
        procs.wait_ready(self.state, lambda: all_ready(self.state, daemons), "OTT servers", daemons, 30.0)

    def down(self) -> list[str]:
        removed = procs.remove_namespaces([self.ns(r) for r in ROLES])
        if self.state.exists():
            shutil.rmtree(self.state, ignore_errors=True)
            removed.append(f"state {self.state}")
        return removed

    # -- the bottleneck, the agent ------------------------------------------------------------
    def shape(self, link_bps: int) -> None:
        """The lab's own bottleneck (the run without mitigation): HTB at the link rate, one class."""
        tc = ["ip", "netns", "exec", self.ns("rtr"), "tc"]
        _run(*tc, "qdisc", "add", "dev", self.down_if, "root", "handle", "1:", "htb", "default", "20")
        _run(*tc, "class", "add", "dev", self.down_if, "parent", "1:", "classid", "1:1", "htb",
             "rate", f"{link_bps}bit", "ceil", f"{link_bps}bit", "quantum", "1514")
        _run(*tc, "class", "add", "dev", self.down_if, "parent", "1:1", "classid", "1:20", "htb",
             "rate", f"{link_bps}bit", "ceil", f"{link_bps}bit", "quantum", "1514")

    def unshape(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns("rtr"), "tc", "qdisc", "del", "dev", self.down_if,
                        "root"], capture_output=True, check=False)

    def class_bytes(self) -> dict[str, list[int]]:
        """[bytes sent, bytes queued] per HTB class on the bottleneck (tc prints no JSON for
        HTB classes: its text, one block per class)."""
        out = subprocess.run(["ip", "netns", "exec", self.ns("rtr"), "tc", "-s", "class", "show", "dev",
                              self.down_if], capture_output=True, text=True).stdout
        found = {}
        for block in out.split("class htb ")[1:]:
            words = block.split()
            if "Sent" in words and "backlog" in words:
                queued = words[words.index("backlog") + 1].rstrip("b")
                found[words[0]] = [int(words[words.index("Sent") + 1]), _size(queued)]
        return found

    def start_agent(self, name: str, extra: list[str]) -> dict[str, Any]:
        run_dir, state_dir = self.state / f"run-{name}", self.state / f"agent-{name}"
        argv = [sys.executable, "-m", "iqn_ctl", "attach", self.up_if, "--state-dir", str(state_dir),
                "--run-dir", str(run_dir), *extra]
        pid = procs.spawn(self.state, f"agent-{name}", argv, ns=self.ns("rtr"))
        from iqn_ctl.live.api import ApiError, request, sock_path

        deadline = time.monotonic() + AGENT_TIMEOUT
        while True:
            try:
                request(sock_path(run_dir, self.up_if), "status")
                break
            except ApiError:
                if not procs.alive(pid) or time.monotonic() > deadline:
                    log = (self.state / f"agent-{name}.log").read_text(errors="replace")[-500:]
                    raise LabError(f"the agent did not come up: {log}") from None
                time.sleep(0.2)
        return {"pid": pid, "run_dir": run_dir, "state_dir": state_dir}

    def agent_status(self, agent: dict[str, Any]) -> dict[str, Any]:
        from iqn_ctl.live.api import request, sock_path

        return dict(request(sock_path(agent["run_dir"], self.up_if), "status"))

    def stop_agent(self, agent: dict[str, Any]) -> None:
        procs.stop([agent["pid"]], grace=20.0)

    # -- the traffic ----------------------------------------------------------------------------
    def start_players(self, viewers: int, duration: float, log_dir: Path, seed: int) -> int:
        specs = [{"name": f"viewer-{i:02d}", "www": self.www, "media": self.media, "source": self.viewer(i),
                  "www_host": WWW_HOST, "media_host": MEDIA_HOST} for i in range(viewers)]
        spec_file = self.state / "players.json"
        spec_file.write_text(json.dumps(specs))
        log_dir.mkdir(parents=True, exist_ok=True)
        return procs.spawn(self.state, f"players-{log_dir.name}", [
            sys.executable, "-m", "iqn_lab.player", "--spec", str(spec_file), "--duration", str(duration),
            "--log-dir", str(log_dir), "--cafile", str(self.state / "ott.crt"), "--stagger", "2",
            "--seed", str(seed)], ns=self.ns("cli"))  # fmt: skip

    def start_bulk(self, plan: list[dict[str, Any]], start: float, out: Path) -> int:
        plan_file = self.state / f"bulk-{out.stem}.json"
        plan_file.write_text(json.dumps(plan))
        return procs.spawn(self.state, f"bulk-{out.stem}", [
            sys.executable, "-m", "iqn_lab.mitigation.bulk", "fetch", "--server", self.bulk,
            "--port", str(BULK_PORT), "--plan", str(plan_file), "--start", str(start), "--out", str(out)],
            ns=self.ns("cli"))
