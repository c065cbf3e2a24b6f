"""One lab instance: build it, inspect it, change its bottleneck, tear it down.

This is the API the demo and the tests use::

    lab = Lab("iqnlab")
    lab.up(rate="1mbit")                  # or schedule="0:none,20:300kbit,40:none"
    lab.exec("client", ["ping", "-c1", OTT_WWW])
    lab.set_rate("300kbit")
    lab.down()
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import netns, procs
from . import topology as T
from .certs import fingerprint, make_cert, spki_hash
from .chrome import chrome_args
from .errors import LabError
from .ott.media import MediaSpec, ensure_media
from .shaping import Step, apply_rate, current_rate, format_rate, parse_rate, parse_schedule
from .templates import render
from .topology import Names

STATE_ROOT = Path(os.environ.get("IQN_LAB_STATE", "/run/iqn-lab"))
DAEMONS = ("openvpn-server", "openvpn-client", "ott")
READY_TIMEOUT = 25.0


@dataclass(frozen=True)
class Health:
    namespaces: dict[str, bool]
    daemons: dict[str, int | None]
    tunnel: bool

    @property
    def up(self) -> bool:
        return all(self.namespaces.values()) and all(self.daemons.values()) and self.tunnel

    @property
    def absent(self) -> bool:
        return not any(self.namespaces.values())


def _rate_bits(rate: str | int | None) -> int | None:
    if rate is None or isinstance(rate, int):
        return rate
    return parse_rate(rate)


class Lab:
    """A client - OpenVPN - router - OTT lab in three network namespaces."""

    def __init__(self, prefix: str = "iqnlab", state_root: Path | None = None) -> None:
        self.names = Names(prefix)
        self.prefix = prefix
        self.state = (state_root or STATE_ROOT) / prefix

    # -- names the demo needs -------------------------------------------------
    def ns(self, role: str) -> str:
        return self.names.ns(role)

    @property
    def client_ns(self) -> str:
        return self.ns("client")

    @property
    def router_ns(self) -> str:
        return self.ns("router")

    @property
    def ott_ns(self) -> str:
        return self.ns("ott")

    @property
    def router_ott_iface(self) -> str:
        """Attach the ISP agent here (``iqn-ctl attach`` inside the router namespace)."""
        return self.names.router_ott_if

    @property
    def player_url(self) -> str:
        return f"https://{T.WWW_HOST}/"

    @property
    def request_log(self) -> Path:
        return self.state / "requests.jsonl"

    @property
    def ott_cert(self) -> Path:
        return self.state / "ott.crt"

    def chrome_args(self, headless: bool = True) -> list[str]:
        """Chromium flags for the client namespace: h3 to the emulator, no DNS."""
        return chrome_args(spki_hash(self.ott_cert), headless=headless)

    # -- running things inside --------------------------------------------------
    def argv(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role), *argv]

    def exec(self, role: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside the ``role`` namespace (subprocess.run keywords pass through)."""
        self._need_ns(role)
        return subprocess.run(self.argv(role, argv), **kwargs)

    def popen(self, role: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        self._need_ns(role)
        return subprocess.Popen(self.argv(role, argv), **kwargs)

    def need_ns(self, role: str) -> None:
        """Fail with one line unless the lab's ``role`` namespace exists (the lab is up)."""
        self._need_ns(role)

    def _need_ns(self, role: str) -> None:
        if not netns.exists(self.ns(role)):
            raise LabError(f"lab {self.prefix!r} is not up (no namespace {self.ns(role)}): run iqn-lab up")

    # -- bottleneck ------------------------------------------------------------
    def set_rate(self, rate: str | int | None) -> None:
        """Bottleneck (bit/s, ``"300kbit"`` or None/"none") on the server-to-client path."""
        self._need_ns("router")
        apply_rate(self.router_ns, self.names.router_client_if, _rate_bits(rate))

    def rate(self) -> int | None:
        return current_rate(self.router_ns, self.names.router_client_if)

    def run_schedule(self, steps: list[Step] | str, repeat: float = 0.0) -> None:
        """Replace any running schedule by ``steps`` (started now, in the background);
        with ``repeat`` > 0 it starts over every ``repeat`` seconds."""
        if isinstance(steps, str):
            steps = parse_schedule(steps)
        if repeat and repeat <= steps[-1].at:
            raise LabError(f"--repeat {repeat:g} must be longer than the last step's time {steps[-1].at:g}")
        self.stop_schedule()
        spec = ",".join(f"{s.at}:{format_rate(s.rate)}" for s in steps)
        argv = [sys.executable, "-m", "iqn_lab.schedule", self.router_ns, self.names.router_client_if, spec]
        procs.spawn(self.state, "schedule", argv + (["--repeat", str(repeat)] if repeat else []))

    def stop_schedule(self) -> None:
        """Stop this lab's schedule runner, found by pid file or, after a crash, by its argv."""
        pids = set(procs.find("iqn_lab.schedule", self.router_ns))
        pid = procs.pid_of(self.state, "schedule")
        if pid is not None and "iqn_lab.schedule" in procs.cmdline(pid):
            pids.add(pid)
        procs.stop(sorted(pids))
        (self.state / "schedule.pid").unlink(missing_ok=True)

    # -- lifecycle -----------------------------------------------------------------
    def health(self) -> Health:
        nss = {r: netns.exists(self.ns(r)) for r in T.ROLES}
        daemons = {d: procs.pid_of(self.state, d) for d in DAEMONS}
        return Health(nss, daemons, self._tunnel_up() if nss["client"] else False)

    def _tunnel_up(self) -> bool:
        from pyroute2 import IPRoute

        with IPRoute(netns=self.client_ns) as ipr:
            idx = ipr.link_lookup(ifname=self.names.client_tun)
            if not idx:
                return False
            return any(r.get_attr("RTA_OIF") == idx[0] for r in ipr.get_routes(family=2, dst=T.OTT_WWW))

    def up(
        self,
        rate: str | int | None = None,
        schedule: str | list[Step] | None = None,
        repeat: float = 0.0,
        media: MediaSpec = MediaSpec(),
    ) -> None:
        """Build the lab; if it is already fully up only the bottleneck changes."""
        _preflight()
        bits = _rate_bits(rate)
        steps = parse_schedule(schedule) if isinstance(schedule, str) else schedule
        if steps and repeat and repeat <= steps[-1].at:
            raise LabError(f"--repeat {repeat:g} must be longer than the last step's time {steps[-1].at:g}")
        if not self.health().up:
            self.down()
            try:
                self._build(media)
            except BaseException:
                self.down()
                raise
        self.stop_schedule()
        self.set_rate(bits)
        if steps:
            self.run_schedule(steps, repeat)
        self._write_info(bits, steps)

    def make_state_dir(self) -> None:
        """The lab's state dir, 0700: it holds the lab's private keys, configs and logs."""
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state.chmod(0o700)  # also one left by an older lab, or made under another umask

    def _build(self, media: MediaSpec) -> None:
        self.make_state_dir()
        media_dir = ensure_media(media)
        s = self.state
        make_cert(s / "server.crt", s / "server.key", "iqn-lab-router")
        make_cert(s / "client.crt", s / "client.key", "iqn-lab-client")
        make_cert(s / "ott.crt", s / "ott.key", T.WWW_HOST, (T.WWW_HOST, T.MEDIA_HOST))
        self._network()
        n = self.names
        (s / "server.conf").write_text(
            render(
                "openvpn-server.conf", TUN_NET=T.TUN_NET, TUN_DEV=n.router_tun, PORT=T.OPENVPN_PORT,
                CERT=s / "server.crt", KEY=s / "server.key", CLIENT_FP=fingerprint(s / "client.crt"),
            )
        )  # fmt: skip
        (s / "client.conf").write_text(
            render(
                "openvpn-client.conf", TUN_DEV=n.client_tun, SERVER_ADDR=T.UNDERLAY_ROUTER,
                PORT=T.OPENVPN_PORT, CERT=s / "client.crt", KEY=s / "client.key",
                SERVER_FP=fingerprint(s / "server.crt"),
            )
        )  # fmt: skip
        (s / "nat.nft").write_text(
            render("nat.nft", TUN_DEV=n.router_tun, WAN_IF=n.router_ott_if, TUN_NET=T.TUN_NET)
        )
        nft = self.exec("router", ["nft", "-f", str(s / "nat.nft")], capture_output=True, text=True)
        if nft.returncode != 0:
            raise LabError(f"nft rejected the NAT rules: {nft.stderr.strip()}")
        ready = s / "ott.ready"
        ready.unlink(missing_ok=True)
        procs.spawn(s, "ott", [
            sys.executable, "-m", "iqn_lab.ott.server",
            "--cert", str(s / "ott.crt"), "--key", str(s / "ott.key"),
            "--media-dir", str(media_dir), "--www-host", T.WWW_HOST, "--media-host", T.MEDIA_HOST,
            "--www-addr", T.OTT_WWW, "--media-addr", T.OTT_MEDIA, "--log", str(self.request_log),
            "--ready", str(ready),
        ], ns=self.ott_ns)  # fmt: skip
        procs.spawn(s, "openvpn-server", ["openvpn", "--config", str(s / "server.conf")], ns=self.router_ns)
        procs.spawn(s, "openvpn-client", ["openvpn", "--config", str(s / "client.conf")], ns=self.client_ns)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            h = self.health()
            if h.up and ready.exists():
                return
            dead = [d for d, pid in h.daemons.items() if pid is None]
            if dead:
                raise LabError(f"{dead[0]} exited during up: {procs.last_line(s / (dead[0] + '.log'))}")
            time.sleep(0.1)
        raise LabError(f"lab not ready after {READY_TIMEOUT:.0f} s: "
                       f"{procs.last_line(s / 'openvpn-client.log')}")

    def _network(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2 import netns as pnetns

        n = self.names
        for role in T.ROLES:
            pnetns.create(self.ns(role))
        with IPRoute() as ipr:
            for a, b, ns_a, ns_b in (
                (n.client_if, n.router_client_if, self.client_ns, self.router_ns),
                (n.router_ott_if, n.ott_if, self.router_ns, self.ott_ns),
            ):
                ipr.link("add", ifname=a, kind="veth", peer=b)
                ipr.link("set", index=ipr.link_lookup(ifname=a)[0], net_ns_fd=ns_a)
                ipr.link("set", index=ipr.link_lookup(ifname=b)[0], net_ns_fd=ns_b)
        for role in T.ROLES:
            _sysctls(self.ns(role), forward=role == "router")
        plan: dict[str, list[tuple[str, str, int]]] = {
            "client": [(n.client_if, T.UNDERLAY_CLIENT, T.UNDERLAY_PLEN)],
            "router": [
                (n.router_client_if, T.UNDERLAY_ROUTER, T.UNDERLAY_PLEN),
                (n.router_ott_if, T.OTT_NET_ROUTER, T.OTT_PLEN),
            ],
            "ott": [(n.ott_if, T.OTT_WWW, T.OTT_PLEN), (n.ott_if, T.OTT_MEDIA, T.OTT_PLEN)],
        }
        for role, addrs in plan.items():
            with IPRoute(netns=self.ns(role)) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                for ifname, addr, plen in addrs:
                    idx = ipr.link_lookup(ifname=ifname)[0]
                    ipr.addr("replace", index=idx, address=addr, prefixlen=plen)
                    ipr.link("set", index=idx, state="up")
                if role == "client":  # the home gateway; OpenVPN overrides it with def1 routes
                    ipr.route("replace", dst="0.0.0.0/0", gateway=T.UNDERLAY_ROUTER)
                if role == "ott":  # answers go back to the router (NAT hides the client)
                    ipr.route("replace", dst="0.0.0.0/0", gateway=T.OTT_NET_ROUTER)

    def down(self) -> list[str]:
        """Remove everything this lab made, also after a crash; returns what it removed."""
        from pyroute2 import IPRoute
        from pyroute2 import netns as pnetns

        removed: list[str] = []
        self.stop_schedule()
        for role in T.ROLES:
            ns = self.ns(role)
            if netns.exists(ns):
                procs.stop_namespace(ns)
                pnetns.remove(ns)
                removed.append(f"namespace {ns}")
        with IPRoute() as ipr:  # veths left in the root namespace by a crash mid-up
            for ifname in self.names.all_ifnames():
                for idx in ipr.link_lookup(ifname=ifname):
                    ipr.link("del", index=idx)
                    removed.append(f"interface {ifname}")
        if self.state.exists():
            shutil.rmtree(self.state, ignore_errors=True)
            removed.append(f"state {self.state}")
        return removed

    # -- status ------------------------------------------------------------------
    def _write_info(self, bits: int | None, steps: list[Step] | None) -> None:
        info = {
            "prefix": self.prefix,
            "started": time.time(),
            "rate": format_rate(bits),
            "schedule": [[s.at, format_rate(s.rate)] for s in steps] if steps else None,
        }
        (self.state / "lab.json").write_text(json.dumps(info))

    def status(self) -> dict[str, Any]:
        h = self.health()
        out: dict[str, Any] = {
            "prefix": self.prefix,
            "up": h.up,
            "namespaces": {r: self.ns(r) for r in T.ROLES if h.namespaces[r]},
            "daemons": h.daemons,
            "tunnel": h.tunnel,
        }
        if h.absent:
            return out
        try:
            info = json.loads((self.state / "lab.json").read_text())
        except (OSError, ValueError):
            info = {}
        out.update(
            rate=format_rate(self.rate()) if h.namespaces["router"] else None,
            schedule=info.get("schedule"),
            schedule_running=procs.pid_of(self.state, "schedule") is not None,
            router_ott_iface=self.router_ott_iface,
            router_client_iface=self.names.router_client_if,
            player_url=self.player_url,
            addresses={"www": T.OTT_WWW, "media": T.OTT_MEDIA, "client_tunnel": "198.18.8.2"},
            request_log=str(self.request_log),
            state_dir=str(self.state),
        )
        if self.ott_cert.exists():
            out["chrome_args"] = self.chrome_args()
        return out


def _sysctls(ns: str, forward: bool) -> None:
    """Forwarding on the router; no IPv6 anywhere (keeps captures to the lab's own traffic)."""
    values = {
        "net/ipv4/ip_forward": "1" if forward else "0",
        "net/ipv6/conf/all/disable_ipv6": "1",
        "net/ipv6/conf/default/disable_ipv6": "1",
    }
    with netns.entered(ns):
        for key, value in values.items():
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)


def _preflight() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (namespaces, OpenVPN, nftables): run with sudo")
    for tool, pkg in (("openvpn", "openvpn"), ("nft", "nftables"), ("ip", "iproute2"), ("ffmpeg", "ffmpeg")):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found: run sudo bash scripts/setup.sh (installs Debian's {pkg})")
    if not os.path.exists("/dev/net/tun"):
        raise LabError("/dev/net/tun is missing: OpenVPN needs the tun driver (modprobe tun)")
