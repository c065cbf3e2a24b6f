"""Acting on a stall (issue 14): ``iqn-ctl attach --mitigate EGRESS``, live on
real veths with the real data plane, the real HTB and the real ``iqn_boost``
classifier.

The testbed's client namespace is the router: the agent listens on the
server-facing veth, and a second veth pair there (``E``) is the egress toward
the viewers that it shapes. Viewers stall with real paired signals (the
client's request leaves through the pairing classifier before each answer);
a forger's signal has no client side. What reaches which HTB class is read
from the kernel's class counters after sending frames out of ``E`` to each
viewer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_agent_live import cli, need_xdp, poll_until, stop, wait_ready

from iqn_ctl.capture.frames import udp_frame
from iqn_ctl.engine.synth import SignalModel, signal_times
from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import PY, client_socket, sh
from iqn_lab.testbed import Testbed as Lab

LINK = 10_000_000
SHARE = 0.3
RATE = 1_000_000
SLOTS = 3  # share x link / rate
BOOST_MAX = 12.0
LEAD = 1.0
AGG, DEFAULT = "4951:10", "4951:20"
SO_SNDBUFFORCE = 32  # asm-generic/socket.h (Python names only SO_SNDBUF)
PPPOE = 8  # PPPoE session header + PPP protocol

#: another IQN tool's egress classifier on the shaped interface: the agent's
#: attach, crash and detach must leave it where it is
OTHER = """
from bcc import BPF
from iqn_ctl.live import tc
b = BPF(text=b"int iqn_other(struct __sk_buff *s) {{ return -1; }}")
tc.attach({iface!r}, b.load_func(b"iqn_other", BPF.SCHED_CLS).fd, "iqn_other", "egress", prio=7)
"""


def times(start: float, end: float, seed: int) -> list[float]:
    return [float(t) for t in signal_times([(start, end)], SignalModel(), np.random.default_rng(seed))]


def add_egress(lab: Lab) -> str:
    """A veth pair inside the router (client) namespace: its ``E`` end is the shaped egress.
    IPv6 is off on both ends: the kernel's own router solicitations and MLD reports
    would leave through the default class at moments of their own (a fresh CI run
    once counted 70 such bytes there between two reads the test compares exactly)."""
    eg, peer = f"{lab.prefix}E", f"{lab.prefix}e"
    sh("ip", "-n", lab.cli_ns, "link", "add", eg, "type", "veth", "peer", "name", peer)
    for d in (eg, peer):
        sh("ip", "netns", "exec", lab.cli_ns, "sh", "-c",
           f"echo 1 > /proc/sys/net/ipv6/conf/{d}/disable_ipv6")
        sh("ip", "-n", lab.cli_ns, "link", "set", d, "up")
    subprocess.run(["ip", "netns", "exec", lab.cli_ns, PY, "-c", OTHER.format(iface=eg)], check=True,
                   capture_output=True, timeout=120)
    return eg


_UNIT = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def _bps(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)([KMG]?bit)", text)
    assert m, text
    return float(m.group(1)) * _UNIT[m.group(2).lower()]


def classes(lab: Lab, eg: str) -> dict[str, dict[str, Any]]:
    """The HTB classes on ``eg``: handle -> parent, rate and ceil (bit/s), bytes sent
    (tc prints no JSON for HTB classes: its text, one block per class)."""
    out = sh("ip", "netns", "exec", lab.cli_ns, "tc", "-s", "class", "show", "dev", eg).stdout
    found: dict[str, dict[str, Any]] = {}
    for block in out.split("class htb ")[1:]:
        words = block.split()
        c: dict[str, Any] = {"parent": words[words.index("parent") + 1] if "parent" in words else None,
                             "rate": _bps(words[words.index("rate") + 1]),
                             "ceil": _bps(words[words.index("ceil") + 1]),
                             "bytes": int(words[words.index("Sent") + 1]),
                             "backlog": words[words.index("backlog") + 1]}
        found[words[0]] = c
    return found


def sent_bytes(lab: Lab, eg: str) -> dict[str, int]:
    """Bytes each class has sent, once every queue has drained (HTB counts a
    packet when it leaves, at the class's rate)."""
    cls = poll_until(lambda: classes(lab, eg), lambda c: all(x["backlog"] == "0b" for x in c.values()))
    return {h: int(c["bytes"]) for h, c in cls.items()}


def root(lab: Lab, eg: str) -> tuple[str, str]:
    rows = json.loads(sh("ip", "netns", "exec", lab.cli_ns, "tc", "-j", "qdisc", "show", "dev", eg,
                         "root").stdout or "[]")
    return (str(rows[0]["kind"]), str(rows[0]["handle"])) if rows else ("noqueue", "0:")


def egress_filters(lab: Lab, eg: str) -> list[str]:
    r = sh("ip", "netns", "exec", lab.cli_ns, "tc", "-j", "filter", "show", "dev", eg, "egress", check=False)
    rows = json.loads(r.stdout or "[]") if r.returncode == 0 else []
    return sorted(str(x["options"]["bpf_name"]) for x in rows
                  if x.get("kind") == "bpf" and "bpf_name" in x.get("options", {}))


def to_viewers(sock: socket.socket, dsts: list[str], count: int, size: int = 1000, **kw: Any) -> None:
    """``count`` frames of ``size`` bytes to each of ``dsts``; ``kw``: udp_frame's (pppoe, vlans)."""
    for dst in dsts:
        src = "2001:db8:100::1" if ":" in dst else "198.51.100.1"
        frame = udp_frame(src, dst, 443, 40000, size, **kw)
        for _ in range(count):
            sock.send(frame)


def slot_bytes(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes the boost slot classes (minor 0x100 on) sent between two readings."""
    return sum(after[h] - before[h] for h in after if int(h.split(":")[1], 16) >= 0x100)


def blast(sock: socket.socket, dsts: list[str], seconds: float) -> tuple[int, float, float]:
    """Offer far more than the share to ``dsts`` for ``seconds``; returns
    (bytes offered, first send, last send)."""
    frames = [udp_frame("198.51.100.1", d, 443, 40000, 1400) for d in dsts]
    # room in the socket for more than the qdisc holds: the queue, not the socket, limits the sender
    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)
    offered, t0 = 0, time.monotonic()
    t = t0
    while t - t0 < seconds:
        for f in frames:
            offered += len(f)
            try:
                sock.send(f)
            except OSError:
                pass  # the class's queue is full: dropped there, as on the link
        t = time.monotonic()
    return offered, t0, t


def start_agent(lab: Lab, tmp_path: Path, eg: str, *flags: str) -> subprocess.Popen[str]:
    """``iqn-ctl attach`` on the lab's client side with ``--mitigate eg`` (a 10 Mbit/s
    link) and ``flags``; its run dir is tmp_path/run."""
    return subprocess.Popen(lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(tmp_path / "s"),
                                          "--mitigate", eg, "--link-rate", "10mbit", *flags),
                            env=dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run")), stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def boost(st: dict[str, Any]) -> dict[str, Any]:
    b = st["boost"]
    assert isinstance(b, dict)
    return b


def test_boost_on_stall_off_at_end_and_timeout_share_cap_forgery_and_crash_cleanup(tmp_path: Path) -> None:
    """One agent, seven stalling viewers and a forger. B stalls first (boosted),
    the forger F (no client side) 0.5 s later, while slots are free; A and
    C1..C5 1.5 s after B.
    With 3 slots: exactly 3 boosts, F never among them; frames to a boosted
    viewer leave through its slot class, to anyone else through the default
    class; a blast at the boosted viewers leaves the boost aggregate at no more
    than the share of the link; B's boost times out (--boost-max) while its
    stall goes on, the others end with their stalls. A SIGKILLed agent's HTB and
    classifier are removed by ``iqn-ctl detach``; another tool's classifier on
    the same hook stays throughout."""
    need_xdp()
    with Lab() as lab:
        eg = add_egress(lab)
        run, env = tmp_path / "run", dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
        agent = start_agent(lab, tmp_path, eg, "--boost-rate", "1mbit", "--boost-share", str(SHARE),
                            "--boost-max", str(BOOST_MAX), "--boost-gap", "0")
        try:
            wait_ready(sock_path(run, lab.cli_if), agent)
            st = request(sock_path(run, lab.cli_if), "status")
            b = boost(st)
            assert (b["slots"], b["link_bps"], b["share"]) == (SLOTS, LINK, SHARE)
            assert (b["active"], b["total"]) == (0, 0)
            assert root(lab, eg) == ("htb", "4951:")
            assert egress_filters(lab, eg) == ["iqn_boost", "iqn_other"]
            cls = classes(lab, eg)
            assert cls[AGG]["rate"] == SHARE * LINK and cls[DEFAULT]["rate"] == (1 - SHARE) * LINK
            assert all(cls[f"4951:{0x100 + i:x}"]["parent"] == AGG for i in range(SLOTS))

            net = lab.cli4.rsplit(".", 1)[0]
            b_addr, a_addr = f"{net}.20", lab.cli4
            c_addrs = [f"{net}.{21 + i}" for i in range(5)]
            f_addr = f"{net}.30"
            flows: list[dict[str, Any]] = [
                {"name": "B", "src": lab.srv4, "dst": b_addr, "dport": 40100, "frame": 1250, "raw": True,
                 "times": times(0.0, 24.0, 1)},
                {"name": "A", "src": lab.srv4, "dst": a_addr, "dport": 40101, "frame": 1250,
                 "times": times(1.5, 9.5, 2)},
                {"name": "F", "src": lab.srv4, "dst": f_addr, "dport": 40102, "frame": 1250, "raw": True,
                 "request": False, "times": times(0.5, 9.5, 3)},  # before A and C: a slot would be free
            ] + [{"name": f"C{i}", "src": lab.srv4, "dst": c, "dport": 40110 + i, "frame": 1250, "raw": True,
                  "times": times(1.5, 9.5, 10 + i)} for i, c in enumerate(c_addrs)]
            sender = lab.send({"lead": LEAD, "flows": flows})
            everyone = [b_addr, a_addr, *c_addrs]

            def status() -> dict[str, Any]:
                return request(sock_path(run, lab.cli_if), "status")

            st = poll_until(status, lambda s: boost(s)["total"] >= SLOTS and boost(s)["denied_full"] >= 1)
            b = boost(st)
            assert b["active"] == SLOTS and len(b["clients"]) == SLOTS
            assert set(b["clients"]) <= set(everyone) and f_addr not in b["clients"]
            assert b_addr in b["clients"]  # it stalled first
            boosted = list(b["clients"])
            others = [a for a in everyone if a not in boosted]

            # which class each viewer's traffic leaves through
            sock = client_socket(lab.cli_ns, eg)
            before = sent_bytes(lab, eg)
            to_viewers(sock, boosted, 20)
            after_boosted = sent_bytes(lab, eg)
            to_viewers(sock, [f_addr, *others[:2]], 20)
            after_rest = sent_bytes(lab, eg)
            slots_delta = slot_bytes(before, after_boosted)
            assert slots_delta >= SLOTS * 20 * 1000
            assert after_boosted[DEFAULT] == before[DEFAULT]
            assert after_rest[DEFAULT] - after_boosted[DEFAULT] >= 3 * 20 * 1000
            assert after_rest[AGG] == after_boosted[AGG]  # the forger's and the unboosted frames: not boosted

            # the share cap: the boosted viewers and the rest both offered far more than the
            # link; the boosted ones together get no more than the share of it
            agg0 = sent_bytes(lab, eg)[AGG]
            offered, t0, t1 = blast(sock, boosted + others[:2], 1.0)
            now = classes(lab, eg)  # read at once: an upper bound on a rate holds at any moment
            t2 = time.monotonic()
            carried = now[AGG]["bytes"] - agg0
            waiting = [c["backlog"] for h, c in now.items() if int(h.split(":")[1], 16) >= 0x100]
            assert any(w != "0b" for w in waiting), "the boosted classes must still have a queue"
            assert now[DEFAULT]["backlog"] != "0b", "and so must the rest"
            cap_bytes = SHARE * LINK / 8 * (t2 - t0)
            assert offered > 4 * LINK / 8 * (t1 - t0), "the blast must offer well over the link"
            assert 0 < carried <= 1.1 * cap_bytes + 64_000, (carried, cap_bytes)
            sock.close()

            # B's boost times out while its stall goes on; the others end with their stalls
            st = poll_until(status, lambda s: boost(s)["timeouts"] >= 1, timeout=60.0)
            assert b_addr not in boost(st)["clients"]
            flows_now = request(sock_path(run, lab.cli_if), "flows", stalling=True)
            assert any(r["client"] == b_addr for r in flows_now), "B's stall is still open"
            st = poll_until(status, lambda s: boost(s)["active"] == 0 and s["flows_in_stall"] == 0,
                            timeout=60.0)
            b = boost(st)
            assert b["total"] == SLOTS and b["timeouts"] == 1 and b["denied_full"] >= 4
            assert b["bytes"] >= slots_delta and b["seconds"] > 0
            out, err = sender.communicate(timeout=60)
            assert sender.returncode == 0, err
            assert st["unpaired"] > 0  # the forger's candidates were refused before any stall

            # crash: the HTB and the classifier stay, detach removes them (and only them)
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            assert root(lab, eg) == ("htb", "4951:")
            r = cli(lab, env, "detach", lab.cli_if)
            assert r.returncode == 0, r.stderr
            assert "boost qdisc" in r.stdout and "boost classifier" in r.stdout, r.stdout
            assert root(lab, eg) == ("noqueue", "0:")
            assert egress_filters(lab, eg) == ["iqn_other"]
            assert not (run / f"{lab.cli_if}.boost").exists()
        finally:
            stop(agent)


def test_boost_reaches_a_viewer_behind_pppoe(tmp_path: Path) -> None:
    """Viewers behind a PPPoE access link: the agent sees their signals and
    requests as PPPoE session frames (IPv4 plain, IPv6 behind a VLAN tag) and
    boosts both; the boost classifier reads the same link layer as the data
    plane (iqn_parse.h), so their PPPoE frames leaving E (IPv6 behind the tag
    again) go through the slot classes, while PPPoE frames to an unboosted
    viewer, and a PPPoE control frame (LCP) whose bytes where an IP header
    would be name a boosted viewer, go through the default class."""
    need_xdp()
    with Lab() as lab:
        eg = add_egress(lab)
        run = tmp_path / "run"
        agent = start_agent(lab, tmp_path, eg, "--boost-rate", "1mbit", "--boost-share", str(SHARE),
                            "--boost-gap", "0")
        sender = None
        try:
            wait_ready(sock_path(run, lab.cli_if), agent)
            flows = [
                {"name": "v4", "src": lab.srv4, "dst": lab.cli4, "dport": 40201, "frame": 1250 + PPPOE,
                 "pppoe": 0x0201, "times": times(0.0, 8.0, 1)},
                {"name": "v6", "src": lab.srv6, "dst": lab.cli6, "dport": 40202, "vlan": lab.vlan_id,
                 "frame": 1250 + PPPOE + 4, "pppoe": 0x0202, "times": times(0.0, 8.0, 2)},
            ]
            sender = lab.send({"lead": LEAD, "flows": flows})
            st = poll_until(lambda: request(sock_path(run, lab.cli_if), "status"),
                            lambda s: boost(s)["active"] == 2)
            assert sorted(boost(st)["clients"]) == sorted([lab.cli4, lab.cli6])
            assert st["unpaired"] == 0  # the PPPoE requests paired every candidate

            sock = client_socket(lab.cli_ns, eg)
            before = sent_bytes(lab, eg)
            to_viewers(sock, [lab.cli4], 20, pppoe=0x0201)
            to_viewers(sock, [lab.cli6], 20, pppoe=0x0202, vlans=(lab.vlan_id,))
            boosted = sent_bytes(lab, eg)
            unboosted = f"{lab.cli4.rsplit('.', 1)[0]}.40"
            to_viewers(sock, [unboosted], 20, pppoe=0x0203)
            lcp = bytearray(udp_frame("198.51.100.1", lab.cli4, 443, 40000, 1000, pppoe=0x0201))
            lcp[20:22] = b"\xc0\x21"  # the PPP protocol: LCP, not IPv4
            for _ in range(20):
                sock.send(bytes(lcp))
            rest = sent_bytes(lab, eg)
            sock.close()
            assert slot_bytes(before, boosted) >= 2 * 20 * 1000
            assert boosted[DEFAULT] == before[DEFAULT]
            assert slot_bytes(boosted, rest) == 0
            assert rest[DEFAULT] - boosted[DEFAULT] >= 2 * 20 * 1000
            b = boost(request(sock_path(run, lab.cli_if), "status"))
            assert b["bytes"] >= 2 * 20 * 1000  # counted in the boosts' map entries
            out, err = sender.communicate(timeout=60)
            assert sender.returncode == 0, err
        finally:
            if sender is not None and sender.poll() is None:
                sender.kill()
                sender.wait(10)
            err = stop(agent)
        assert agent.returncode == 0, err
        assert root(lab, eg) == ("noqueue", "0:")


def test_refuses_a_foreign_root_qdisc_and_cleans_up_on_stop(tmp_path: Path) -> None:
    """A root qdisc IQN did not add is never replaced (one-line error, exit 2,
    the qdisc untouched); without it, SIGTERM removes everything the boost added."""
    need_xdp()
    with Lab() as lab:
        eg = add_egress(lab)
        run, env = tmp_path / "run", dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
        sh("ip", "netns", "exec", lab.cli_ns, "tc", "qdisc", "add", "dev", eg, "root", "handle", "7:",
           "tbf", "rate", "5mbit", "burst", "32k", "latency", "50ms")
        r = cli(lab, env, "attach", lab.cli_if, "--state-dir", str(tmp_path / "s"), "--mitigate", eg,
                "--link-rate", "10mbit")
        assert r.returncode == 2 and "iqn-ctl: error:" in r.stderr and "root qdisc" in r.stderr, r.stderr
        assert root(lab, eg) == ("tbf", "7:")
        assert egress_filters(lab, eg) == ["iqn_other"]
        sh("ip", "netns", "exec", lab.cli_ns, "tc", "qdisc", "del", "dev", eg, "root")
        agent = start_agent(lab, tmp_path, eg)
        try:
            wait_ready(sock_path(run, lab.cli_if), agent)
            assert root(lab, eg) == ("htb", "4951:")
        finally:
            err = stop(agent)
        assert agent.returncode == 0, err
        assert root(lab, eg) == ("noqueue", "0:")
        assert egress_filters(lab, eg) == ["iqn_other"]
        assert not (run / f"{lab.cli_if}.boost").exists()


@pytest.mark.parametrize("args, msg", [
    (("--boost-share", "1.5"), "--boost-share"),
    (("--boost-rate", "fast"), "--boost-rate"),
    (("--boost-max", "0"), "--boost-max"),
])
def test_bad_boost_flags_are_one_line_errors(args: tuple[str, ...], msg: str) -> None:
    r = subprocess.run([str(Path(PY).with_name("iqn-ctl")), "attach", "lo", "--mitigate", "lo", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("iqn-ctl: error:") and msg in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
