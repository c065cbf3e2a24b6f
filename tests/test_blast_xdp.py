"""bench/blast.c's XDP live-frames sender (``--sender xdp``, bench/xdpgen.py)
sends what it says, and the real agent counts every candidate it sends.

The fast sender builds no packets in user space: blast writes each frame's
header into a map and the generator copies it over a pool page in the kernel,
trimming the frame to its length. A wrong offset, a stale byte left in a
recycled page or a lost slot would mislabel flows or sizes and make every
bench_scale figure taken with it wrong. So: one short run captured with tcpdump
on the receiving veth (every frame's addresses, ports, lengths and IPv4
checksum against blast's count), and one short run into the live agent, whose
kernel candidate count and engine feed must equal blast's candidate count
exactly. Nothing here is timed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from conftest import ROOT, need
from test_agent_live import DEADLINE, need_xdp, poll_until, stop, wait_ready
from test_blast_many import read_pcap

from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import PY
from iqn_lab.testbed import Testbed as Lab

sys.path.insert(0, str(ROOT / "bench"))
import xdpgen  # noqa: E402

FLOWS, PORTS, SIZE, VSIZE = 40, 7, 1250, 1350
OTHER_MAC = "02:00:00:00:00:99"  # the client's stack drops these after XDP has seen them


def build(tmp: Path) -> Path:
    need(shutil.which("gcc") is not None, "needs gcc")
    exe = tmp / "blast"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "bench" / "blast.c")], check=True)
    return exe


def send(lab: Lab, exe: Path, fds: tuple[int, int], dst_mac: str, *kv: str) -> dict[str, float]:
    r = subprocess.run(
        ["ip", "netns", "exec", lab.srv_ns, str(exe), "-m", lab.srv_if, "1",
         f"src_mac={lab.srv_mac}", f"dst_mac={dst_mac}", f"src={lab.srv4}", "dst=198.19.0.0",
         f"flows={FLOWS}", f"ports={PORTS}", f"size={SIZE}", f"vsize={VSIZE}", "servers=3",
         f"xdp_prog={fds[0]}", f"xdp_map={fds[1]}", "workers=4", *kv],
        capture_output=True, text=True, timeout=60, pass_fds=fds)
    assert r.returncode == 0, r.stderr
    return {k: float(v) for k, v in (x.split("=") for x in r.stdout.split())}


def ip_checksum_ok(ip: bytes) -> bool:
    s = sum(int.from_bytes(ip[i:i + 2], "big") for i in range(0, 20, 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


def test_xdp_sender_frames_arrive_intact(tmp_path: Path) -> None:  # noqa: PLR0915
    need_xdp()
    need(shutil.which("tcpdump") is not None, "needs tcpdump")
    exe = build(tmp_path)
    bpf, prog, gmap = xdpgen.load()
    pcap = tmp_path / "cap.pcap"
    with Lab() as lab:
        # veth takes XDP frames only with NAPI on at the receiver: an XDP program does it
        load = ("from bcc import BPF; b = BPF(text='int passer(struct xdp_md *c) { return XDP_PASS; }');"
                f"BPF.attach_xdp({lab.cli_if!r}, b.load_func('passer', BPF.XDP), 1 << 2)")
        subprocess.run(["ip", "netns", "exec", lab.cli_ns, PY, "-c", load], check=True, timeout=120)
        dump = subprocess.Popen(
            ["ip", "netns", "exec", lab.cli_ns, "tcpdump", "-i", lab.cli_if, "-n", "-U", "-s", "64",
             "-w", str(pcap), "udp src port 443"], stderr=subprocess.PIPE, text=True)
        assert dump.stderr is not None
        assert "listening on" in dump.stderr.readline()
        log = tmp_path / "stalls.log"
        said = send(lab, exe, (prog, gmap), lab.cli_mac, "stall=25", "vpps=20", "p=0.1", "gap_us=0",
                    "stall_at=0.1", "stall_for=0.5", "seed=5", f"log={log}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(read_pcap(pcap)) < said["sent"]:
            time.sleep(0.2)
        dump.send_signal(signal.SIGINT)
        tail = dump.communicate(timeout=30)[1]
    del bpf
    assert "\n0 packets dropped by kernel" in tail, tail
    frames = read_pcap(pcap)
    assert len(frames) == said["sent"] == said["candidates"] + said["video"] > 0, (len(frames), said)
    assert said["candidates"] > 0 and said["video"] > 0
    srv = [int(x) for x in lab.srv4.split(".")]
    sizes: Counter[int] = Counter()
    cand_times: dict[int, list[float]] = {}
    for t, fr in frames:
        assert fr[0:6] == bytes.fromhex(lab.cli_mac.replace(":", "")), fr[:12].hex()
        assert fr[6:12] == bytes.fromhex(lab.srv_mac.replace(":", ""))
        assert fr[12:14] == b"\x08\x00" and fr[14] == 0x45 and fr[23] == 17
        assert ip_checksum_ok(fr[14:34]), fr[14:34].hex()
        ip_len = int.from_bytes(fr[16:18], "big")
        udp_len = int.from_bytes(fr[38:40], "big")
        assert udp_len == ip_len - 20
        sport, dport = int.from_bytes(fr[34:36], "big"), int.from_bytes(fr[36:38], "big")
        assert sport == 443
        i = (fr[33] - 0) * PORTS + dport - 10000  # dst 198.19.0.0 + i // PORTS, port 10000 + i % PORTS
        assert fr[30:33] == bytes([198, 19, 0]) and 0 <= i < FLOWS, (fr[30:34].hex(), dport)
        assert list(fr[26:30]) == [*srv[:3], srv[3] + i % 3], (fr[26:30].hex(), i)
        sizes[ip_len + 14] += 1
        if ip_len + 14 == SIZE:
            cand_times.setdefault(i, []).append(t)
    assert sizes == {SIZE: said["candidates"], VSIZE: said["video"]}, (sizes, said)
    # the log: one line per stalling flow that sent, its bursts matching the capture, and its
    # send times (the generator's clock) never after the capture saw the frame (1 ms for the
    # two clocks' conversion); not timed
    logged = {int(x.split()[0]): [float(v) for v in x.split()[1:]] for x in log.read_text().splitlines()}
    assert set(logged) == set(cand_times), (sorted(logged), sorted(cand_times))
    for i, (first, nth, last, bursts) in logged.items():
        ct = sorted(cand_times[i])
        assert len(ct) == 4 * int(bursts), (i, len(ct), bursts)
        assert first <= ct[0] + 1e-3 and nth <= ct[3] + 1e-3 and last <= ct[-1] + 1e-3, (i, ct)
        assert first <= nth <= last


def test_agent_counts_every_xdp_sent_candidate(tmp_path: Path) -> None:
    need_xdp()
    exe = build(tmp_path)
    bpf, prog, gmap = xdpgen.load()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    with Lab() as lab:
        err = (tmp_path / "agent.log").open("w+")
        agent = subprocess.Popen(
            lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(tmp_path / "state"),
                          # no client side: with the forgery guard on no candidate reaches user space
                          "--pairing", "off", "--cap", "0"),
            env=env, stderr=err, text=True)
        sock = sock_path(tmp_path / "run", lab.cli_if)
        try:
            wait_ready(sock, agent)
            said = send(lab, exe, (prog, gmap), OTHER_MAC, f"stall={FLOWS}", "vpps=10", "p=0.2",
                        "gap_us=2000", "seed=9")
            assert said["candidates"] == said["bursts"] * 4 > 0
            st = poll_until(lambda: dict(request(sock, "status", timeout=20.0)),
                            lambda s: s["candidates"] >= said["candidates"]
                            and s["events"] + s["shed"] + s["lost"] >= s["candidates"],
                            timeout=DEADLINE)
        finally:
            stop(agent)
    del bpf
    assert st["candidates"] == said["candidates"], (st, said)
    assert st["events"] == said["candidates"] and st["shed"] == 0 and st["lost"] == 0, st
