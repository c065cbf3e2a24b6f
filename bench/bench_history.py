"""What ``synchronous=FULL`` costs the stall history, per write, next to NORMAL.

The agent writes once per poll round that had stall events: a stall's start
(an open row) and later its end (the row replaced), through
:meth:`History.stage` and :meth:`History.flush`, the code the agent runs. FULL
fsyncs the WAL at every commit, NORMAL only at checkpoints (so a power loss may
take the last commits with it). Measured: the time of one flush holding one
write (a quiet router: one stall starts or ends in a round) and holding 64
(a busy one), on the file system of ``--dir``.

Run:  .venv/bin/python bench/bench_history.py [--dir /var/lib/iqn-bench]   (writes its section)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _results  # noqa: E402  (bench/ is on sys.path when run as a script)

from iqn_ctl.live.history import History, StallRecord  # noqa: E402

SECTION = "## Stall history"


def rounds(state: Path, sync: str, per_round: int, n: int) -> list[float]:
    """Seconds per flush of ``per_round`` writes, ``n`` rounds (starts, then their ends)."""
    times: list[float] = []
    with History(state) as h:
        h._db.execute(f"PRAGMA synchronous={sync}")
        t0 = 1.8e9
        for i in range(n):
            start = i % 2 == 0
            for j in range(per_round):
                k = (i // 2) * per_round + j
                s = t0 + k
                rec = (StallRecord("eth0", f"198.18.0.1:443>198.18.0.2:{k}", "198.18.0.2", "198.18.0.1",
                                   s, s + 0.3, 0, s + 0.3, estimator="count", state="open") if start else
                       StallRecord("eth0", f"198.18.0.1:443>198.18.0.2:{k}", "198.18.0.2", "198.18.0.1",
                                   s, s + 2.0, 40, s + 2.8, estimator="count"))
                h.stage("start" if start else "end", rec)
            a = time.perf_counter()
            assert h.flush()
            times.append(time.perf_counter() - a)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="file system to measure on")
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args()
    rows = []
    for per_round in (1, 64):
        for sync in ("NORMAL", "FULL"):
            with tempfile.TemporaryDirectory(dir=args.dir) as d:
                t = rounds(Path(d), sync, per_round, args.rounds)
            t.sort()
            med, p99 = statistics.median(t), t[int(len(t) * 0.99) - 1]
            rows.append((per_round, sync, med, p99, med / per_round))
            print(f"{per_round:>3} per flush {sync:<6} median {med * 1e3:.3f} ms  p99 {p99 * 1e3:.3f} ms  "
                  f"per write {med / per_round * 1e6:.0f} us")
    where = str(args.dir.resolve())
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    # the file system of --dir: the longest mount point that is a prefix of it
    fs = max((m for m in mounts if where == m[1] or where.startswith(m[1].rstrip("/") + "/")),
             key=lambda m: len(m[1]))[2]
    body = [SECTION, "",
            f"`bench/bench_history.py` on {platform.node()} ({platform.machine()}), "
            f"{args.rounds} flushes each, in `{args.dir}` ({fs}), "
            f"{time.strftime('%Y-%m-%d')}.",
            "",
            "| writes per flush | synchronous | median flush | p99 flush | per write |",
            "|---:|---|---:|---:|---:|"]
    for per_round, sync, med, p99, per in rows:
        body.append(f"| {per_round} | {sync} | {med * 1e3:.3f} ms | {p99 * 1e3:.3f} ms "
                    f"| {per * 1e6:.0f} us |")
    body += ["", "The agent uses FULL (docs/agent.md, \"The stall history\"): the extra fsync per "
             "flush is paid once per poll round with stall events, while the perf rings buffer "
             "about half a second of candidates."]
    _results.write_section(SECTION, "\n".join(body) + "\n")


if __name__ == "__main__":
    main()
