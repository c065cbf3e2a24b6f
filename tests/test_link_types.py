"""Replay reads the link types operators capture with (issue 18, part 1).

``tcpdump -i any`` writes Linux cooked v2 (276), ``-y LINUX_SLL`` v1 (113);
tun, WireGuard and PPP devices raw IP (101, or 12/14, 228/229); BSD loopback
NULL/LOOP (0/108); dumpcap over several interfaces a pcapng that mixes them;
and captures are often gzip'd. Each must give the candidates tshark's reading
of the same file gives, with the size band on "IP length + 14" (what the frame
would be on an Ethernet), and the same candidates and stalls as an Ethernet
capture of the same traffic.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import need, need_root
from test_replay_capture import _assert_one_line_error, _await_stderr

from iqn_ctl.capture.frames import udp_frame
from iqn_ctl.capture.pcap import CaptureError, read_candidates
from iqn_ctl.capture.pcapwrite import Interface, Packet, write_pcap, write_pcapng
from iqn_ctl.engine.params import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, SignalParams
from iqn_ctl.engine.synth import signal_times
from iqn_lab.testbed import Testbed as Lab

P = SignalParams().p
T0 = 1_700_000_000.0
#: a candidate on the lower edge of the band, one on the upper; frames one byte
#: outside each edge: a size computed off by anything shows as a wrong count
EDGES = {40001: DEFAULT_MIN_SIZE, 40002: DEFAULT_MAX_SIZE, 40003: DEFAULT_MIN_SIZE - 1,
         40004: DEFAULT_MAX_SIZE + 1}  # fmt: skip

Cands = list[tuple[float, int]]


def _ours(path: Path) -> Cands:
    """(time, destination port) of every candidate, by the replay's reader."""
    c = read_candidates(path)
    dport = [int(re.sub(r".*:", "", label)) for label, _ in c.labels]
    return sorted((float(t), dport[int(i)]) for t, i in zip(c.times, c.flow_ids, strict=True))


def _tshark(path: Path, ethernet: bool) -> Cands:
    """The same, by tshark's dissectors: frame length for Ethernet captures, the IP
    packet's length plus 14 for any other link (the documented size rule)."""
    fields = ["frame.time_epoch", "udp.dstport", "frame.len", "ip.len", "ipv6.plen"]
    res = subprocess.run(
        ["tshark", "-n", "-r", str(path), "-Y", "udp.srcport == 443", "-T", "fields",
         *(a for f in fields for a in ("-e", f))],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out: Cands = []
    for line in res.stdout.splitlines():
        t, dport, flen, ip4, ip6 = line.split("\t")
        size = int(flen) if ethernet else (int(ip4) + 14 if ip4 else int(ip6) + 40 + 14)
        if DEFAULT_MIN_SIZE <= size <= DEFAULT_MAX_SIZE:
            out.append((float(t), int(dport)))
    return sorted(out)


def _same(a: Cands, b: Cands, what: object) -> None:
    assert [d for _, d in a] == [d for _, d in b], what
    assert np.allclose([t for t, _ in a], [t for t, _ in b], rtol=0, atol=2e-6), what


def _stalls(cli: list[str], path: Path) -> dict[int, dict[str, float]]:
    res = subprocess.run([*cli, "replay", str(path), "--json"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in res.stdout.splitlines()]
    return {int(r["flow"].rsplit(":", 1)[1]): r for r in recs}


def _same_stalls(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], what: object) -> None:
    assert sorted(a) == sorted(b), what
    for k in a:
        for key in ("start", "end", "duration"):
            assert a[k][key] == pytest.approx(b[k][key], abs=1e-5), (what, k, key)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGINT)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_real_captures_of_any_cooked_mixed_and_gzip(tmp_path: Path, cli_python: list[str]) -> None:
    """One traffic, captured at once by tcpdump on the Ethernet veth, tcpdump on
    ``any`` (SLL2) and ``any -y LINUX_SLL``, and dumpcap over the veth and ``any``
    (one pcapng, two link types, disjoint filters), plus a gzip'd copy."""
    need_root()
    need(bool(shutil.which("tcpdump") and shutil.which("dumpcap") and shutil.which("tshark")),
         "tcpdump, dumpcap and tshark (setup.sh)")  # fmt: skip
    rng = np.random.default_rng(7)
    stall4, stall6 = (0.0, 1.6), (0.3, 1.2)
    times = {
        40001: signal_times([stall4], rng=rng),
        40002: signal_times([stall6], rng=rng),
        40003: np.arange(0.0, 1.0, 1 / 100),
        40004: np.arange(0.005, 1.0, 1 / 100),
    }
    frames = sum(t.size for t in times.values())
    eth, sll2, sll, mix = (tmp_path / n for n in ("eth.pcap", "sll2.pcap", "sll.pcap", "mix.pcapng"))
    with Lab() as lab:
        only, count = "udp src port 443", str(frames)
        ns = ["ip", "netns", "exec", lab.cli_ns]
        td = ["tcpdump", "-Z", "root", "-s", "0", "-U", "--immediate-mode", "-c", count]
        procs = [
            subprocess.Popen([*ns, *td, "-i", lab.cli_if, "-w", str(eth), only],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
            subprocess.Popen([*ns, *td, "-i", "any", "-w", str(sll2), only],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
            subprocess.Popen([*ns, *td, "-i", "any", "-y", "LINUX_SLL", "-w", str(sll), only],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
            subprocess.Popen([*ns, "dumpcap", "-q", "-c", count, "-w", str(mix),
                              "-i", lab.cli_if, "-f", f"{only} and not dst port 40002",
                              "-i", "any", "-f", f"{only} and dst port 40002"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
        ]  # fmt: skip
        try:
            for p in procs[:3]:
                _await_stderr(p, b"listening on ")
            _await_stderr(procs[3], b"File: ")
            flows = [
                {"name": str(port), "src": lab.srv6 if port == 40002 else lab.srv4,
                 "dst": lab.cli6 if port == 40002 else lab.cli4, "dport": port,
                 "frame": EDGES[port], "times": t.tolist()}
                for port, t in times.items()
            ]  # fmt: skip
            snd = lab.send({"lead": 0.3, "flows": flows})
            _out, err = snd.communicate(timeout=30)
            assert snd.returncode == 0, err
            for p in procs:
                rc = p.wait(timeout=30)
                assert rc == 0, (p.args, rc, p.stderr.read() if p.stderr else b"")
        finally:
            _stop(procs)
    gz = tmp_path / "sll2.pcap.gz"
    gz.write_bytes(gzip.compress(sll2.read_bytes()))

    # the tools really wrote the link types under test
    assert read_candidates(eth).linktypes == [1]
    assert read_candidates(sll2).linktypes == [276]
    assert read_candidates(sll).linktypes == [113]
    # dumpcap opens `any` as Linux cooked v1 (tcpdump as v2): two link types in one file
    assert read_candidates(mix).linktypes in ([1, 113], [1, 276])
    ref = _ours(eth)
    assert ref == _tshark(eth, ethernet=True)
    # exactly the in-band frames, at both edges, none just outside
    assert sorted({d for _, d in ref}) == [40001, 40002]
    assert len(ref) == times[40001].size + times[40002].size
    ref_stalls = _stalls(cli_python, eth)
    assert sorted(ref_stalls) == [40001, 40002]
    for port, (a, b) in ((40001, stall4), (40002, stall6)):
        assert abs(ref_stalls[port]["duration"] - (b - a)) < 1.5 * P, ref_stalls[port]
    for path in (sll2, sll, mix, gz):
        got = _ours(path)
        assert got == _tshark(path, ethernet=False), path
        _same(got, ref, path)  # one skb, one kernel timestamp, every socket
        _same_stalls(_stalls(cli_python, path), ref_stalls, path)


def _crafted() -> list[Packet]:
    """Candidates of both families at the band's edges, frames one byte outside
    it, another port in band, over a few seconds with two stalls."""
    rng = np.random.default_rng(11)
    v4 = ("198.18.0.10", "198.18.1.2")
    v6 = ("fd00:198:18::10", "fd00:198:18::2")
    out: list[Packet] = []
    for port, size in EDGES.items():
        src, dst = v6 if port in (40002, 40004) else v4
        ts = signal_times([(0.0, 1.6)] if port == 40001 else [(0.5, 2.5)], rng=rng)
        if port >= 40003:
            ts = np.arange(0.0, 2.0, 0.05)
        out += [Packet(T0 + t, udp_frame(src, dst, 443, port, size)) for t in ts.tolist()]
    out += [Packet(T0 + 0.01 * k, udp_frame(*v4, 8443, 40005, 1200)) for k in range(100)]
    out.sort(key=lambda p: p.time)
    return out


_AF = {0: ("<", 2, 30), 108: (">", 2, 24)}  # NULL: macOS byte order and AF_INET6; LOOP: OpenBSD's


def _l3(pk: Packet, linktype: int) -> Packet:
    """The frame as a device of ``linktype`` would have captured it."""
    ip = pk.frame[14:]
    if linktype in _AF:
        order, af4, af6 = _AF[linktype]
        ip = struct.pack(order + "I", af4 if ip[0] >> 4 == 4 else af6) + ip
    return Packet(pk.time, ip, pk.iface)


@pytest.mark.parametrize("variant", ["raw101", "raw12", "raw14", "ipv4-228", "null0", "loop108",
                                     "raw101-snaplen", "pcapng-raw+null"])  # fmt: skip
def test_raw_ip_and_loopback_captures(tmp_path: Path, cli_python: list[str], variant: str) -> None:
    """Raw IP and NULL/LOOP, written by the project's writer from the frames of an
    Ethernet capture: the same candidates as tshark and as the Ethernet capture."""
    need(bool(shutil.which("tshark")), "tshark (setup.sh)")
    pk = _crafted()
    if variant == "ipv4-228":  # raw IPv4 holds IPv4 only
        pk = [p for p in pk if p.frame[14] >> 4 == 4]
    eth = tmp_path / "eth.pcap"
    write_pcap(eth, pk)
    path = tmp_path / f"{variant}.cap"
    if variant == "pcapng-raw+null":
        # alternate packets on a raw-IP interface and a NULL one
        mixed = [_l3(Packet(p.time, p.frame, i % 2), 101 if i % 2 == 0 else 0) for i, p in enumerate(pk)]
        write_pcapng(path, mixed, interfaces=(Interface(linktype=101), Interface(linktype=0)))
        assert read_candidates(path).linktypes == [0, 101]
    else:
        lt = {"raw101": 101, "raw12": 12, "raw14": 14, "ipv4-228": 228, "null0": 0, "loop108": 108,
              "raw101-snaplen": 101}[variant]  # fmt: skip
        snap = 64 if variant.endswith("snaplen") else 262144
        write_pcap(path, [_l3(p, lt) for p in pk], linktype=lt, snaplen=snap)
        assert read_candidates(path).linktypes == [lt]
    ref = _ours(eth)
    assert ref == _tshark(eth, ethernet=True)
    assert {d for _, d in ref} == ({40001} if variant == "ipv4-228" else {40001, 40002})
    got = _ours(path)
    if not variant.startswith(("raw12", "raw14")):  # tshark 4.0 reads 12/14 as other links
        assert got == _tshark(path, ethernet=False)
    _same(got, ref, variant)
    _same_stalls(_stalls(cli_python, path), _stalls(cli_python, eth), variant)


def test_gzip_damage_is_one_line(tmp_path: Path, cli_python: list[str]) -> None:
    """A cut or garbled gzip, or a gzip'd non-capture, ends in one line naming
    the file; a cut one reads with truncated_ok (a still-running tcpdump | gzip)."""
    pcap = tmp_path / "c.pcap"
    write_pcap(pcap, _crafted())
    whole = gzip.compress(pcap.read_bytes())
    cut = tmp_path / "cut.pcap.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    run = [*cli_python, "replay"]

    def one(path: Path, *needles: str) -> None:
        res = subprocess.run([*run, str(path)], capture_output=True, text=True, timeout=120)
        _assert_one_line_error(res, str(path), *needles)

    one(cut, "truncated gzip stream")
    partial = read_candidates(cut, truncated_ok=True)
    assert 0 < partial.candidates < read_candidates(pcap).candidates
    bad = tmp_path / "bad.gz"
    bad.write_bytes(whole[:10] + bytes(len(whole) - 10))
    one(bad, "garbled gzip stream")
    text = tmp_path / "text.gz"
    text.write_bytes(gzip.compress(b"hello, not a capture" * 1000))
    one(text, "not a pcap or pcapng capture")
    empty = tmp_path / "empty.gz"
    empty.write_bytes(gzip.compress(b""))
    one(empty, "empty file")
    with pytest.raises(CaptureError, match="link type 105"):
        wifi = tmp_path / "wifi.pcap"
        write_pcap(wifi, [Packet(T0, bytes(60))], linktype=105)
        read_candidates(wifi)
