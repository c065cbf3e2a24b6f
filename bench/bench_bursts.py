"""User-space cost of the agent's input: burst records against the same
candidates fed one by one, through the live flow view (``LiveFlows``: raw key
-> flow, then ``VectorFlowTable``), as the agent's loop does per poll.

Every flow is stalled and sends one burst of n = 4 candidates per 0.2 s; a
poll (50 ms) carries a quarter of the flows' bursts. Also the user-space side
of the data plane per poll: taking the records (ring + open-burst table) with
``BurstTaker``, from a table of 2 CPUs x 1024 slots.

    .venv/bin/python bench/bench_bursts.py [--flows 1000 10000 50000] [--no-write]

Prints a markdown table and replaces the "## Burst records in user space"
section of bench/RESULTS.md. No root needed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _results  # noqa: E402

from iqn_ctl.engine.bursts import group  # noqa: E402
from iqn_ctl.engine.params import SignalParams  # noqa: E402
from iqn_ctl.live.bursttable import BurstBatch, BurstTaker  # noqa: E402
from iqn_ctl.live.flows import LiveFlows  # noqa: E402
from iqn_ctl.live.layout import BURST_DTYPE  # noqa: E402

SECTION = "## Burst records in user space"
N, P, POLL = 4, 0.2, 0.05


def raw_key(i: int) -> bytes:
    return (bytes([198, 18, 0, 1]) + bytes(12) + (0xC6120000 + (i >> 16)).to_bytes(4, "big") + bytes(12)
            + (443).to_bytes(2, "big") + (i & 0xFFFF).to_bytes(2, "big") + bytes([4, 17, 0, 0]))


def polls(flows: int, seconds: float, rng: np.random.Generator) -> list[tuple[BurstBatch, list]]:
    """(burst batch, the same candidates as (raw, t, len) tuples) per poll."""
    keys = [raw_key(i) for i in range(flows)]
    phase = rng.uniform(0, P, flows)
    out = []
    t0 = 1000.0
    for k in range(int(seconds / POLL)):
        lo, hi = t0 + k * POLL, t0 + (k + 1) * POLL
        f, t = [], []
        for j in range(int(np.ceil(seconds / P)) + 1):
            starts = t0 + phase + j * P
            sel = np.flatnonzero((starts >= lo) & (starts < hi))
            for i in range(N):
                f.append(sel)
                t.append(starts[sel] + i * 0.0007)
        ff = np.concatenate(f)
        tt = np.round(np.concatenate(t) * 1e9).astype(np.int64)
        b = group(ff, tt, N)
        batch = BurstBatch([keys[i] for i in b.flow.tolist()], b.first, b.count, b.off)
        o = np.argsort(tt, kind="stable")
        tuples = [(keys[i], x / 1e9, 1250) for i, x in zip(ff[o].tolist(), tt[o].tolist(), strict=True)]
        out.append((batch, tuples))
    return out


def run(flows: int, seconds: float) -> dict[str, float]:
    rng = np.random.default_rng(flows)
    data = polls(flows, seconds, rng)
    res: dict[str, float] = {}
    for mode in ("bursts", "candidates"):
        lf = LiveFlows(SignalParams(P, N), max_flows=2 * flows, reorder=0.0, source_rate=0)
        cpu = 0.0
        records = cands = 0
        for k, (batch, tuples) in enumerate(data):
            t0 = time.thread_time()
            if mode == "bursts":
                lf.ingest_bursts(batch)
            else:
                lf.ingest(tuples)
            lf.advance(1000.0 + (k + 1) * POLL)
            cpu += time.thread_time() - t0
            records += len(batch)
            cands += batch.candidates
        res[mode] = cpu
        res["records"], res["cands"] = records, cands
    # taking records: a full table scan per poll plus the ring's records
    tab = np.zeros(2 * 1024, BURST_DTYPE)
    taker = BurstTaker(tab, 4_000_000)
    recs = np.zeros(int(res["records"] / len(data)), BURST_DTYPE)
    recs["count"] = N
    t0 = time.thread_time()
    for k in range(len(data)):
        taker.take(recs, 10**12 + k)
    res["take"] = (time.thread_time() - t0) / len(data)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--seconds", type=float, default=4.0, help="signalling time simulated per size")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    lines = ["| stalling flows | burst records/s | bursts: us CPU per record | candidates: us CPU per "
             "candidate | bursts: cores | candidates: cores | ratio | taking one poll's records (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for flows in a.flows:
        r = run(flows, a.seconds)
        rate = r["records"] / a.seconds
        lines.append(
            f"| {flows} | {rate:,.0f} | {1e6 * r['bursts'] / r['records']:.2f} | "
            f"{1e6 * r['candidates'] / r['cands']:.2f} | {r['bursts'] / a.seconds:.2f} | "
            f"{r['candidates'] / a.seconds:.2f} | {r['candidates'] / r['bursts']:.1f}x | "
            f"{1e3 * r['take']:.2f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    cmd = "`.venv/bin/python bench/bench_bursts.py" + (
        f" --flows {' '.join(map(str, a.flows))}" if a.flows != [1000, 10000, 50000] else "") + "`"
    body = (f"{SECTION}\n\nThe agent's per-poll work, burst records (what the kernel now writes) against "
            f"the same candidates one tuple each (the former input), through `LiveFlows` and "
            f"`VectorFlowTable`: every flow stalled, one burst of {N} per {P} s, a poll every "
            f"{POLL * 1000:.0f} ms; CPU time of the thread "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, shared with other work). "
            f"Re-run: {cmd}\n\n{table}\n")
    print(table)
    if not a.no_write:
        _results.write_section(SECTION, body)


if __name__ == "__main__":
    main()
