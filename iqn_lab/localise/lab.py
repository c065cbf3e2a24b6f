"""One localisation lab: build it, start its players, inject a fault, tear it all down.

``iqn-lab up --topology localise`` and ``iqn-lab demo --localise`` use this::

    lab = LocaliseLab("loc1")
    lab.up(slot=30.0)                 # namespaces, OTT servers, JetStream, agents (XDP), QoS service
    lab.inject("access", "3mbit")     # htb bottleneck on sub-a's access link
    lab.start_players(per_subnet=10, duration=120, log_dir=out / "players")
    lab.down()                        # also after a crash: everything carries the prefix

Everything runs as lab daemons (pid files in the state dir, logs beside them) so
``down`` finds them again from another process; it stops every process in the
lab's namespaces, removes the namespaces and any veth a crash left in the root
namespace, and the state dir.
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

from iqn_lab import netns, procs
from iqn_lab.certs import make_cert
from iqn_lab.errors import LabError
from iqn_lab.ott.daemons import all_ready, spawn_service
from iqn_lab.ott.media import MediaSpec, ensure_media

from .plan import MEDIA_HOST, OPS_ADDR, OPS_CORE, WWW_HOST, Plan

STATE_ROOT = Path(os.environ.get("IQN_LAB_STATE", "/run/iqn-lab"))
#: the clip of the localisation lab: small, so dozens of players and two emulators fit on two cores
CLIP = MediaSpec(seconds=60, kbit=500, width=426, height=240, fps=25)
#: bcc compiles the XDP program at attach: seconds on a busy box
AGENT_TIMEOUT = 120.0
READY_TIMEOUT = 30.0
UNLIMITED = 10_000_000_000  # bit/s: no limit on a veth
#: the service closes a slot this long after its end: the agents write a slot's records 2 s
#: after it, and the export ships them within a second or two
SERVICE_GRACE = 5.0


@dataclass(frozen=True)
class Pipeline:
    """Which parts of the live pipeline this checkout has (they land separately)."""

    export: bool  # iqn-ctl attach --export
    serve: bool  # iqn-qos serve

    @classmethod
    def detect(cls) -> Pipeline:
        r1 = subprocess.run([sys.executable, "-m", "iqn_ctl", "attach", "--help"], capture_output=True,
                            text=True)
        r2 = subprocess.run([sys.executable, "-m", "iqn_qos", "--help"], capture_output=True, text=True)
        return cls("--export" in r1.stdout, " serve " in r2.stdout or "│ serve" in r2.stdout)

    @property
    def live(self) -> bool:
        return self.export and self.serve


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _tc(ns: str, *args: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"tc {' '.join(args)} in {ns}: {r.stderr.strip()}")


def _sysctl(ns: str, key: str, value: str) -> None:
    with netns.entered(ns), open(f"/proc/sys/{key}", "w") as f:
        f.write(value)


class LocaliseLab:
    """Three access subnets, two access routers with the ISP agent, a core, two OTT servers,
    JetStream and the QoS service, each in its own namespace (see :mod:`.plan`)."""

    def __init__(self, prefix: str = "iqnloc", state_root: Path | None = None) -> None:
        self.plan = Plan(prefix)
        self.prefix = prefix
        self.state = (state_root or STATE_ROOT) / f"{prefix}-localise"
        #: the JetStream nodes, in the process that built the lab (to kill one mid-run)
        self.js: Any = None

    def ns(self, role: str) -> str:
        return self.plan.ns(role)

    @property
    def info_file(self) -> Path:
        return self.state / "lab.json"

    def info(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.info_file.read_text()))
        except (OSError, ValueError):
            return {}

    def exists(self) -> bool:
        return any(netns.exists(self.ns(r)) for r in self.plan.roles)

    # -- up --------------------------------------------------------------------------------------
    def up(self, slot: float = 30.0, nats_nodes: int = 1, p: float = 0.2, n: int = 4,
           say: Any = None) -> dict[str, Any]:
        """Build the whole lab (after removing any leftover of the same prefix); on any
        failure everything made so far is removed again."""
        preflight()
        if nats_nodes not in (1, 3):
            raise LabError(f"JetStream runs as 1 node or a cluster of 3, not {nats_nodes}")
        if not slot > 0:
            raise LabError(f"--slot must be positive, got {slot}")
        self.down()
        say = say or (lambda _msg: None)
        try:
            return self._build(slot, nats_nodes, p, n, say)
        except BaseException:
            self.down()
            raise

    def _build(self, slot: float, nats_nodes: int, p: float, n: int, say: Any) -> dict[str, Any]:
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state.chmod(0o700)
        t0 = time.monotonic()
        media_dir = ensure_media(CLIP)
        make_cert(self.state / "ott.crt", self.state / "ott.key", WWW_HOST, (WWW_HOST, MEDIA_HOST))
        self._network()
        say(f"network up ({len(self.plan.roles)} namespaces) in {time.monotonic() - t0:.1f} s")
        # each server's page host and media host are two processes (iqn_lab/ott/daemons.py says why)
        daemons = []
        for sv in self.plan.servers:
            daemons += spawn_service(self.state, f"ott-{sv.role}", self.ns(sv.role), media_dir, sv.www,
                                     sv.media, requests=f"requests-{sv.role}")
        self._wait(lambda: all_ready(self.state, daemons), "OTT servers", daemons)
        from iqn_lab.jetstream import JetStream

        js = self.js = JetStream.start(nodes=nats_nodes, workdir=self.state / "nats", host=OPS_ADDR,
                                       netns=self.ns("ops"))
        for i, node in enumerate(js.nodes):  # down finds them through the namespace; status by pid file
            if node.proc is not None:
                (self.state / f"nats-{i}.pid").write_text(f"{node.proc.pid}\n")
        say(f"JetStream ({nats_nodes} node{'s' if nats_nodes > 1 else ''}) at {', '.join(js.urls)}")
        topo = self.state / "topology.json"
        topo.write_text(json.dumps(self.plan.qos_topology(), indent=1))
        pipe = Pipeline.detect()
        info: dict[str, Any] = {
            "prefix": self.prefix, "topology": "localise", "started": time.time(), "slot": slot,
            "p": p, "n": n, "nats": js.urls, "qos_topology": str(topo), "cafile": str(self.state / "ott.crt"),
            "pipeline": {"export": pipe.export, "serve": pipe.serve},
            "namespaces": {r: self.ns(r) for r in self.plan.roles},
            "agents": {}, "service": None, "fault": None,
        }
        for rt in self.plan.routers:
            info["agents"][rt.cid] = self._start_agent(rt.role, slot, p, n, js.urls if pipe.export else [])
        self._wait_agents(info["agents"])
        say(f"ISP agents attached (XDP) on {', '.join(r.uplink for r in self.plan.routers)}"
            + (", exporting to JetStream" if pipe.export else ""))
        if pipe.export and pipe.serve:  # the agents' stream first: the service would make an R1 one
            self._wait_stream(replicas=min(3, nats_nodes))
        if pipe.serve:
            info["service"] = self._start_service(js.urls, topo, slot)
            say(f"QoS service at {info['service']['url']}")
        self.info_file.write_text(json.dumps(info, indent=1))
        return info

    def _network(self) -> None:
        pl = self.plan
        for role in pl.roles:
            _ip("netns", "add", self.ns(role))
            _ip("-n", self.ns(role), "link", "set", "lo", "up")
            _sysctl(self.ns(role), "net/ipv6/conf/all/disable_ipv6", "1")
            _sysctl(self.ns(role), "net/ipv4/ip_forward", "1" if role in ("core", "rtr1", "rtr2") else "0")

        def veth(a: str, ns_a: str, b: str, ns_b: str) -> None:
            _ip("link", "add", a, "netns", self.ns(ns_a), "type", "veth", "peer", "name", b, "netns",
                self.ns(ns_b))
            _ip("-n", self.ns(ns_a), "link", "set", a, "up")
            _ip("-n", self.ns(ns_b), "link", "set", b, "up")

        def addr(role: str, ifname: str, a: str) -> None:
            _ip("-n", self.ns(role), "addr", "add", a, "dev", ifname)

        def route(role: str, dst: str, via: str) -> None:
            _ip("-n", self.ns(role), "route", "replace", dst, "via", via)

        veth(pl.ops_core_if, "core", pl.ops_if, "ops")
        addr("core", pl.ops_core_if, f"{OPS_CORE}/30")
        addr("ops", pl.ops_if, f"{OPS_ADDR}/30")
        route("ops", "default", OPS_CORE)
        for sv in pl.servers:
            veth(sv.core_if, "core", sv.ifname, sv.role)
            addr("core", sv.core_if, f"{sv.gw}/24")
            addr(sv.role, sv.ifname, f"{sv.www}/24")
            addr(sv.role, sv.ifname, f"{sv.media}/24")
            route(sv.role, "default", sv.gw)
        for rt in pl.routers:
            veth(rt.core_if, "core", rt.uplink, rt.role)
            addr("core", rt.core_if, f"{rt.core_addr}/30")
            addr(rt.role, rt.uplink, f"{rt.addr}/30")
            route(rt.role, "default", rt.core_addr)
        for sn in pl.subnets:
            rt = pl.router(sn.router)
            veth(sn.router_if, sn.router, sn.client_if, sn.role)
            addr(sn.router, sn.router_if, f"{sn.gw}/24")
            addr(sn.role, sn.client_if, f"{sn.gw.rsplit('.', 1)[0]}.254/24")  # players add theirs
            route("core", sn.net, rt.addr)
            route(sn.role, "default", sn.gw)

    def _wait(self, ok: Any, what: str, daemons: list[str], timeout: float = READY_TIMEOUT) -> None:
        procs.wait_ready(self.state, ok, what, daemons, timeout)

    # -- JetStream ---------------------------------------------------------------------------------
    def jsz(self) -> dict[str, Any] | None:
        """``/jsz?streams=true&config=true`` of the first running node (None: none answers)."""
        if self.js is None:
            return None
        for node in self.js.nodes:
            if node.running:
                raw = self.js._get(node, "/jsz?streams=true&config=true")
                if raw:
                    try:
                        return dict(json.loads(raw))
                    except ValueError:
                        continue
        return None

    def _wait_stream(self, replicas: int) -> None:
        """Until the agents have created stream IQN with ``replicas`` replicas (they do on
        connecting); the service, started before it exists, would create it with one."""
        def made() -> bool:
            doc = self.jsz() or {}
            return any(st.get("name") == "IQN" and st.get("config", {}).get("num_replicas") == replicas
                       for acc in doc.get("account_details") or [] for st in acc.get("stream_detail") or [])

        self._wait(made, f"stream IQN (R{replicas}) from the agents", [f"agent-{r.role}" for r in
                                                                       self.plan.routers], AGENT_TIMEOUT)

    def kill_nats(self, i: int) -> str:
        """SIGKILL JetStream node ``i`` (no goodbye to the cluster); returns its URL."""
        if self.js is None or not 0 <= i < len(self.js.nodes):
            raise LabError(f"no JetStream node {i} in this process")
        self.js.kill(i)
        return str(self.js.nodes[i].url)

    def agent_status(self, role: str) -> dict[str, Any] | None:
        """The agent's ``status`` on router ``role`` (None: it does not answer)."""
        from iqn_ctl.live.api import ApiError, request, sock_path

        rt = self.plan.router(role)
        try:
            return dict(request(sock_path(self.state / f"run-{role}", rt.uplink), "status"))
        except ApiError:
            return None

    # -- the ISP agents and the QoS service --------------------------------------------------------
    def _start_agent(self, role: str, slot: float, p: float, n: int, export: list[str]) -> dict[str, Any]:
        rt = self.plan.router(role)
        state_dir, run_dir = self.state / f"agent-{role}", self.state / f"run-{role}"
        argv = [sys.executable, "-m", "iqn_ctl", "attach", rt.uplink, "--p", str(p), "--n", str(n),
                "--slot", str(slot), "--state-dir", str(state_dir), "--run-dir", str(run_dir)]
        for url in export:
            argv += ["--export", url]
        if export:
            argv += ["--router-id", rt.cid]
        procs.spawn(self.state, f"agent-{role}", argv, ns=self.ns(role))
        return {"router": rt.cid, "iface": rt.uplink, "ns": self.ns(role), "state_dir": str(state_dir),
                "run_dir": str(run_dir), "log": str(self.state / f"agent-{role}.log")}

    def _wait_agents(self, agents: dict[str, dict[str, Any]]) -> None:
        from iqn_ctl.live.api import ApiError, request, sock_path

        def attached() -> bool:
            for a in agents.values():
                try:
                    request(sock_path(Path(a["run_dir"]), a["iface"]), "status")
                except ApiError:
                    return False
            return True

        self._wait(attached, "ISP agents", [f"agent-{r.role}" for r in self.plan.routers], AGENT_TIMEOUT)

    def _start_service(self, urls: list[str], topo: Path, slot: float) -> dict[str, Any]:
        port = 18000 + os.getpid() % 20000  # inside the ops namespace: nothing else listens there
        listen = f"{OPS_ADDR}:{port}"
        argv = [sys.executable, "-m", "iqn_qos", "serve", "--topology", str(topo),
                "--store", str(self.state / "qos.duckdb"), "--slot", str(slot), "--listen", listen,
                "--grace", str(SERVICE_GRACE)]
        for url in urls:
            argv += ["--nats", url]
        procs.spawn(self.state, "qos", argv, ns=self.ns("ops"))
        url = f"http://{listen}"
        self._wait(lambda: self.service_get(url, "/api/components") is not None, "QoS service", ["qos"],
                   AGENT_TIMEOUT)
        return {"url": url, "store": str(self.state / "qos.duckdb"), "log": str(self.state / "qos.log")}

    def service_get(self, url: str, path: str) -> dict[str, Any] | None:
        """GET a JSON document from the QoS service (it listens inside the ops namespace)."""
        code = ("import sys, urllib.request as u; "
                f"sys.stdout.buffer.write(u.urlopen({url + path!r}, timeout=5).read())")
        r = subprocess.run(["ip", "netns", "exec", self.ns("ops"), sys.executable, "-c", code],
                           capture_output=True)
        if r.returncode != 0:
            return None
        try:
            return dict(json.loads(r.stdout))
        except ValueError:
            return None

    def stop_service(self) -> None:
        pid = procs.pid_of(self.state, "qos")
        if pid is not None:
            procs.stop([pid], grace=15.0)

    # -- players -----------------------------------------------------------------------------------
    def start_players(self, per_subnet: int, duration: float, log_dir: Path, stagger: float = 3.0,
                      seed: int = 1) -> list[int]:
        """One player process per subnet namespace, ``per_subnet`` players in each (their own
        client addresses, half of them on each server); returns the pids."""
        if per_subnet < 1:
            raise LabError(f"--players must give at least one player per subnet, got {per_subnet}")
        info = self.info()
        log_dir.mkdir(parents=True, exist_ok=True)
        pids = []
        for role, specs in self.plan.players(per_subnet).items():
            sn = next(s for s in self.plan.subnets if s.role == role)
            for sp in specs:
                subprocess.run(["ip", "-n", self.ns(role), "addr", "replace", f"{sp['source']}/24", "dev",
                                sn.client_if], capture_output=True, check=False)
            spec_file = self.state / f"players-{role}.json"
            spec_file.write_text(json.dumps(specs))
            pids.append(procs.spawn(self.state, f"players-{role}", [
                sys.executable, "-m", "iqn_lab.player", "--spec", str(spec_file), "--duration", str(duration),
                "--log-dir", str(log_dir), "--cafile", info.get("cafile", str(self.state / "ott.crt")),
                "--p", str(info.get("p", 0.2)), "--n", str(info.get("n", 4)), "--stagger", str(stagger),
                "--seed", str(seed)], ns=self.ns(role)))  # fmt: skip
        return pids

    def udp_drops(self) -> dict[str, int]:
        """Per subnet: UDP datagrams its namespace's kernel dropped for a full receive buffer
        (``RcvbufErrors``): a player loop that fell behind loses segments, and QUIC's recovery
        turns them into stalls the network did not cause."""
        out: dict[str, int] = {}
        for sn in self.plan.subnets:
            r = subprocess.run(["ip", "netns", "exec", self.ns(sn.role), "cat", "/proc/net/snmp"],
                               capture_output=True, text=True)
            rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("Udp:")]
            if len(rows) >= 2 and "RcvbufErrors" in rows[0]:
                out[sn.cid] = int(rows[1][rows[0].index("RcvbufErrors")])
        return out

    # -- faults ------------------------------------------------------------------------------------
    def inject(self, fault: str, rate: int) -> dict[str, Any]:
        """An htb bottleneck of ``rate`` bit/s for the video crossing the fault's link
        (server-to-client direction); the page hosts' packets pass beside it.

        Why not one FIFO for everything: this kernel has neither fq_codel nor sfq, and in a
        shared FIFO the video connections' loss-based congestion control keeps the queue full,
        so the page connection's answers to the toggles queue, its congestion window collapses
        and the answers trickle (docs/demo.md, measured there: 5 candidates/s instead of 20):
        the router would see the stalls start and then lose them. The video is what a congested
        link starves; the signal must reach the router to be measured at all. Measured here with
        a shared htb class: the agent saw 0.4-1 s of 2-3 s stalls."""
        cid, role, ifname = self.plan.fault_target(fault)
        ns = self.ns(role)
        dev = ("dev", ifname)
        _tc(ns, "qdisc", "replace", *dev, "root", "handle", "1:", "htb", "default", "20")
        _tc(ns, "class", "replace", *dev, "parent", "1:", "classid", "1:10", "htb", "rate", f"{rate}bit",
            "ceil", f"{rate}bit", "burst", "15k")
        _tc(ns, "class", "replace", *dev, "parent", "1:", "classid", "1:20", "htb", "rate",
            f"{UNLIMITED}bit")
        for i, sv in enumerate(self.plan.servers):
            _tc(ns, "filter", "replace", *dev, "parent", "1:", "protocol", "ip", "prio", "1", "handle",
                f"800::{i + 1}", "u32", "match", "ip", "src", f"{sv.media}/32", "flowid", "1:10")
        got = {"component": cid, "kind": fault, "namespace": ns, "iface": ifname, "rate_bit": rate}
        info = self.info()
        if info:
            info["fault"] = got
            self.info_file.write_text(json.dumps(info, indent=1))
        return got

    def clear_fault(self, fault: str) -> None:
        _cid, role, ifname = self.plan.fault_target(fault)
        subprocess.run(["ip", "netns", "exec", self.ns(role), "tc", "qdisc", "del", "dev", ifname, "root"],
                       capture_output=True, check=False)

    # -- down and status ---------------------------------------------------------------------------
    def down(self) -> list[str]:
        """Remove everything this lab made, also after a crash; returns what it removed."""
        removed = procs.remove_namespaces([self.ns(role) for role in self.plan.roles])
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        for ifname in self.plan.all_ifnames():  # veths a crash mid-up left in the root namespace
            if f" {ifname}@" in links or f" {ifname}:" in links:
                subprocess.run(["ip", "link", "del", ifname], capture_output=True, check=False)
                removed.append(f"interface {ifname}")
        if self.state.exists():
            shutil.rmtree(self.state, ignore_errors=True)
            removed.append(f"state {self.state}")
        return removed

    def status(self) -> dict[str, Any]:
        up = {r: netns.exists(self.ns(r)) for r in self.plan.roles}
        out: dict[str, Any] = {"prefix": self.prefix, "topology": "localise", "up": all(up.values()),
                               "namespaces": {r: self.ns(r) for r, ok in up.items() if ok}}
        if not any(up.values()):
            return out
        daemons = [f"ott-{s.role}-{h}" for s in self.plan.servers for h in ("www", "media")]
        daemons += ["agent-rtr1", "agent-rtr2", "nats-0", "qos"]
        out["daemons"] = {d: procs.pid_of(self.state, d) for d in daemons}
        out.update({k: v for k, v in self.info().items() if k not in out})
        return out


def preflight() -> None:
    """Root and the tools a namespace lab with OTT servers needs (the mitigation lab's too)."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (namespaces, XDP, tc): run with sudo")
    for tool, pkg in (("ip", "iproute2"), ("tc", "iproute2"), ("ffmpeg", "ffmpeg")):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found: run sudo bash scripts/setup.sh (installs Debian's {pkg})")
