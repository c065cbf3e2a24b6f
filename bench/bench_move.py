"""What the move from TC back to XDP (the attach watchdog, ``--hook auto``,
once the foreign XDP program is gone) does to candidates in flight, with real
traffic through a veth pair: a stream of candidates every ``--gap-ms`` ms, the
move done mid-stream by a data plane in the client namespace, three orders:

- ``handover``: what the agent does (Datapath.move_to_xdp): XDP first (the
  move entry, iqn_xdp_move), the kernel's handover flag makes iqn_tc skip
  frames it saw, then TC goes and iqn_xdp replaces the move entry;
- ``naive``: XDP first, then TC goes, without the flag: frames in the overlap
  pass both entries;
- ``gap``: TC goes first, then XDP: frames in between pass neither.

Reports, per order and run, the candidates counted minus those sent (positive:
counted twice; negative: missed) and how long the swap took.

    sudo .venv/bin/python bench/bench_move.py [--runs 3] [--seconds 3] [--gap-ms 1] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _results  # noqa: E402

from iqn_lab.testbed import PY  # noqa: E402
from iqn_lab.testbed import Testbed as Bed  # noqa: E402

SECTION = "## Moving from TC back to XDP: candidates in the swap"

WORKER = textwrap.dedent("""
    import json, sys, time
    from iqn_ctl.engine.params import CandidateFilter
    from iqn_ctl.live import datapath as d, tc
    dp = d.Datapath(sys.argv[1], CandidateFilter(), hook="auto")
    order = sys.argv[2]
    assert dp.attach() == "tc" and dp.beside_foreign
    print("ready", flush=True)
    sys.stdin.readline()  # the foreign program is gone, the stream runs
    while dp.counters()["candidates"] < 300:
        dp.poll(5)
    t0 = time.perf_counter()
    if order == "handover":
        dp.move_to_xdp()
    elif order == "naive":
        mode = dp.begin_move_to_xdp()
        dp._handover(d.HANDOVER_OFF)
        dp.finish_move_to_xdp(mode)
    else:  # gap
        tc.detach(dp.iface, ("ingress",), names=(d.TC_PROG_NAME,))
        dp.mode, dp.hook = dp._attach_xdp_prog(), "xdp"
    swap = time.perf_counter() - t0
    sys.stdin.readline()  # the stream is over
    for _ in range(5):
        dp.poll(20)
    print(json.dumps({"swap_ms": 1000 * swap, **dp.counters()}), flush=True)
    dp.close()
""")


def run(bed: Bed, order: str, seconds: float, gap_ms: float) -> dict[str, float]:
    bed.attach_foreign_xdp("other_prog")
    w = subprocess.Popen(["ip", "netns", "exec", bed.cli_ns, PY, "-c", WORKER, bed.cli_if, order],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert w.stdin is not None and w.stdout is not None
    try:
        assert w.stdout.readline().strip() == "ready"
        bed.remove_foreign_xdp()
        w.stdin.write("go\n")
        w.stdin.flush()
        times = [gap_ms / 1000 * i for i in range(int(seconds * 1000 / gap_ms))]
        out, err = bed.send({"lead": 0.3, "flows": [
            {"name": "x", "src": bed.srv4, "dst": bed.cli4, "dport": 40061, "frame": 1250, "times": times,
             "request": False}]}).communicate(timeout=120)
        sent = len(json.loads(out)["sent"]["x"])
        w.stdin.write("done\n")
        w.stdin.flush()
        got = json.loads(w.stdout.readline())
        w.wait(timeout=30)
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    return {"sent": sent, "extra": got["candidates"] - sent, "swap_ms": got["swap_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--gap-ms", type=float, default=1.0)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    load = os.getloadavg()[0]
    rows = []
    with Bed() as bed:
        for i in range(a.runs):
            for order in ("handover", "naive", "gap"):
                r = run(bed, order, a.seconds, a.gap_ms)
                rows.append((order, i, r))
                print(order, i, r, flush=True)
    body = [SECTION, "",
            f"`sudo .venv/bin/python bench/bench_move.py --runs {a.runs} --seconds {a.seconds:g} "
            f"--gap-ms {a.gap_ms:g}`: one veth pair, a candidate every {a.gap_ms:g} ms, the move done "
            f"after 300 were counted; load average {load:.1f} at the start (2 shared cores), "
            f"{_results.cpu_model()}. `extra` = candidates counted - sent (> 0 counted twice, < 0 missed); "
            "`swap` = the swap's wall time in the data plane.", "",
            "| order | run | sent | extra | swap ms |", "|---|---:|---:|---:|---:|"]
    body += [f"| {o} | {i} | {r['sent']} | {r['extra']:+d} | {r['swap_ms']:.1f} |" for o, i, r in rows]
    text = "\n".join(body) + "\n"
    print(text)
    if not a.no_write:
        _results.write_section(SECTION, text)


if __name__ == "__main__":
    main()
