"""A two-namespace testbed and a synthetic IQN sender for the live-agent tests
and benchmark (the full lab with OpenVPN and the OTT emulator is :mod:`iqn_lab.lab`).

A testbed is two network namespaces joined by a veth pair: the *server* side sends
(plain UDP sockets bound to port 443, payload sized so the Ethernet frame has
the wanted length), the *client* side receives and carries the agent's XDP
program. Nothing touches the root namespace; addresses come from
198.18.0.0/15 (IPv6 from a ULA prefix) and every name carries a per-run prefix.
``Testbed`` is a context manager that always removes what it created.

Run as a script (inside the server namespace) it is the sender:
``python -m iqn_lab.testbed send SPEC.json`` prints the actual send times as JSON.

The sender is QUIC-shaped: right before each server datagram, the *client*
sends a small request datagram back on the same 5-tuple (client port -> 443),
as a viewer's toggle request precedes its 200 OK, so the agent's forgery guard
(pairing, which sees the client's side leave the agent's interface) accepts
the answers. The requests go out of a raw socket opened inside the client
namespace (setns), on the same schedule in the same process, so the timing of
the answers is what it was; a flow with ``"request": false`` sends none (a
forger: an off-path sender cannot make the client talk).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PY = sys.executable  # the interpreter (and venv) this testbed runs in
IQN_CTL = str(Path(sys.executable).with_name("iqn-ctl"))
ETH, VLAN, IP4, IP6, UDP = 14, 4, 20, 40, 8


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


#: the OS's randomness, not the ``random`` module's: hypothesis seeds that one
#: deterministically inside its tests, so two testbeds of one run could get the same names
_RNG = random.SystemRandom()


def run_prefix() -> str:
    """Short and unique per run (interface names are at most 15 characters); a name whose
    namespace already exists (another run's, or a leftover) is never reused."""
    while True:
        prefix = f"iq{os.getpid() % 10000:04d}{_RNG.randrange(16 ** 3):03x}"
        if not any(os.path.exists(f"/run/netns/{prefix}{role}") for role in "sc"):
            return prefix


@dataclass
class Testbed:
    """server ns <-> client ns over one veth pair, with IPv4 and IPv6.

    VLAN-tagged traffic is sent as hand-built frames on an AF_PACKET socket (the
    CI kernel has no 8021q module, and the agent only needs to see the tag)."""

    __test__ = False  # a helper, not a pytest test class

    prefix: str = field(default_factory=run_prefix)
    vlan_id: int = 42
    created: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = _RNG.randrange(1, 250)
        self.srv_ns = f"{self.prefix}s"
        self.cli_ns = f"{self.prefix}c"
        self.srv_if = f"{self.prefix}S"
        self.cli_if = f"{self.prefix}C"  # the agent attaches here
        self.srv4, self.cli4 = f"198.18.{n}.1", f"198.18.{n}.2"
        self.srv4b = f"198.18.{n}.5"  # a second server address
        self.srv4v, self.cli4v = f"198.19.{n}.1", f"198.19.{n}.2"  # VLAN-tagged raw frames
        self.srv6, self.cli6 = f"fd00:198:18:{n:x}::1", f"fd00:198:18:{n:x}::2"

    def __enter__(self) -> Testbed:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        for ns in (self.srv_ns, self.cli_ns):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.srv_if, "netns", self.srv_ns, "type", "veth",
           "peer", "name", self.cli_if, "netns", self.cli_ns)
        s, c = self.srv_ns, self.cli_ns
        sh("ip", "-n", s, "addr", "add", f"{self.srv4}/24", "dev", self.srv_if)
        sh("ip", "-n", s, "addr", "add", f"{self.srv4b}/24", "dev", self.srv_if)
        sh("ip", "-n", c, "addr", "add", f"{self.cli4}/24", "dev", self.cli_if)
        sh("ip", "-n", s, "addr", "add", f"{self.srv6}/64", "dev", self.srv_if, "nodad")
        sh("ip", "-n", c, "addr", "add", f"{self.cli6}/64", "dev", self.cli_if, "nodad")
        for ns, dev in ((s, self.srv_if), (c, self.cli_if)):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        self.cli_mac = self.mac(c, self.cli_if)
        self.srv_mac = self.mac(s, self.srv_if)
        # no neighbour discovery needed: the first burst must not wait for ARP/ND
        for addr in (self.cli4, self.cli6):
            sh("ip", "-n", s, "neigh", "replace", addr, "lladdr", self.cli_mac, "dev", self.srv_if,
               "nud", "permanent")

    @staticmethod
    def mac(ns: str, dev: str) -> str:
        out = sh("ip", "-n", ns, "-j", "link", "show", "dev", dev).stdout
        return str(json.loads(out)[0]["address"])

    def xdp_on_client(self) -> str | None:
        """Name of the XDP program on the client-side veth, None when there is none."""
        out = sh("ip", "-n", self.cli_ns, "-j", "-d", "link", "show", "dev", self.cli_if).stdout
        xdp = json.loads(out)[0].get("xdp")
        if not xdp:
            return None
        ents = xdp.get("attached") or [xdp]
        return str(ents[0].get("prog", {}).get("name", "?"))

    def egress_classifiers(self) -> list[str]:
        """Names of the BPF classifiers at the client-side veth's TC egress (the
        forgery guard's ``iqn_tc_egress`` while an agent pairs)."""
        r = sh("ip", "netns", "exec", self.cli_ns, "tc", "-j", "filter", "show", "dev", self.cli_if,
               "egress", check=False)
        rows = json.loads(r.stdout or "[]") if r.returncode == 0 else []
        return [str(x["options"]["bpf_name"]) for x in rows
                if x.get("kind") == "bpf" and "bpf_name" in x.get("options", {})]

    def attach_foreign_xdp(self, name: str = "other_prog") -> None:
        """Put someone else's (non-IQN) XDP program on the client-side veth, in
        generic mode, the way another tool on the router would."""
        load = (
            f"from bcc import BPF; b = BPF(text='int {name}(struct xdp_md *c) {{ return XDP_PASS; }}');"
            f"BPF.attach_xdp({self.cli_if!r}, b.load_func({name!r}, BPF.XDP), 1 << 1)"
        )
        subprocess.run(["ip", "netns", "exec", self.cli_ns, PY, "-c", load], check=True,
                       capture_output=True, timeout=120)
        assert self.xdp_on_client() == name

    def remove_foreign_xdp(self) -> None:
        """Take the foreign program of :meth:`attach_foreign_xdp` off again (generic mode)."""
        sh("ip", "-n", self.cli_ns, "link", "set", "dev", self.cli_if, "xdpgeneric", "off")
        assert self.xdp_on_client() is None

    def close(self) -> None:
        for ns in reversed(self.created):
            sh("ip", "netns", "pids", ns, check=False)
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()

    # -- processes in the namespaces --

    def agent_cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.cli_ns, IQN_CTL, *args]

    def send(self, spec: dict[str, Any], **kw: Any) -> subprocess.Popen[str]:
        """Start the sender in the server namespace; its stdout is the JSON of send times."""
        spec = {"dev": self.srv_if, "src_mac": self.srv_mac, "dst_mac": self.cli_mac,
                "cli_ns": self.cli_ns, "cli_dev": self.cli_if, **spec}
        return subprocess.Popen(
            ["ip", "netns", "exec", self.srv_ns, PY, str(Path(__file__).resolve()), "send",
             json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
        )


# -- the sender ------------------------------------------------------------------------


def payload_len(frame_len: int, family: int, vlan: bool) -> int:
    return frame_len - ETH - (VLAN if vlan else 0) - (IP6 if family == 6 else IP4) - UDP


def _getcpu() -> int:
    """The CPU this thread runs on (glibc's sched_getcpu; Python 3.11's os lacks it)."""
    return int(_libc().sched_getcpu())


_LIBC: Any = None
CLONE_NEWNET = 0x40000000
#: UDP payload of a client's request datagram (a small QUIC packet: an HTTP/3 request or an ACK)
REQUEST_PAYLOAD = 40


def _libc() -> Any:
    import ctypes

    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _setns(fd: int) -> None:
    import ctypes

    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def client_socket(ns: str, dev: str) -> socket.socket:
    """A raw packet socket on ``dev`` inside network namespace ``ns``, opened
    from this process (a socket keeps the namespace it was made in): frames
    sent on it leave the client's interface, through its TC egress hook, as
    the client's own datagrams do. Python 3.11's os has no setns: libc's."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(there)
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            s.bind((dev, 0))
        finally:
            _setns(here)
    finally:
        os.close(here)
        os.close(there)
    return s


def request_frame(f: dict[str, Any], spec: dict[str, Any]) -> bytes:
    """The client's request on flow ``f``: client port -> server port, the
    flow's VLAN tag if it has one, MACs of the veth pair."""
    from iqn_ctl.capture.frames import udp_frame

    cli_mac, srv_mac = (bytes.fromhex(spec[k].replace(":", "")) for k in ("dst_mac", "src_mac"))
    return udp_frame(f["dst"], f["src"], int(f["dport"]), int(f.get("sport", 443)),
                     payload=bytes(REQUEST_PAYLOAD), vlans=(int(f["vlan"]),) if f.get("vlan") else (),
                     src_mac=cli_mac, dst_mac=srv_mac, pppoe=f.get("pppoe"))


def _sleep_until(t: float) -> None:
    while True:
        d = t - time.time()
        if d <= 0:
            return
        time.sleep(d - 0.0005 if d > 0.001 else 0)


def send(spec: dict[str, Any]) -> dict[str, Any]:
    """Spec: {"flows": [{"name", "src", "dst", "dport", "frame", "vlan", "raw", "request", "cpus",
    "times": [...]} |
    {"name", ..., "bulk_pps", "from", "to"}], "lead"}; times are epoch seconds, or, with
    "lead", offsets from a start ``lead`` s after the sender is ready (so interpreter start-up
    under ``ip netns exec`` cannot eat the head start). "cpus": packet i of the flow is sent
    from CPU cpus[i % len] (its XDP and perf event then run on that CPU). Returns the actual
    send time of every packet per flow name, the start "t0" (0 without "lead") and the CPU
    each packet was sent from. "raw": send built frames from any source address (a spoofer;
    "times" only). "pppoe": a session id: the flow's frames (and its requests) are PPPoE
    session frames, built here ("frame" is the whole Ethernet frame's length). "request"
    (default true): the client sends a request
    datagram right before each of the flow's packets (see the module doc); it needs
    "cli_ns" and "cli_dev" in the spec (Testbed.send adds them)."""
    socks: dict[tuple[str, int, int], socket.socket] = {}  # (src, family, sport)
    plan: list[tuple[float, str, socket.socket, bytes, Any]] = []
    client: socket.socket | None = None
    raw: socket.socket | None = None  # frames built here: VLAN tags, spoofed ("raw") sources
    requests: dict[str, bytes | None] = {}
    for f in spec["flows"]:
        if f.get("request", True) and "cli_ns" in spec:
            if client is None:
                client = client_socket(spec["cli_ns"], spec["cli_dev"])
            requests[f["name"]] = request_frame(f, spec)
        else:
            requests[f["name"]] = None
        fam = 6 if ":" in f["src"] else 4
        if f.get("vlan") or f.get("raw") or f.get("pppoe") is not None:
            from iqn_ctl.capture.frames import udp_frame

            if raw is None:
                raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
                raw.bind((spec["dev"], 0))
            src_mac, dst_mac = (bytes.fromhex(spec[k].replace(":", "")) for k in ("src_mac", "dst_mac"))
            frame = udp_frame(f["src"], f["dst"], f.get("sport", 443), int(f["dport"]), int(f["frame"]),
                              vlans=(int(f["vlan"]),) if f.get("vlan") else (), src_mac=src_mac,
                              dst_mac=dst_mac, pppoe=f.get("pppoe"))
            plan.extend((t, f["name"], raw, frame, None) for t in f["times"])
            continue
        key = (f["src"], fam, int(f.get("sport", 443)))
        if key not in socks:
            s = socket.socket(socket.AF_INET6 if fam == 6 else socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((f["src"], key[2]))
            socks[key] = s
        data = bytes(payload_len(int(f["frame"]), fam, bool(f.get("vlan"))))
        dst = (f["dst"], int(f["dport"]))
        if "times" in f:
            times = f["times"]
        else:
            k = int((f["to"] - f["from"]) * f["bulk_pps"])
            times = [f["from"] + i / f["bulk_pps"] for i in range(k)]
        plan.extend((t, f["name"], socks[key], data, dst) for t in times)
    cpus = {f["name"]: f.get("cpus") for f in spec["flows"]}
    t0 = time.time() + float(spec["lead"]) if "lead" in spec else 0.0
    plan.sort(key=lambda x: x[0])
    sent: dict[str, list[float]] = {f["name"]: [] for f in spec["flows"]}
    on_cpu: dict[str, list[int]] = {f["name"]: [] for f in spec["flows"]}
    for t, name, s, data, dst in plan:
        want = cpus[name]
        if want:
            os.sched_setaffinity(0, {want[len(sent[name]) % len(want)]})
        _sleep_until(t0 + t)
        req = requests[name]
        if req is not None and client is not None:
            client.send(req)  # leaves the client's interface before the answer is sent
        if dst is None:
            s.send(data)
        else:
            s.sendto(data, dst)
        sent[name].append(time.time())
        on_cpu[name].append(_getcpu())
    return {"sent": sent, "t0": t0, "cpu": on_cpu}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "send":
        print(json.dumps(send(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: testbed.py send SPEC_JSON")
