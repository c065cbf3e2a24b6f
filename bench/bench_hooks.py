"""Per-packet cost of IQN's two entries, XDP (``iqn_xdp``) and TC (``iqn_tc``),
on an Ethernet and on a layer-3 build, each against an empty program of its
own type (XDP_PASS; a TC classifier returning TC_ACT_UNSPEC) loaded the same
way and run on the same bytes in the same run: BPF_PROG_TEST_RUN, timed by the
calling thread's CPU time (see bench_xdp.py for why). A live reader drains
the ring while candidates run, as the agent does.

    sudo .venv/bin/python bench/bench_hooks.py [--repeat 1000000] [--rounds 7] [--no-write]

Prints a markdown table and replaces the "## Hooks: XDP and TC entries"
section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import statistics
import struct
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _results  # noqa: E402
from bench_xdp import RING_PAGES, drain, frames  # noqa: E402

from iqn_ctl.engine.params import CandidateFilter  # noqa: E402
from iqn_ctl.live.bpf_testrun import TestRunner  # noqa: E402

SECTION = "## Hooks: XDP and TC entries"
EMPTY_SRC = (b"int empty_xdp(struct xdp_md *ctx) { return XDP_PASS; }\n"
             b"int empty_tc(struct __sk_buff *skb) { return -1; }\n")
VERDICT = {"xdp": 2, "tc": 0xFFFFFFFF}  # XDP_PASS, TC_ACT_UNSPEC
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


def measure(runner: TestRunner, frame: bytes, repeat: int, hook: str) -> float:
    t0 = time.thread_time_ns()
    verdict, _ = runner.run(frame, repeat)
    cpu = time.thread_time_ns() - t0
    if verdict != VERDICT[hook]:
        raise SystemExit(f"bench: the {hook} program returned {verdict}")
    return cpu / repeat


#: --repeat, --cand-repeat, --rounds of this bench and bench_pppoe.py
DEFAULTS = (1_000_000, 65536, 7)


def bench_args(doc: str) -> argparse.Namespace:
    """The flags of the entry benches (this one, bench_pppoe.py), checked; they need root."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=DEFAULTS[0])
    ap.add_argument("--cand-repeat", type=int, default=DEFAULTS[1])
    ap.add_argument("--rounds", type=int, default=DEFAULTS[2])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: error: needs root (BPF_PROG_TEST_RUN): run with sudo")
    if min(args.repeat, args.cand_repeat, args.rounds) < 1:
        raise SystemExit("bench: error: --repeat, --cand-repeat and --rounds must be positive")
    return args


def rerun(script: str, args: argparse.Namespace) -> str:
    """The command that repeats this run, for the RESULTS.md section."""
    cmd = f"sudo .venv/bin/python bench/{script}"
    if (args.repeat, args.cand_repeat, args.rounds) != DEFAULTS:
        cmd += f" --repeat {args.repeat} --cand-repeat {args.cand_repeat} --rounds {args.rounds}"
    return cmd


def empty_programs() -> tuple[Any, dict[str, TestRunner]]:
    """The baseline: an empty XDP program and an empty TC classifier, loaded with bcc
    as IQN's are; the bcc object (to clean up) and a runner per hook."""
    from bcc import BPF

    b = BPF(text=EMPTY_SRC)
    return b, {"xdp": TestRunner(b.load_func(b"empty_xdp", BPF.XDP).fd),
               "tc": TestRunner(b.load_func(b"empty_tc", BPF.SCHED_CLS).fd)}


def main() -> None:
    args = bench_args(__doc__)

    from iqn_ctl.live.datapath import Datapath

    filt = CandidateFilter()
    empty_bpf, empty = empty_programs()
    tun = f"iqbh{uuid.uuid4().hex[:8]}"
    tun_fd = os.open("/dev/net/tun", os.O_RDWR)  # the device lives as long as this fd
    fcntl.ioctl(tun_fd, TUNSETIFF, struct.pack("16sH", tun.encode(), IFF_TUN | IFF_NO_PI))
    dps = {"ethernet": Datapath("lo", filt, ring_pages=RING_PAGES),
           "l3": Datapath(tun, filt, ring_pages=RING_PAGES)}
    stop = threading.Event()
    readers = [threading.Thread(target=drain, args=(d, stop), daemon=True) for d in dps.values()]
    for r in readers:
        r.start()
    rows = [(label, frame, kind) for label, frame, kind in frames(filt)
            if "VLAN" not in label and "IPv6" not in label]
    cells: dict[tuple[str, str, str], tuple[list[float], list[float]]] = {}
    t0 = time.monotonic()
    try:
        for _ in range(args.rounds):
            for label, frame, kind in rows:
                repeat = args.cand_repeat if kind == "candidate" else args.repeat
                for link, dp in dps.items():
                    data = frame if link == "ethernet" else frame[14:]
                    for hook in ("xdp", "tc"):
                        iqn = TestRunner(dp.prog_fd if hook == "xdp" else dp.tc_prog_fd)
                        b, c = cells.setdefault((label, link, hook), ([], []))
                        b.append(measure(empty[hook], data, repeat, hook))
                        c.append(measure(iqn, data, repeat, hook))
        lost = sum(dp.counters()["lost"] for dp in dps.values())
    finally:
        stop.set()
        for r in readers:
            r.join()
        for dp in dps.values():
            dp.close()
        os.close(tun_fd)
        empty_bpf.cleanup()
    elapsed = time.monotonic() - t0
    lines = ["| frame | link | hook | empty ns/pkt | IQN ns/pkt | ratio | IQN minus empty ns |",
             "|---|---|---|---:|---:|---:|---:|"]
    for (label, link, hook), (b, c) in cells.items():
        mb, mc = statistics.median(b), statistics.median(c)
        lines.append(f"| {label} | {link} | {hook} | {mb:.2f} | {mc:.2f} | {mc / mb:.2f}x | {mc - mb:+.1f} |")
    cpu = _results.cpu_model()
    summary = (f"Median of {args.rounds} calls x {args.repeat} runs ({args.cand_repeat} for the candidate); "
               f"kernel {platform.release()}, {cpu}, {os.cpu_count()} CPUs; {elapsed:.1f} s; ring records "
               f"lost: {lost}. Layer-3 rows run the same frames without their Ethernet header.")
    table = "\n".join(lines)
    print(table)
    print()
    print(summary)
    if not args.no_write:
        cmd = rerun("bench_hooks.py", args)
        body = (f"{SECTION}\n\nThe XDP and the TC entry of `iqn_xdp.c`, Ethernet and layer-3 builds, each "
                "against an empty program of its type on the same bytes, BPF_PROG_TEST_RUN, same run "
                f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Re-run: `{cmd}`\n\n"
                f"{table}\n\n{summary}\n")
        _results.write_section(SECTION, body)


if __name__ == "__main__":
    main()
