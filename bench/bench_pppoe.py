"""What parsing PPPoE session frames costs (issue 20 item 6): IQN's XDP and TC
entries on PPPoE frames beside the same packets as plain Ethernet frames, each
against an empty program of its type loaded the same way and run on the same
bytes in the same run (BPF_PROG_TEST_RUN, the calling thread's CPU time; see
bench_xdp.py for why). A live reader drains the ring while candidates run.

The PPPoE header costs one bounds check and a few byte compares
(parse_pppoehdr), so a PPPoE frame should cost within a few ns of the same
packet on plain Ethernet; the data plane's targets (bench_xdp.py) are 1.5x the
empty program for UDP from the IQN port outside the band and 1.3x for other
traffic.

    sudo .venv/bin/python bench/bench_pppoe.py [--repeat 1000000] [--rounds 7] [--no-write]

Prints a markdown table and replaces the "## PPPoE session frames" section of
bench/RESULTS.md.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _results  # noqa: E402
from bench_hooks import bench_args, empty_programs, measure, rerun  # noqa: E402
from bench_xdp import OTHER_TARGET, RING_PAGES, TARGET, drain  # noqa: E402

from iqn_ctl.capture.frames import udp_frame  # noqa: E402
from iqn_ctl.engine.params import CandidateFilter  # noqa: E402
from iqn_ctl.live.bpf_testrun import TestRunner  # noqa: E402

SECTION = "## PPPoE session frames"
S, C = "198.18.0.1", "198.18.0.2"
PPPOE = 8


def rows(filt: CandidateFilter) -> list[tuple[str, bytes, bytes | None, str]]:
    """(label, PPPoE frame, the same packet on plain Ethernet or None, kind)."""
    mid = (filt.min_size + filt.max_size) // 2

    def f(sport: int, n: int, **kw: object) -> bytes:
        return udp_frame(S, C, sport, 51234, frame_len=n, **kw)  # type: ignore[arg-type]

    lcp = bytearray(f(4433, 60, pppoe=1))
    lcp[20:22] = b"\xc0\x21"  # PPP protocol: LCP (an echo request, say)
    return [
        ("candidate (UDP :443, IP 1220 B)", f(filt.port, mid + PPPOE, pppoe=1), f(filt.port, mid),
         "candidate"),
        ("candidate behind a VLAN tag", f(filt.port, mid + PPPOE + 4, pppoe=1, vlans=(7,)),
         f(filt.port, mid + 4, vlans=(7,)), "candidate"),
        ("UDP :443 outside the band", f(filt.port, filt.max_size + 100 + PPPOE, pppoe=1),
         f(filt.port, filt.max_size + 100), "tracked"),
        ("UDP from another port", f(4433, mid + PPPOE, pppoe=1), f(4433, mid), "other"),
        ("PPP LCP (not IP)", bytes(lcp), None, "other"),
    ]


def main() -> None:
    args = bench_args(__doc__)

    from iqn_ctl.live.datapath import Datapath

    filt = CandidateFilter()
    empty_bpf, empty = empty_programs()
    dp = Datapath("lo", filt, ring_pages=RING_PAGES)
    iqn = {"xdp": TestRunner(dp.prog_fd), "tc": TestRunner(dp.tc_prog_fd)}
    stop = threading.Event()
    reader = threading.Thread(target=drain, args=(dp, stop), daemon=True)
    reader.start()
    table = rows(filt)
    cells: dict[tuple[str, str, str], tuple[list[float], list[float]]] = {}
    t0 = time.monotonic()
    try:
        for _ in range(args.rounds):
            for label, pppoe, plain, kind in table:
                repeat = args.cand_repeat if kind == "candidate" else args.repeat
                for hook in ("xdp", "tc"):
                    for enc, frame in (("pppoe", pppoe), ("plain", plain)):
                        if frame is None:
                            continue
                        b, c = cells.setdefault((label, hook, enc), ([], []))
                        b.append(measure(empty[hook], frame, repeat, hook))
                        c.append(measure(iqn[hook], frame, repeat, hook))
        counters = dp.counters()
    finally:
        stop.set()
        reader.join()
        dp.close()
        empty_bpf.cleanup()
    elapsed = time.monotonic() - t0
    lines = ["| frame | hook | empty ns/pkt | IQN on PPPoE ns/pkt | ratio to empty | "
             "IQN on plain Ethernet ns/pkt | PPPoE minus plain ns | target |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    worst = worst_plain = 0.0
    for label, _, plain, kind in table:
        for hook in ("xdp", "tc"):
            b, c = (statistics.median(x) for x in cells[(label, hook, "pppoe")])
            ratio = c / b
            if plain is not None:
                pc = statistics.median(cells[(label, hook, "plain")][1])
                plain_s, delta = f"{pc:.2f}", f"{c - pc:+.1f}"
            else:
                plain_s = delta = "-"
            if kind == "candidate":
                verdict = "(candidate: burst record)"
            else:
                target = TARGET if kind == "tracked" else OTHER_TARGET
                if kind == "other":
                    worst = max(worst, ratio)
                    if plain is not None:
                        worst_plain = max(worst_plain, pc / b)
                verdict = f"<= {target}x: {'met' if ratio <= target else 'MISSED'}"
            lines.append(f"| {label} | {hook} | {b:.2f} | {c:.2f} | {ratio:.2f}x | {plain_s} | {delta} | "
                         f"{verdict} |")
    cpu = _results.cpu_model()
    summary = (f"Median of {args.rounds} calls x {args.repeat} runs ({args.cand_repeat} for candidates); "
               f"kernel {platform.release()}, {cpu}, {os.cpu_count()} CPUs; {elapsed:.1f} s; "
               f"ring records lost: {counters['lost']}, parse errors: {counters['parse_errors']}. "
               f"Worst ratio for PPPoE frames not from the IQN port: {worst:.2f}x "
               f"({'target met' if worst <= OTHER_TARGET else 'TARGET MISSED'}; the same packets on plain "
               f"Ethernet in this run: {worst_plain:.2f}x). The UDP :443 rows' flow "
               "also sent candidates, so its volume slot counts it.")
    out = "\n".join(lines)
    print(out)
    print()
    print(summary)
    if counters["parse_errors"]:
        raise SystemExit("bench: error: a benchmark frame was a parse error")
    if not args.no_write:
        cmd = rerun("bench_pppoe.py", args)
        body = (f"{SECTION}\n\n`iqn_xdp.c`'s XDP and TC entries on PPPoE session frames and on the same "
                "packets as plain Ethernet frames, each against an empty program of its type on the same "
                f"bytes, BPF_PROG_TEST_RUN, same run ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). "
                f"Re-run: `{cmd}`\n\n{out}\n\n{summary}\n")
        _results.write_section(SECTION, body)


if __name__ == "__main__":
    main()
