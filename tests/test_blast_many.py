"""bench/blast.c's many-flow mode sends what it says, checked by a real capture.

The live benchmarks (bench/bench_scale.py) trust blast's counters and its
per-stall log (first candidate, n-th of the first burst, last) as the offered
load and the send times latencies are measured from; a sender that miscounts or
mislabels flows would make every figure there wrong. So: a short run on a real
veth pair, tcpdump on the receiving side, and the capture compared with what
blast printed and logged.
"""

from __future__ import annotations

import shutil
import signal
import struct
import subprocess
import time
from collections import defaultdict
from pathlib import Path

from conftest import ROOT, need, need_root

from iqn_lab.testbed import Testbed as Lab

FLOWS, STALL, PORTS, N, P = 30, 12, 7, 4, 0.2
SECS, VPPS, SIZE, VSIZE = 1.2, 10, 1250, 1350
GAP = 0.02  # within a burst: wide enough that the log's n-th candidate cannot be its neighbour


def read_pcap(path: Path) -> list[tuple[float, bytes]]:
    """(time, frame) of every record of a classic pcap file (tcpdump -w)."""
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data)[0]
    unit = {0xA1B2C3D4: 1e-6, 0xA1B23C4D: 1e-9}[magic]
    out, off = [], 24
    while off + 16 <= len(data):
        sec, frac, incl, _orig = struct.unpack_from("<IIII", data, off)
        off += 16
        out.append((sec + frac * unit, data[off:off + incl]))
        off += incl
    return out


def test_many_flow_mode_sends_what_it_says(tmp_path: Path) -> None:
    need_root()
    need(shutil.which("gcc") is not None, "needs gcc")
    need(shutil.which("tcpdump") is not None, "needs tcpdump")
    exe = tmp_path / "blast"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "bench" / "blast.c")], check=True)
    pcap, log = tmp_path / "cap.pcap", tmp_path / "stalls.log"
    with Lab() as lab:
        base = f"198.19.{lab.cli4.split('.')[2]}.0"
        dump = subprocess.Popen(
            ["ip", "netns", "exec", lab.cli_ns, "tcpdump", "-i", lab.cli_if, "-n", "-U", "-s", "64",
             "--time-stamp-precision", "nano", "-w", str(pcap), "udp src port 443"],
            stderr=subprocess.PIPE, text=True)
        assert dump.stderr is not None
        assert "listening on" in dump.stderr.readline()
        r = subprocess.run(
            ["ip", "netns", "exec", lab.srv_ns, str(exe), "-m", lab.srv_if, str(SECS),
             f"src_mac={lab.srv_mac}", f"dst_mac={lab.cli_mac}", f"src={lab.srv4}", f"dst={base}",
             f"flows={FLOWS}", f"stall={STALL}", f"ports={PORTS}", f"n={N}", f"p={P}",
             f"gap_us={GAP * 1e6:.0f}", f"size={SIZE}", f"vsize={VSIZE}", f"vpps={VPPS}",
             "stall_at=0.2", "spread=0.2",
             "stall_for=0.5", "seed=7", f"log={log}"],
            capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        said = {k: float(v) for k, v in (x.split("=") for x in r.stdout.split())}
        deadline = time.monotonic() + 30  # tcpdump has written every frame blast sent
        while time.monotonic() < deadline and (
                pcap.stat().st_size < 24 + said["sent"] * 16 or len(read_pcap(pcap)) < said["sent"]):
            time.sleep(0.2)
        dump.send_signal(signal.SIGINT)
        tail = dump.communicate(timeout=30)[1]
    assert "\n0 packets dropped by kernel" in tail, tail
    frames = read_pcap(pcap)
    assert len(frames) == said["sent"] == said["candidates"] + said["video"], (len(frames), said)
    b0 = [int(x) for x in base.split(".")]
    want = {(f"{b0[0]}.{b0[1]}.{b0[2]}.{b0[3] + i // PORTS}", 10000 + i % PORTS): i for i in range(FLOWS)}
    per: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for t, fr in frames:
        assert fr[12:14] == b"\x08\x00" and fr[23] == 17, fr[:24].hex()
        ip_len = struct.unpack_from("!H", fr, 16)[0]
        sport, dport = struct.unpack_from("!HH", fr, 34)
        dst = ".".join(map(str, fr[30:34]))
        assert sport == 443 and (dst, dport) in want, (dst, dport)
        per[want[dst, dport]].append((t, ip_len + 14))
    assert set(per) == set(range(FLOWS))  # every flow sent video at least
    logged = {int(x.split()[0]): x.split()[1:] for x in log.read_text().splitlines()}
    assert set(logged) <= set(range(STALL)) and len(logged) >= STALL - 1  # a 0.5 s stall holds 2-3 bursts
    cands = 0
    for i, pkts in per.items():
        sizes = [s for _, s in pkts]
        assert set(sizes) <= {SIZE, VSIZE}
        ct = [t for t, s in pkts if s == SIZE]
        cands += len(ct)
        if i >= STALL or i not in logged:
            assert ct == [] and len(sizes) == round(SECS * VPPS), (i, sizes)
            continue
        first, nth, last, bursts = (float(x) for x in logged[i])
        assert len(ct) == N * int(bursts), (i, len(ct), bursts)
        # blast's log names the right frames. Causal, not timed: blast reads the clock just before
        # the sendmmsg that carries a frame, and the frame is stamped on the veth during that call;
        # a burst's frames are GAP apart, so each goes in a call of its own unless the sender ran
        # late and sent the previous one in the same call (then they arrive together)
        for logged_t, k in ((first, 0), (nth, N - 1), (last, len(ct) - 1)):
            assert logged_t <= ct[k] + 1e-6, (i, k, logged_t, ct[k])
            assert k == 0 or ct[k - 1] < logged_t or ct[k] - ct[k - 1] < GAP / 2, (i, k, logged_t, ct[k - 1])
        # no video between the stall's first and last candidate (frames are captured in send order)
        idx = [j for j, (_, s) in enumerate(pkts) if s == SIZE]
        assert all(s == SIZE for _, s in pkts[idx[0]:idx[-1] + 1]), i
    assert cands == said["candidates"] and said["bursts"] * N == cands
