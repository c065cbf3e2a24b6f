"""Bench: what the agent's API and garbage collector cost its event loop with
a full flow table (issue 10, the soak's findings), in process, no XDP.

1. ``flows`` answer: how long the loop's lock is held per answer, building the
   rows under it (the old way: iterate the table's views) against copying the
   columns under it (``LiveFlows.snapshot``) and building the rows after.
2. Full (gen2) collections while N new flows enter the table, with Python's
   default thresholds and under ``iqn_ctl.live.agent.quiet_gc`` (gc.callbacks timing).

Run: ``.venv/bin/python bench/bench_agent_api.py [--flows 65536] [--new 300000]``.
Prints a table; timings are of this box at this moment (ratios in the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import json
import struct
import time
from typing import Any

from iqn_ctl.engine.params import SignalParams
from iqn_ctl.live.agent import quiet_gc
from iqn_ctl.live.flows import LiveFlows
from iqn_ctl.live.layout import KEY_SIZE


def raw_key(j: int) -> bytes:
    """struct flow_key bytes of flood flow j (as the XDP program writes them)."""
    s = ipaddress.ip_address(f"198.18.{j // 60000 & 255}.1").packed.ljust(16, b"\0")
    c = ipaddress.ip_address("198.18.0.2").packed.ljust(16, b"\0")
    return (s + c + struct.pack("!HH", 443, 1024 + j % 60000) + b"\x04").ljust(KEY_SIZE, b"\0")


def fill(lf: LiveFlows, start: int, count: int, t: float) -> float:
    for i in range(start, start + count, 500):
        lf.ingest([(raw_key(j), t, 1250) for j in range(i, i + 500)])
        t += 0.01
        lf.advance(t)
    return t


def old_rows(lf: LiveFlows) -> list[dict[str, Any]]:
    """The rows as the agent built them under its lock before: one view per flow."""
    out = []
    for tr in lf.table:
        info = lf.info(tr.flow)
        out.append({"flow": info.label, "client": info.client, "server": info.server,
                    "state": "stall" if tr.in_stall else "normal", "candidates": tr.candidates,
                    "stalls": tr.stalls, "stall_start": tr.stall_start, "last_duration": tr.last_duration,
                    "last_seen": tr.last_seen, "key": lf.key_mode})
    return out


def ms(f: Any, reps: int = 5) -> tuple[float, Any]:
    best, got = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        got = f()
        best = min(best, time.perf_counter() - t0)
    return 1000 * best, got


def gen2_pauses(n_new: int, quiet: bool) -> list[float]:
    pauses: list[float] = []
    t0 = [0.0]

    def cb(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                t0[0] = time.perf_counter()
            else:
                pauses.append(1000 * (time.perf_counter() - t0[0]))

    lf = LiveFlows(SignalParams(), max_flows=65536, reorder=0.0, source_rate=0)
    with quiet_gc() if quiet else contextlib.nullcontext():  # its one collection at start-up not counted
        gc.callbacks.append(cb)
        try:
            fill(lf, 0, n_new, 1000.0)
        finally:
            gc.callbacks.remove(cb)
    return pauses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=65536)
    ap.add_argument("--new", type=int, default=300000)
    a = ap.parse_args()
    lf = LiveFlows(SignalParams(), max_flows=a.flows, reorder=0.0, source_rate=0)
    fill(lf, 0, a.flows, 1000.0)
    held_old, rows = ms(lambda: old_rows(lf))
    held_new, snap = ms(lf.snapshot)
    build, rows2 = ms(lambda: snap.rows((), 0.0))
    dump, _ = ms(lambda: json.dumps(rows2))
    assert len(rows) == len(rows2) == len(lf.table)
    print(f"| flows answer, {len(lf.table)} flows | lock held (ms) | outside the lock (ms) |")
    print("|---|---:|---:|")
    print(f"| rows built under the lock (before) | {held_old:.1f} | {dump:.1f} (json) |")
    print(f"| columns copied under the lock (after) | {held_new:.2f} | {build + dump:.1f} (rows + json) |")
    print(f"| ratio held before / after | {held_old / held_new:.0f}x | |")
    print()
    for quiet in (False, True):
        p = gen2_pauses(a.new, quiet)
        label = "quiet_gc (after)" if quiet else "Python defaults (before)"
        print(f"gen2 collections over {a.new} new flows, {label}: {len(p)}, "
              f"max {max(p, default=0):.0f} ms, total {sum(p):.0f} ms")


if __name__ == "__main__":
    main()
