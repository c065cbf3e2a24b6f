"""The live agent's user-space work when everyone stalls at once (issue 19),
in process, against another checkout's code in the same run.

Three costs per poll round, CPU time of the thread (robust to a shared box):

1. steady: every flow stalled, one burst record of n = 4 per flow every
   0.2 s, a poll every 50 ms: ``LiveFlows.ingest_bursts`` + ``advance`` per
   record, after the flows and their stalls exist (the per-record look-up).
2. onset: the same traffic from the first burst on: every flow new to the
   agent and starting its stall within one p (decode, admission, the
   engine's new slots and stall starts) per record.
3. starts: the onset's stall starts through the agent's event handler
   (``Agent._on_events``: log line, history row on disk, counters), per start.

Each under two garbage-collector settings (``--gc``): Python's defaults (how
the table was first measured) and the live agent's (``quiet_gc``: start-up
objects frozen, full collections once per 1,000 middle ones). An outage's
onset adds 50,000 flows' objects within one p, and with the defaults a few full
collections then walk all of them (~3 µs per new flow at 50,000), which the
live agent does not do; both rows say what each setting costs.

``--baseline CHECKOUT`` runs the same measurements with that checkout's code
(its ``.venv/bin/python``, this file given on stdin so nothing of this
checkout is imported) right before this one's, per size; ratios are this
over baseline.

    .venv/bin/python bench/bench_storm.py [--flows 1000 10000 50000] [--gc python agent]
        [--baseline /work/main] [--no-write]

Writes the "## Outage scale: the agent's user space" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SECTION = "## Outage scale: the agent's user space"
#: ``--gc`` settings and how the table names them
GC_MODES = {"python": "Python's defaults", "agent": "agent's (quiet_gc)"}
N, P, POLL = 4, 0.2, 0.05


def raw_key(i: int) -> bytes:
    """struct flow_key bytes of flow ``i`` (as bench_bursts.py)."""
    return (bytes([198, 18, 0, 1]) + bytes(12) + (0xC6120000 + (i >> 16)).to_bytes(4, "big") + bytes(12)
            + (443).to_bytes(2, "big") + (i & 0xFFFF).to_bytes(2, "big") + bytes([4, 17, 0, 0]))


def polls(flows: int, seconds: float) -> list[Any]:
    """Burst batches, one per poll: every flow a burst of N every P from a random phase."""
    from iqn_ctl.engine.params import BURST_MAX
    from iqn_ctl.live.bursttable import BurstBatch

    rng = np.random.default_rng(flows)
    keys = [raw_key(i) for i in range(flows)]
    phase = rng.uniform(0, P, flows)
    t0 = 1000.0
    out = []
    for k in range(int(seconds / POLL)):
        lo, hi = t0 + k * POLL, t0 + (k + 1) * POLL
        starts = (t0 + phase)[None, :] + P * np.arange(int(seconds / P) + 1)[:, None]
        j, f = np.nonzero((starts >= lo) & (starts < hi))
        first = starts[j, f]
        o = np.argsort(first, kind="stable")
        f, first = f[o], first[o]
        off = np.zeros((f.size, BURST_MAX), np.int64)
        off[:, :N] = np.arange(N) * 2_000_000
        out.append(BurstBatch([keys[i] for i in f.tolist()], np.round(first * 1e9).astype(np.int64),
                              np.full(f.size, N, np.int64), off))
    return out


def measure(flows: int, repeats: int = 3, gc_mode: str = "python") -> dict[str, float]:
    """The three costs for ``flows`` stalling flows (run in the checkout under
    test): the least of ``repeats`` runs each (a shared box only adds)."""
    runs = [measure_once(flows, gc_mode) for _ in range(repeats)]
    return {k: min(r[k] for r in runs) for k in runs[0]}


def measure_once(flows: int, gc_mode: str = "python") -> dict[str, float]:
    """One run; ``gc_mode`` "agent": under the live agent's garbage-collector
    setting (``quiet_gc``, entered once the polls and the agent are made, as the
    agent enters it once it is set up), "python": Python's defaults."""
    import contextlib

    from iqn_ctl.engine.tracker import StallStarted
    from iqn_ctl.live.agent import Agent, AgentConfig, quiet_gc
    from iqn_ctl.live.history import History

    data = polls(flows, 2 * P + 1.0)
    onset_polls = int(round(P / POLL)) + 1
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="iqn-storm-") as td:
        tmp = Path(td)
        logging.basicConfig(level=logging.INFO, filename=str(tmp / "agent.log"),
                            format="%(asctime)s %(levelname)s %(message)s")
        agent = Agent(AgentConfig("lo", state_dir=tmp, run_dir=tmp / "run", max_flows=2 * flows,
                                  source_rate=0, reorder=0.0))
        agent.history = History(tmp)
        lf = agent.flows
        cpu_on = cpu_ev = 0.0
        rec_on = starts = 0
        rec_st, cpu_st = 0, 0.0
        with quiet_gc() if gc_mode == "agent" else contextlib.nullcontext():
            for k, batch in enumerate(data):
                t = time.thread_time()
                out = lf.ingest_bursts(batch) + lf.advance(1000.0 + (k + 1) * POLL)
                dt = time.thread_time() - t
                if k < onset_polls:
                    cpu_on += dt
                    rec_on += len(batch)
                    t = time.thread_time()
                    agent._on_events(out)
                    cpu_ev += time.thread_time() - t
                    starts += sum(1 for e in out if isinstance(e, StallStarted))
                else:
                    cpu_st += dt
                    rec_st += len(batch)
        agent.history.close()
    res["steady_us"] = 1e6 * cpu_st / max(rec_st, 1)
    res["onset_us"] = 1e6 * cpu_on / max(rec_on, 1)
    res["start_us"] = 1e6 * cpu_ev / max(starts, 1)
    res["starts"] = starts
    res["records"] = rec_st
    return res


def rev(checkout: Path) -> str:
    r = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "?"


def baseline(checkout: Path, flows: int, gc_mode: str = "python") -> dict[str, float]:
    """:func:`measure` run by the other checkout's interpreter on its own code."""
    py = checkout / ".venv" / "bin" / "python"
    src = Path(__file__).read_text() + f"\nprint(json.dumps(measure({flows}, gc_mode={gc_mode!r})))\n"
    r = subprocess.run([str(py), "-"], input=src.replace('if __name__ == "__main__":', "if False:"),
                       capture_output=True, text=True, cwd=checkout, check=True)
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--baseline", type=Path, metavar="CHECKOUT")
    ap.add_argument("--gc", nargs="+", choices=GC_MODES, default=list(GC_MODES),
                    help="garbage-collector settings to measure under (default: both)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(root / "bench"))
    import _results

    head = ("| stalling flows | GC | code | steady µs/record | x "
            "| onset µs/record (new flow + stall start) | x "
            "| µs per stall start (agent: log, history, counters) | x | cores at 250,000 records/s, steady |")
    lines = [head, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    loads = []
    for flows, gc_mode in [(f, g) for f in a.flows for g in a.gc]:
        rows = []
        if a.baseline:
            rows.append(("baseline", baseline(a.baseline, flows, gc_mode)))
        rows.append(("this", measure(flows, gc_mode=gc_mode)))
        loads.append(" / ".join(Path("/proc/loadavg").read_text().split()[:3]))
        b = rows[0][1]
        for name, r in rows:
            def x(k: str, r: dict[str, float] = r, name: str = name, b: dict[str, float] = b) -> str:
                return "-" if name == "baseline" or not a.baseline else f"{r[k] / b[k]:.2f}x"
            lines.append(f"| {flows:,} | {GC_MODES[gc_mode]} | {name} | "
                         f"{r['steady_us']:.2f} | {x('steady_us')} | "
                         f"{r['onset_us']:.2f} | {x('onset_us')} | {r['start_us']:.2f} | {x('start_us')} | "
                         f"{0.25 * r['steady_us']:.2f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    cmd = "`.venv/bin/python bench/bench_storm.py" + (f" --baseline {a.baseline}" if a.baseline else "") + (
        f" --flows {' '.join(map(str, a.flows))}" if a.flows != [1000, 10000, 50000] else "") + (
        f" --gc {' '.join(a.gc)}" if a.gc != list(GC_MODES) else "") + "`"
    base = f"baseline: {a.baseline} at {rev(a.baseline)}, " if a.baseline else ""
    body = (f"{SECTION}\n\nIssue 19's two user-space costs of the live agent, in process (no kernel): the "
            f"per-record flow look-up (steady: every flow stalled, a burst record of {N} per flow every "
            f"{P:g} s, a poll every {POLL * 1000:.0f} ms), the outage's onset (every flow new and starting "
            "its stall within one p) and each stall start through the agent's event handler (log line, "
            "history row on disk, counters); CPU time of the thread, the least of 3 runs, under Python's "
            "default garbage-collector thresholds and under the live agent's (`quiet_gc`: full collections "
            "rare; with the defaults an onset of 50,000 new flows pays a few full collections that walk all "
            "of their objects); x = this checkout "
            "over the baseline "
            f"measured just before it ({base}this: {rev(root)}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} "
            f"CPUs shared with other work, load average {' ; '.join(loads)}). Re-run: {cmd}\n\n{table}\n")
    print(table)
    if not a.no_write:
        _results.write_section(SECTION, body)


if __name__ == "__main__":
    main()
