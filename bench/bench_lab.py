"""How long the lab takes to build and remove (target: ``iqn-lab up`` < 30 s).

Baseline, measured in the same run: the bare topology (three namespaces, two
veth pairs, addresses) made and removed with iproute2's ``ip`` command - the
floor any namespace lab pays. Rows: media generation (ffmpeg, once, then
cached), ``up`` with the media cached (certificates, namespaces, NAT, OpenVPN
handshake, HTTP/3 server), ``up`` on a lab that is already up, and ``down``.

Run as root: ``sudo .venv/bin/python bench/bench_lab.py``. Prints a markdown
table and replaces the "## Lab" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _results  # noqa: E402  (bench/ is on sys.path when run as a script)

from iqn_lab.lab import Lab  # noqa: E402
from iqn_lab.ott.media import MediaSpec, ensure_media  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Lab"
TARGET_S = 30.0


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def bare_topology(prefix: str) -> None:
    ns = [f"{prefix}-{r}" for r in ("client", "router", "ott")]
    try:
        for n in ns:
            ip("netns", "add", n)
        for a, b, na, nb, addr_a, addr_b in (
            (f"{prefix}-c0", f"{prefix}-r0", ns[0], ns[1], "198.18.0.2/30", "198.18.0.1/30"),
            (f"{prefix}-r1", f"{prefix}-o0", ns[1], ns[2], "198.19.0.1/24", "198.19.0.2/24"),
        ):
            ip("link", "add", a, "type", "veth", "peer", "name", b)
            ip("link", "set", a, "netns", na)
            ip("link", "set", b, "netns", nb)
            ip("-n", na, "addr", "add", addr_a, "dev", a)
            ip("-n", nb, "addr", "add", addr_b, "dev", b)
            ip("-n", na, "link", "set", a, "up")
            ip("-n", nb, "link", "set", b, "up")
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_lab: run as root (sudo .venv/bin/python bench/bench_lab.py)")
    prefix = f"lb{os.getpid() % 10000:04d}"
    lab = Lab(prefix)
    rows: dict[str, list[float]] = {k: [] for k in ("bare", "media", "up", "again", "down")}
    t_all = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as cache:
            rows["media"].append(timed(lambda: ensure_media(MediaSpec(), Path(cache))))
        ensure_media(MediaSpec())  # the lab's own cache, so `up` below is the cached case
        for _ in range(args.runs):
            rows["bare"].append(timed(lambda: bare_topology(prefix + "b")))
            rows["up"].append(timed(lab.up))
            rows["again"].append(timed(lab.up))
            rows["down"].append(timed(lab.down))
    finally:
        lab.down()
    base = statistics.median(rows["bare"])
    names = {
        "bare": "bare topology with `ip` (baseline: 3 netns, 2 veth pairs, addresses; made and removed)",
        "media": "media generation (ffmpeg, 60 s clip; once, then cached)",
        "up": "`up`, media cached (certs, netns, NAT, tbf, OpenVPN handshake, HTTP/3 server ready)",
        "again": "`up` on a lab that is already up (idempotent)",
        "down": "`down` (stop daemons, remove namespaces and state)",
    }
    lines = [
        "| step | median s | min s | max s | runs | x baseline | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, label in names.items():
        v = rows[key]
        med = statistics.median(v)
        target = ""
        if key == "up":
            target = f"< {TARGET_S:.0f} s: {'met' if max(v) < TARGET_S else 'MISSED'}"
        lines.append(
            f"| {label} | {med:.2f} | {min(v):.2f} | {max(v):.2f} | {len(v)} | {med / base:.1f} | {target} |"
        )
    table = "\n".join(lines)
    print(table)
    cmd = "sudo .venv/bin/python bench/bench_lab.py"
    body = (
        f"{SECTION}\n\nWall-clock time to build and remove the namespace lab against the bare topology made "
        f"with iproute2 in the same run ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}; "
        f"{time.perf_counter() - t_all:.0f} s in all). Re-run: `{cmd}`\n\n{table}\n"
    )
    if args.no_write:
        return
    _results.write_section(SECTION, body)


if __name__ == "__main__":
    main()
