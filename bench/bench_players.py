"""CPU of the headless signal players (iqn_lab/player.py): can one process run 30+ viewers?

An OTT emulator (the localisation lab's 500 kbit/s clip) listens on 127.0.0.2/.3 in a
namespace of its own; one player process plays for DURATION seconds with 1 player (the
baseline) and then with N players (each its own source address 127.0.1.x). Measured:
the player process's CPU seconds (its rusage at exit), the emulator's CPU over the same
window, the segments fetched, the stalls after startup (a player that cannot keep up
with its own clip would stall without any bottleneck). Ratio: CPU per player at N over
CPU per player at 1.

    sudo .venv/bin/python bench/bench_players.py [--players 30] [--duration 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._results import write_section  # noqa: E402
from iqn_lab.certs import make_cert  # noqa: E402
from iqn_lab.localise.lab import CLIP  # noqa: E402
from iqn_lab.ott.media import ensure_media  # noqa: E402
from iqn_lab.player import read_log  # noqa: E402
from iqn_lab.testbed import run_prefix  # noqa: E402

PY = sys.executable


def cpu_of(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def run(ns: str, tmp: Path, server_pid: int, count: int, duration: float) -> dict[str, float]:
    logs = tmp / f"logs-{count}"
    argv = ["ip", "netns", "exec", ns, PY, "-m", "iqn_lab.player", "--www", "127.0.0.2",
            "--media", "127.0.0.3", "--duration", str(duration), "--log-dir", str(logs),
            "--cafile", str(tmp / "ott.crt"), "--stagger", "2"]
    for i in range(count):
        argv += ["--source", f"127.0.1.{10 + i}"]
    srv0 = cpu_of(server_pid)
    t0 = time.monotonic()
    p = subprocess.Popen(argv)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    cpu = ru.ru_utime + ru.ru_stime
    ends = [e for f in logs.glob("*.jsonl") for e in read_log(f) if e["event"] == "end"]
    stalls = [e for f in logs.glob("*.jsonl") for e in read_log(f)
              if e["event"] == "stall" and not e["startup"]]
    return {"players": count, "wall_s": wall, "cpu_s": cpu, "share": cpu / wall, "per_player": cpu / count,
            "server_share": (cpu_of(server_pid) - srv0) / wall, "segments": sum(e["segments"] for e in ends),
            "stalls": len(stalls), "ended": len(ends)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--players", type=int, default=30)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--keep", help="copy the players' logs and the request log here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (a network namespace)")
    ns = f"{run_prefix()}-bp"
    media = ensure_media(CLIP)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_cert(tmp / "ott.crt", tmp / "ott.key", "www.iqn.test", ("www.iqn.test", "media.iqn.test"))
        subprocess.run(["ip", "netns", "add", ns], check=True)
        server = None
        try:
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            server = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-m", "iqn_lab.ott.server", "--cert",
                                       str(tmp / "ott.crt"), "--key", str(tmp / "ott.key"), "--media-dir",
                                       str(media), "--www-addr", "127.0.0.2", "--media-addr", "127.0.0.3",
                                       "--log", str(tmp / "req.jsonl"), "--ready", str(tmp / "ready")])
            while not (tmp / "ready").exists():
                time.sleep(0.1)
            rows = [run(ns, tmp, server.pid, n, a.duration) for n in (1, a.players)]
            if a.keep:
                subprocess.run(["cp", "-r", str(tmp), a.keep])
        finally:
            if server is not None:
                server.terminate()
                server.wait()
            subprocess.run(["ip", "netns", "del", ns])
    base = rows[0]["per_player"]
    load = os.getloadavg()[0]
    lines = [
        "## Signal players",
        "",
        f"`sudo .venv/bin/python bench/bench_players.py --players {a.players} --duration {a.duration:g}`: "
        f"one player process (one asyncio loop) streaming the localisation lab's {CLIP.kbit} kbit/s clip "
        "from an OTT "
        "emulator over loopback in a namespace; CPU from the process's rusage; baseline: the same with one "
        f"player. 2 cores shared with other jobs (load average {load:.1f} at the end).",
        "",
        "| players | wall s | CPU s | share of one core | CPU s per player | ratio to 1 player "
        "| emulator share | segments | stalls after startup |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['players']} | {r['wall_s']:.1f} | {r['cpu_s']:.2f} | {r['share']:.3f} | "
                     f"{r['per_player']:.3f} | {r['per_player'] / base:.2f} | {r['server_share']:.3f} | "
                     f"{r['segments']} | {r['stalls']} |")
    body = "\n".join(lines) + "\n"
    print(body)
    print(json.dumps(rows))
    write_section("## Signal players", body)


if __name__ == "__main__":
    main()
