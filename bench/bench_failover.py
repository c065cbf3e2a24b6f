"""Export through a JetStream node's death: how long records wait when the stream's leader dies.

A 3-node cluster on 127.0.0.1 (``iqn_lab.jetstream``), an R3 stream created by the
exporter (``iqn_ctl.live.export.Exporter``, the agent's own), a history written at a
steady 20 stall records per second, and, 4 s in, a SIGKILL of the node that leads the
stream (``leader``: JetStream refuses the stream's messages until its raft group elects
another leader), of the node the exporter is connected to (``connected``: batches in
flight lose their answers), or of the node that is both (``both``, the slow case: the
exporter is restarted until it is connected to the leader). Per run, for the records
written from 1 s before the kill to 12 s after it: the delay from written to
acknowledged and marked (``exported_at``), max / p99 / median, and whether every record
was exported once the cluster healed.

``--baseline CHECKOUT`` runs the same measurement with that checkout's code (its
``.venv/bin/python``, this file given on stdin so nothing of this checkout is imported),
alternating with this checkout's, ``--repeat`` times each; ratios are this over baseline
(medians of the runs).

    .venv/bin/python bench/bench_failover.py [--kill both,leader,connected] [--baseline CHECKOUT]
        [--repeat 3] [--no-write]

Writes the "## Export through a node's death" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SECTION = "## Export through a node's death"
RATE = 20.0  # stall records written per second
BEFORE_KILL = 4.0
AFTER_KILL = 15.0
WINDOW = (-1.0, 12.0)
KINDS = ("both", "leader", "connected")  # records written in [kill + lo, kill + hi) are measured


def _leader(url: str) -> str:
    """The server name of the stream's leader (asked through ``url``)."""
    import nats

    async def ask() -> str:
        nc = await nats.connect(url, connect_timeout=2)
        try:
            info = await nc.jetstream(timeout=5).stream_info("IQN")
            return str(info.cluster.leader) if info.cluster else ""
        finally:
            await nc.close()

    return asyncio.run(ask())


def measure_once(kill: str) -> dict[str, Any]:
    from iqn_ctl.live.export import Exporter
    from iqn_ctl.live.history import History, StallRecord
    from iqn_lab.jetstream import JetStream

    with tempfile.TemporaryDirectory(prefix="iqn-failover-") as td:
        tmp = Path(td)
        hist = History(tmp / "state", max_rows=10_000_000)
        written: list[float] = []
        stop = threading.Event()

        def produce() -> None:
            i = 0
            while not stop.is_set():
                t = time.time()
                hist.add([StallRecord("eth0", f"198.18.0.1:443>198.18.1.{i % 200 + 2}:{1024 + i}",
                                      f"198.18.1.{i % 200 + 2}", "198.18.0.1", t - 2.0, t - 0.5, 9, t,
                                      estimator="count")])
                written.append(t)
                i += 1
                stop.wait(1.0 / RATE)

        with JetStream.start(3, tmp / "js") as js:
            names = [n.name for n in js.nodes]
            ex = Exporter(hist.path, "eth0", "fo-1", js.urls).start()
            prod = threading.Thread(target=produce, daemon=True)
            prod.start()
            try:
                time.sleep(BEFORE_KILL)
                connected = ex.stats()["connected"]
                leader = _leader(connected or js.urls[0])
                for _ in range(20):  # both: until the exporter's connection is to the leader
                    if kill != "both" or connected == js.urls[names.index(leader)]:
                        break
                    ex.stop()
                    ex = Exporter(hist.path, "eth0", "fo-1", js.urls).start()
                    t0 = time.monotonic()
                    while not ex.stats()["connected"] and time.monotonic() < t0 + 10:
                        time.sleep(0.05)
                    time.sleep(1.0)
                    connected = ex.stats()["connected"]
                if kill == "both" and connected != js.urls[names.index(leader)]:
                    sys.exit("bench_failover: the exporter never connected to the stream's leader")
                victim = names.index(leader) if kill in ("leader", "both") else js.urls.index(connected)
                at = time.time()
                js.kill(victim)
                time.sleep(AFTER_KILL)
                stop.set()
                prod.join(5)
                deadline = time.monotonic() + 60
                while ex.stats()["backlog"] and time.monotonic() < deadline:
                    time.sleep(0.2)
            finally:
                stop.set()
                ex.stop()
        with sqlite3.connect(hist.path) as con:
            rows = con.execute("SELECT exported_at FROM stalls ORDER BY id").fetchall()
        hist.close()
    lo, hi = at + WINDOW[0], at + WINDOW[1]
    delays = [float(e) - w for w, (e,) in zip(written, rows, strict=False) if lo <= w < hi and e is not None]
    unexported = sum(1 for (e,) in rows if e is None)
    delays.sort()
    return {"kill": kill, "victim_led_stream": names[victim] == leader,
            "victim_was_connected": js.urls[victim] == connected, "records": len(delays),
            "unexported": unexported, "max_s": round(delays[-1], 3),
            "p99_s": round(delays[min(len(delays) - 1, int(0.99 * len(delays)))], 3),
            "median_s": round(statistics.median(delays), 3)}


def rev(checkout: Path) -> str:
    r = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "?"


def baseline(checkout: Path, kill: str) -> dict[str, Any]:
    """:func:`measure_once` run by the other checkout's interpreter on its own code."""
    py = checkout / ".venv" / "bin" / "python"
    src = Path(__file__).read_text() + f"\nprint(json.dumps(measure_once({kill!r})))\n"
    r = subprocess.run([str(py), "-"], input=src.replace('if __name__ == "__main__":', "if False:"),
                       capture_output=True, text=True, cwd=checkout)
    if r.returncode != 0:
        sys.exit(f"bench_failover: the baseline run failed: {r.stderr.strip()[-400:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def _med(runs: list[dict[str, Any]], k: str) -> float:
    return float(statistics.median(r[k] for r in runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, help="another checkout (with its .venv) to compare with")
    ap.add_argument("--kill", default="both,leader,connected",
                    help="comma-separated: both, leader, connected (see the module's docstring)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print, do not write bench/RESULTS.md")
    a = ap.parse_args()
    kinds = a.kill.split(",")
    if a.repeat < 1 or not kinds or any(k not in KINDS for k in kinds):
        sys.exit(f"bench_failover: --repeat must be at least 1, --kill a list of {', '.join(KINDS)}")
    this: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    base: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for kind in kinds:
        for k in range(a.repeat):
            if a.baseline is not None:
                base[kind].append(baseline(a.baseline, kind))
                print(f"{kind}, baseline {k + 1}: {base[kind][-1]}", flush=True)
            this[kind].append(measure_once(kind))
            print(f"{kind}, this {k + 1}: {this[kind][-1]}", flush=True)
    here = Path(__file__).resolve().parent.parent
    lines = [
        SECTION,
        "",
        f"`bench/bench_failover.py --kill {','.join(kinds)} --repeat {a.repeat}"
        f"{' --baseline CHECKOUT' if a.baseline else ''}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.node()}; this checkout {rev(here)}"
        f"{f', baseline {rev(a.baseline)}' if a.baseline else ''}): a 3-node JetStream cluster on "
        f"127.0.0.1, an R3 stream, {RATE:g} stall records/s written to the history, a node "
        f"SIGKILLed {BEFORE_KILL:g} s in (the one leading the stream, the one the exporter is connected "
        f"to, or one that is both); delay from written to acknowledged for the records written from "
        f"{-WINDOW[0]:g} s before the kill to {WINDOW[1]:g} s after it (medians of the runs; each run's "
        "max in brackets).",
        "",
        "| node killed | code | max delay s | p99 s | median s | records measured | left unexported "
        "| victim led the stream / was connected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, name, runs in [(k, n, r[k]) for k in kinds for n, r in (("this", this), ("baseline", base))]:
        if not runs:
            continue
        lines.append(
            f"| {kind} | {name} | {_med(runs, 'max_s'):.2f} "
            f"({', '.join(format(r['max_s'], '.2f') for r in runs)}) "
            f"| {_med(runs, 'p99_s'):.2f} | {_med(runs, 'median_s'):.3f} | {sum(r['records'] for r in runs)} "
            f"| {sum(r['unexported'] for r in runs)} "
            f"| {sum(r['victim_led_stream'] for r in runs)}/{len(runs)} / "
            f"{sum(r['victim_was_connected'] for r in runs)}/{len(runs)} |")
    if a.baseline is not None:
        lines += ["", "Max delay, this over baseline: " + ", ".join(
            f"{k} {_med(this[k], 'max_s') / max(_med(base[k], 'max_s'), 1e-9):.2f}x" for k in kinds) + "."]
    body = "\n".join(lines)
    print(body)
    if not a.no_write:
        from _results import write_section

        write_section(SECTION, body)


if __name__ == "__main__":
    main()
