"""PPPoE session frames (issue 20 item 6): ethertype 0x8864, PPP protocol
0x0021 (IPv4) or 0x0057 (IPv6), after up to two VLAN tags. The size band is
measured on the inner IP packet (its PPPoE header's length less the 2-byte
PPP protocol) plus 14, as on a layer-3 device.

Checked three ways: crafted frames through BPF_PROG_TEST_RUN on both kernel
entries (XDP and TC), decided like the Python twin; a real veth carrying
PPPoE session frames from a raw socket in the testbed's sender namespace,
with the live agent (forgery guard on: the client's requests are PPPoE
frames too); and a pcap of PPPoE frames replayed with ``iqn-ctl replay``,
checked against tshark's PPPoE dissector.

No real pppoe-server/pppd pair: the kernel here is built without PPP
(CONFIG_PPP is not set, no /dev/ppp), so frames come from a raw socket.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import need
from test_agent_live import STALL, P, burst_times, need_xdp, poll_until, stop, wait_ready
from test_xdp_prog import _need_bpf

from iqn_ctl.capture.classify import classify_frames
from iqn_ctl.capture.frames import udp_frame
from iqn_ctl.capture.pcapwrite import Packet, write_pcap
from iqn_ctl.engine.params import CandidateFilter
from iqn_ctl.live import bpf_testrun, layout
from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import Testbed

FILT = CandidateFilter()
LO, HI = FILT.min_size, FILT.max_size
S4, C4, S6, C6 = "198.18.0.1", "198.18.0.2", "2001:db8::1", "2001:db8::2"
PPPOE = 8  # session header + PPP protocol
XDP_PASS, TC_ACT_UNSPEC = 2, 0xFFFFFFFF


def p4(n: int, **kw: Any) -> bytes:
    """An IPv4 UDP datagram from 443 in a PPPoE session frame of ``n`` bytes."""
    return udp_frame(S4, C4, 443, 51234, frame_len=n, pppoe=kw.pop("pppoe", 0x1234), **kw)


def p6(n: int, **kw: Any) -> bytes:
    return udp_frame(S6, C6, 443, 51234, frame_len=n, pppoe=kw.pop("pppoe", 0x1234), **kw)


def patch(frame: bytes, off: int, data: bytes) -> bytes:
    return frame[:off] + data + frame[off + len(data):]


#: the frame whose inner IP packet + 14 is exactly ``band`` bytes
def at_band(band: int, mk: Any = p4, vlans: tuple[int, ...] = ()) -> bytes:
    return mk(band - 14 + 14 + PPPOE + 4 * len(vlans), vlans=vlans)


# outcome: "cand" (a candidate), "bad" (a parse error), "other" (neither)
CRAFTED: dict[str, tuple[bytes, str]] = {
    "v4": (p4(1200), "cand"),
    "v6": (p6(1200), "cand"),
    "vlan v4": (p4(1200, vlans=(7,)), "cand"),
    "qinq v6": (p6(1200, vlans=(7, 8)), "cand"),
    # the band is on the IP packet + 14: the PPPoE header and the tags do not count
    "band min-1": (at_band(LO - 1), "other"),
    "band min": (at_band(LO), "cand"),
    "band max": (at_band(HI), "cand"),
    "band max+1": (at_band(HI + 1), "other"),
    "band max, vlan v6": (at_band(HI, p6, (7,)), "cand"),
    "band max+1, qinq v6": (at_band(HI + 1, p6, (7, 8)), "other"),
    "lcp": (patch(p4(1200), 20, b"\xc0\x21"), "other"),
    "ipcp": (patch(p4(1200), 20, b"\x80\x21"), "other"),
    "version 2": (patch(p4(1200), 14, b"\x21"), "other"),
    "code padi": (patch(p4(1200), 15, b"\x09"), "other"),
    "ipv4 says ipv6": (patch(p4(1200), 20, b"\x00\x57"), "bad"),
    "length past the frame": (patch(p4(1200), 18, struct.pack("!H", 1200)), "bad"),
    "length short of the frame (padding)": (patch(p4(1200), 18, struct.pack("!H", 1200 - 22 - 10)), "cand"),
    "wrong sport": (udp_frame(S4, C4, 444, 51234, frame_len=1200, pppoe=1), "other"),
}


@pytest.fixture(scope="module")
def dp() -> Iterator[Any]:
    _need_bpf()
    from iqn_ctl.live.datapath import Datapath

    with Datapath("lo", FILT) as d:
        yield d


def kernel_outcome(d: Any, runner: bpf_testrun.TestRunner, frame: bytes, hook: str) -> str:
    before = d.counters()
    verdict, _ = runner.run(frame)
    assert verdict == (XDP_PASS if hook == "xdp" else TC_ACT_UNSPEC)
    after = d.counters()
    dc, de = (after[k] - before[k] for k in ("candidates", "parse_errors"))
    assert dc + de <= 1, (dc, de)
    return "cand" if dc else "bad" if de else "other"


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_crafted_pppoe_frames_on_both_entries(dp: Any, hook: str) -> None:
    """Each crafted frame's outcome on the kernel entry (the band edges show
    the band length is the inner IP packet + 14, never the frame's); the Python
    twin keeps exactly the candidates, with that band length; every candidate
    reaches user space in a burst record."""
    runner = bpf_testrun.TestRunner(dp.prog_fd if hook == "xdp" else dp.tc_prog_fd)
    dp.poll(0)
    got = {name: kernel_outcome(dp, runner, frame, hook) for name, (frame, _) in CRAFTED.items()}
    assert got == {name: want for name, (_, want) in CRAFTED.items()}
    frames = [f for f, _ in CRAFTED.values()]
    py = classify_frames(frames, [float(i) for i in range(len(frames))], FILT)
    names = list(CRAFTED)
    assert [names[i] for i in py.frame_index] == [n for n in names if got[n] == "cand"]
    assert py.sizes.tolist()[:4] == [1200 - PPPOE, 1200 - PPPOE, 1200 - PPPOE - 4, 1200 - PPPOE - 8]
    time.sleep(0.02)  # short bursts still open are read once their gap has passed
    assert len(dp.poll(10)) == len(py.frame_index)


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_truncated_pppoe_frames(dp: Any, hook: str) -> None:
    """Every cut of a PPPoE candidate (plain and behind a VLAN tag) from the
    Ethernet header to one byte short: never a candidate, and a parse error
    wherever the cut falls, headers or payload (the PPPoE length says more than
    the frame holds). The Python twin keeps none of them either."""
    runner = bpf_testrun.TestRunner(dp.prog_fd if hook == "xdp" else dp.tc_prog_fd)
    for base in (p4(1200), p6(1200, vlans=(5,))):
        cuts = [*range(14, 120), *range(len(base) - 40, len(base))]
        outcomes = set()
        for n in cuts:
            try:
                outcomes.add(kernel_outcome(dp, runner, base[:n], hook))
            except bpf_testrun.BpfError:
                assert hook == "tc"  # the skb test run refuses some frames shorter than it expects
        assert outcomes == {"bad"}, outcomes
        py = classify_frames([base[:n] for n in cuts], [0.0] * len(cuts), FILT)
        assert py.candidates == 0 and py.undecodable == len(cuts)
    dp.poll(0)


def test_pppoe_fuzz_decides_like_the_python_twin(dp: Any) -> None:
    """PPPoE candidates mutated in their PPPoE, IP and UDP headers and cut: the
    XDP entry and the classifier agree frame by frame, and the burst records'
    flows are the classifier's, in order."""
    rng = np.random.default_rng(2020)
    bases = [p4(1200), p6(1250), p4(1296, vlans=(3,)), p6(LO + PPPOE, vlans=(3, 4)), p4(HI + PPPOE + 1)]
    hot = [*range(12, 24), *range(26, 30), 36, 37, 42, 43, 60, 61]
    frames = []
    for i in range(3000):
        f = bytearray(bases[i % len(bases)])
        for _ in range(int(rng.integers(1, 3))):
            off = min(int(rng.choice(hot)) + int(rng.choice([0, 0, 4, 8])), len(f) - 1)
            f[off] = int(rng.choice([0x00, 0x11, 0x21, 0x57, 0x64, 0x88, 0xFF, int(rng.integers(256))]))
        if rng.random() < 0.2:
            del f[int(rng.integers(14, len(f))):]
        frames.append(bytes(f))
    runner = bpf_testrun.TestRunner(dp.prog_fd)
    time.sleep(0.02)  # an open burst another test left is taken once its gap has passed
    dp.poll(0)
    kernel: list[int] = []
    stamped: list[tuple[bytes, float]] = []
    for i, f in enumerate(frames):
        if kernel_outcome(dp, runner, f, "xdp") == "cand":
            kernel.append(i)
        if i % 1024 == 0:
            stamped += dp.poll(0)
    time.sleep(0.02)  # short bursts still open are read once their gap has passed
    stamped += dp.poll(10)
    labels = [layout.decode_key(k).label for k, _ in sorted(stamped, key=lambda e: e[1])]
    py = classify_frames(frames, [float(i) for i in range(len(frames))], FILT)
    assert len(kernel) > 300, "the fuzz must produce candidates"
    assert py.frame_index.tolist() == kernel
    assert [py.labels[int(f)][0] for f in py.flow_ids] == labels


def test_pppoe_capture_replayed(tmp_path: Path, cli_python: list[str]) -> None:
    """A capture of PPPoE session frames (IPv4 plain, IPv6 behind a VLAN tag,
    one cut by the snaplen) gives one stall per signalled flow, the same as the
    same signal without PPPoE; tshark's dissector reads the frames as PPPoE
    session frames carrying UDP from 443, as many as the classifier counts."""
    rng = np.random.default_rng(5)
    from iqn_ctl.engine.synth import SignalModel, signal_times

    t0 = 1_700_000_000.0
    times = {name: [float(t) for t in signal_times([(t0 + k, t0 + k + 2.0)], SignalModel(), rng)]
             for k, name in enumerate(("a", "b"))}
    pk, plain = [], []
    for t in times["a"]:
        pk.append(Packet(t, udp_frame(S4, C4, 443, 40001, frame_len=1250 + PPPOE, pppoe=0x11)))
        plain.append(Packet(t, udp_frame(S4, C4, 443, 40001, frame_len=1250)))
    for t in times["b"]:
        pk.append(Packet(t, udp_frame(S6, C6, 443, 40002, frame_len=1288 + PPPOE + 4, vlans=(7,),
                                      pppoe=0x22)))
        plain.append(Packet(t, udp_frame(S6, C6, 443, 40002, frame_len=1288, vlans=(7,))))  # tag counts
    # bulk in the same session: 1,292-byte IP packets, outside the band whatever the frame says
    pk += [Packet(t0 + i * 0.01, udp_frame(S4, C4, 443, 40001, frame_len=1292 - 14 + 14 + PPPOE,
                                           pppoe=0x11)) for i in range(50)]
    pk.sort(key=lambda p: p.time)
    plain.sort(key=lambda p: p.time)
    cap, ref, cut = tmp_path / "pppoe.pcap", tmp_path / "plain.pcap", tmp_path / "cut.pcap"
    write_pcap(cap, pk)
    write_pcap(ref, plain)
    write_pcap(cut, pk, snaplen=96)  # headers kept, payload cut: the original length decides

    def stalls(path: Path) -> list[dict[str, Any]]:
        out = subprocess.run([*cli_python, "replay", str(path), "--json"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return [json.loads(x) for x in out.stdout.splitlines()]

    got, want = stalls(cap), stalls(ref)
    assert len(got) == 2 and {s["flow"] for s in got} == {
        f"{S4}:443>{C4}:40001", f"[{S6}]:443>[{C6}]:40002"}
    assert got == want
    assert stalls(cut) == want
    if shutil.which("tshark"):
        out = subprocess.run(["tshark", "-n", "-r", str(cap), "-Y", "pppoes && udp.srcport == 443",
                              "-T", "fields", "-e", "pppoe.session_id", "-e", "udp.dstport"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        rows = [ln.split("\t") for ln in out.stdout.splitlines()]
        assert len(rows) == len(pk)
        assert sum(r == ["0x0011", "40001"] for r in rows) == len(times["a"]) + 50
    else:
        need(False, "needs tshark (bash scripts/setup.sh)")


def test_pppoe_live_on_a_veth(tmp_path: Path) -> None:
    """The live agent (XDP on a veth, forgery guard on) infers a stall from a
    signal sent as PPPoE session frames from a raw socket in the sender's
    namespace (IPv4 plain; IPv6 behind a VLAN tag, at the band's top: a
    1,300-byte frame), the client's requests going out as PPPoE frames too;
    every candidate paired, none lost."""
    need_xdp()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    with Testbed() as lab:
        agent = subprocess.Popen(lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(tmp_path / "s")),
                                 env=env, stderr=subprocess.PIPE, text=True)
        try:
            sock = sock_path(tmp_path / "run", lab.cli_if)
            wait_ready(sock, agent)
            spec = {"lead": 0.3, "flows": [
                {"name": "v4", "src": lab.srv4, "dst": lab.cli4, "dport": 40021, "frame": 1250 + PPPOE,
                 "pppoe": 0x0101, "times": burst_times(0.0, 21)},
                {"name": "v6", "src": lab.srv6, "dst": lab.cli6, "dport": 40022, "vlan": lab.vlan_id,
                 "frame": HI + PPPOE + 4, "pppoe": 0x0102, "times": burst_times(0.2, 22)},
            ]}
            snd = lab.send(spec)
            out, err = snd.communicate(timeout=60)
            assert snd.returncode == 0, err
            got = json.loads(out)
            sent = got["sent"]
            total = sum(len(v) for v in sent.values())
            st = poll_until(lambda: request(sock, "status"),
                            lambda s: s["events"] + s["lost"] + s["unpaired"] >= total
                            and s["stalls_ended"] >= 2)
            assert (st["candidates"], st["events"], st["lost"], st["unpaired"]) == (total, total, 0, 0), st
            assert st["client_packets"] >= total
            rows = subprocess.run(lab.agent_cmd("stalls", "--json", "--state-dir", str(tmp_path / "s")),
                                  env=env, capture_output=True, text=True, timeout=60).stdout
            stalls = sorted((json.loads(x) for x in rows.splitlines()), key=lambda s: s["flow"])
        finally:
            err = stop(agent)
    assert [s["flow"] for s in stalls] == sorted([f"{lab.srv4}:443>{lab.cli4}:40021",
                                                  f"[{lab.srv6}]:443>[{lab.cli6}]:40022"]), err
    plan = {f["name"]: f["times"] for f in spec["flows"]}
    for s in stalls:  # placed and sized like the signal actually sent (test_agent_live.check_stall)
        name = "v4" if s["flow"].endswith("40021") else "v6"
        lag_first = sent[name][0] - (got["t0"] + plan[name][0])
        lag_last = sent[name][-1] - (got["t0"] + plan[name][-1])
        assert s["start"] == pytest.approx(sent[name][0] - P, abs=0.1)
        assert s["duration"] == pytest.approx(STALL + lag_last - lag_first, abs=0.3)
