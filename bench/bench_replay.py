"""Capture replay speed: `iqn-ctl replay` on a >= 1 M packet capture, beside the
per-packet approaches it replaces.

Baselines, measured in the same run on the same file:
  * pyshark (tshark underneath) running the paper ISP agent's per-packet logic,
    as the paper's agent did - on a 20 k-packet slice, since it is too slow for
    the whole file;
  * a naive per-packet dpkt loop with the same logic, on the whole file.

Run:  .venv/bin/python bench/bench_replay.py   (writes its section of bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _results  # noqa: E402  (bench/ is on sys.path when run as a script)

import iqn_ctl.capture.pcap as pcap_mod  # noqa: E402
from iqn_ctl.capture.pcap import read_candidates  # noqa: E402
from iqn_ctl.capture.pcapwrite import SignalFlow, router_traffic, write_pcap, write_pcapng  # noqa: E402
from iqn_ctl.engine.params import CandidateFilter, SignalParams  # noqa: E402
from iqn_ctl.engine.synth import SignalModel, random_stalls  # noqa: E402
from iqn_ctl.evaluate.replay import replay_capture  # noqa: E402

OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Capture replay"
T0 = 1_700_000_000.0


def make_capture(noise: int, flows: int, span: float, slice_n: int) -> tuple[Path, Path, Path, int]:
    """The capture (pcap and pcapng) and its first ``slice_n`` packets, made once
    and kept in bench/out/."""
    OUT.mkdir(parents=True, exist_ok=True)
    big = OUT / f"replay_{noise}_{flows}f.pcap"
    big_ng = OUT / f"replay_{noise}_{flows}f.pcapng"
    part = OUT / f"replay_{noise}_{flows}f_first{slice_n}.pcap"
    stalls_file = OUT / f"replay_{noise}_{flows}f.stalls"
    if all(p.exists() for p in (big, big_ng, part, stalls_file)):
        return big, big_ng, part, int(stalls_file.read_text())
    rng = np.random.default_rng(2024)
    sig = [
        SignalFlow(f"198.18.0.{10 + i}", f"198.18.1.{100 + i}", 50000 + i,
                   random_stalls(int(span // 40), rng, t0=T0, min_len=1.0, max_gap=30.0))
        for i in range(flows)
    ]
    pk = router_traffic(sig, noise, T0, T0 + span, rng, SignalModel(delay=0.02, jitter=0.004))
    write_pcap(big, pk)
    write_pcapng(big_ng, pk)
    write_pcap(part, pk[:slice_n])
    stalls_file.write_text(str(sum(len(s.stalls) for s in sig)))
    return big, big_ng, part, sum(len(s.stalls) for s in sig)


class PaperAgent:
    """The paper ISP agent's per-packet logic: keep every candidate time; out of
    a stall, start one when >= n fall within 1.5p of now; in a stall, end it when
    fewer than n fall within 4p."""

    def __init__(self, p: float = 0.2, n: int = 4) -> None:
        self.p, self.n = p, n
        self.times: list[float] = []
        self.in_stall = False
        self.start = 0.0
        self.stalls: list[tuple[float, float]] = []

    def candidate(self, now: float) -> None:
        self.times.append(now)
        if not self.in_stall:
            recent = [t for t in self.times if now - t <= 1.5 * self.p]
            if len(recent) >= self.n:
                self.in_stall, self.start = True, now
        else:
            recent = [t for t in self.times if now - t <= 4 * self.p]
            if len(recent) < self.n:
                self.in_stall = False
                self.stalls.append((self.start, now))

    def stall_count(self) -> int:
        """Ended stalls plus one still open at the end of input (as replay counts)."""
        return len(self.stalls) + self.in_stall


def run_pyshark(path: Path, filt: CandidateFilter) -> tuple[int, int]:
    import pyshark

    agents: dict[tuple[str, str, str], PaperAgent] = defaultdict(PaperAgent)
    packets = 0
    cap = pyshark.FileCapture(str(path), keep_packets=False)
    try:
        for pkt in cap:
            packets += 1
            if "UDP" not in pkt:
                continue
            if int(pkt.udp.srcport) != filt.port or not filt.min_size <= int(pkt.length) <= filt.max_size:
                continue
            net = pkt.ipv6 if "IPV6" in pkt else pkt.ip
            agents[(net.src, net.dst, pkt.udp.dstport)].candidate(float(pkt.sniff_timestamp))
    finally:
        cap.close()
    return packets, sum(a.stall_count() for a in agents.values())


def run_dpkt(path: Path, filt: CandidateFilter) -> tuple[int, int]:
    import dpkt

    agents: dict[tuple[bytes, bytes, int], PaperAgent] = defaultdict(PaperAgent)
    packets = 0
    with open(path, "rb") as f:
        for ts, buf in dpkt.pcap.Reader(f):
            packets += 1
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if not isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)):
                continue
            if isinstance(ip, dpkt.ip.IP) and (ip.mf or ip.offset):
                continue
            udp = ip.data
            if not isinstance(udp, dpkt.udp.UDP) or udp.sport != filt.port:
                continue
            if filt.min_size <= len(buf) <= filt.max_size:
                agents[(ip.src, ip.dst, udp.dport)].candidate(float(ts))
    return packets, sum(a.stall_count() for a in agents.values())


def timed(fn, *args):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=int, default=1_000_000, help="non-signal packets")
    ap.add_argument("--flows", type=int, default=20, help="signalling flows")
    ap.add_argument("--span", type=float, default=600.0, help="capture length, seconds")
    ap.add_argument("--slice", type=int, default=20_000, help="packets for the pyshark baseline")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()

    t = time.perf_counter()
    big, big_ng, part, truth = make_capture(args.noise, args.flows, args.span, args.slice)
    print(f"capture {big.relative_to(ROOT)} ({big.stat().st_size / 1e6:.0f} MB) ready in "
          f"{time.perf_counter() - t:.1f} s; {truth} signalled stalls", flush=True)
    params, filt = SignalParams(), CandidateFilter()

    c = read_candidates(big, filt)
    total = c.packets
    runs = []
    for _ in range(args.runs):
        dt, stalls = timed(replay_capture, big, params, "count", filt)
        runs.append(dt)
    replay_s = statistics.median(runs)
    read_s = statistics.median(timed(read_candidates, big, filt)[0] for _ in range(args.runs))
    paper_s, paper_stalls = timed(replay_capture, big, params, "paper", filt)
    read_candidates(big_ng, filt)  # into the page cache
    ng = [timed(replay_capture, big_ng, params, "count", filt) for _ in range(args.runs)]
    ng_s, ng_stalls = statistics.median(x[0] for x in ng), len(ng[0][1])
    # ablation: the same replay with the sequential record walk instead of the lockstep one
    saved = pcap_mod.LOCKSTEP_MIN
    pcap_mod.LOCKSTEP_MIN = 1 << 62
    try:
        seq = [timed(replay_capture, big, params, "count", filt) for _ in range(args.runs)]
    finally:
        pcap_mod.LOCKSTEP_MIN = saved
    seq_s = statistics.median(x[0] for x in seq)
    print(f"replay: {total} packets, {c.candidates} candidates, {len(stalls)} stalls; runs {runs}",
          flush=True)

    dpkt_s, (dpkt_n, dpkt_stalls) = timed(run_dpkt, big, filt)
    print(f"dpkt: {dpkt_n} packets in {dpkt_s:.1f} s, {dpkt_stalls} stalls", flush=True)
    shark_s, (shark_n, shark_stalls) = timed(run_pyshark, part, filt)
    print(f"pyshark: {shark_n} packets in {shark_s:.1f} s, {shark_stalls} stalls", flush=True)

    ours = total / replay_s
    rows = [
        (f"iqn-ctl replay (estimator count, median of {args.runs})", total, replay_s, len(stalls)),
        ("iqn-ctl replay --estimator paper", total, paper_s, len(paper_stalls)),
        (f"iqn-ctl replay, same packets as pcapng (median of {args.runs})", total, ng_s, ng_stalls),
        (f"iqn-ctl replay, sequential record walk (median of {args.runs})", total, seq_s, len(seq[0][1])),
        (f"read_candidates only (median of {args.runs})", total, read_s, None),
        ("dpkt per-packet loop + paper agent logic", dpkt_n, dpkt_s, dpkt_stalls),
        (f"pyshark + paper agent logic ({shark_n // 1000} k-packet slice)", shark_n, shark_s, shark_stalls),
    ]
    lines = [
        "| method | packets | seconds | packets/s | our replay is x faster | stalls found |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, n, s, st in rows:
        rate = n / s
        lines.append(
            f"| {label} | {n:,} | {s:.3f} | {rate:,.0f} | {ours / rate:.2f} | {'-' if st is None else st} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    note = (
        f"Capture: {total:,} packets ({big.stat().st_size / 1e6:.0f} MB pcap), {c.candidates:,} candidates, "
        f"{args.flows} signalling flows with {truth} stalls in {args.span:.0f} s, the rest bulk video "
        "(1,292/1,514 B), acks, IPv6, VLAN, other-port, fragment and ARP noise. "
        f"Stalls found by the baselines on the slice cover only its first "
        f"{args.slice:,} packets. Machine: {platform.machine()}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}.\n\n"
        "Re-run: `.venv/bin/python bench/bench_replay.py` (the capture is generated once into bench/out/)."
    )
    if not args.no_write:
        _results.write_section(SECTION, f"{SECTION}\n\n{table}\n\n{note.strip()}\n")


if __name__ == "__main__":
    main()
