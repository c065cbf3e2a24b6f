"""Bulk TCP cross traffic for the mitigation lab: a server that sends as fast as TCP lets
it, and a client that runs a timetable of downloads and logs what arrived.

Real TCP (the kernel's, CUBIC by default) through the same bottleneck as the
video: the congestion that makes viewers stall is made by these downloads, as
at a home router whose uplink someone saturates with an update or a backup.

``python -m iqn_lab.mitigation.bulk serve --addr A --port P`` (in the server's
namespace) answers every connection with an endless stream of zeros;
``python -m iqn_lab.mitigation.bulk fetch --server A --port P --plan PLAN.json
--out LOG.json`` (in the clients' namespace) opens one connection per entry
``{"at": s, "for": s, "source": addr}`` of the plan (seconds after its start),
reads until the entry's time is up, and writes the bytes received per
:data:`BIN` seconds of every download (and the start's epoch time).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

#: seconds per bin of the received-bytes log
BIN = 0.5
CHUNK = 1 << 16


def serve(addr: str, port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(64)
    zeros = bytes(CHUNK)

    def one(c: socket.socket) -> None:
        with c:
            try:
                while True:
                    c.sendall(zeros)
            except OSError:
                return  # the downloader closed: done

    while True:
        c, _ = srv.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()


def fetch(server: str, port: int, plan: list[dict[str, Any]], t0: float,
          stop: threading.Event) -> list[list[int]]:
    """Run ``plan`` from epoch ``t0``; returns the bytes per bin of each download."""
    bins: list[list[int]] = [[] for _ in plan]

    def one(i: int, e: dict[str, Any]) -> None:
        start = t0 + float(e["at"])
        if stop.wait(max(0.0, start - time.time())):
            return
        end = start + float(e["for"])
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if e.get("source"):
                s.bind((e["source"], 0))
            s.settimeout(2.0)
            s.connect((server, port))
            buf = bytearray(CHUNK)
            while not stop.is_set():
                now = time.time()
                if now >= end:
                    break
                try:
                    n = s.recv_into(buf)
                except TimeoutError:
                    continue
                if not n:
                    break
                k = int((time.time() - t0) / BIN)
                row = bins[i]
                if len(row) <= k:
                    row.extend([0] * (k + 1 - len(row)))
                row[k] += n
        except OSError:
            pass  # counted as what arrived before it failed
        finally:
            s.close()

    threads = [threading.Thread(target=one, args=(i, e), daemon=True) for i, e in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return bins


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m iqn_lab.mitigation.bulk")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--addr", required=True)
    s.add_argument("--port", type=int, required=True)
    f = sub.add_parser("fetch")
    f.add_argument("--server", required=True)
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--plan", required=True, help="JSON list of {at, for, source}")
    f.add_argument("--start", type=float, required=True, help="epoch seconds the plan's times count from")
    f.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        serve(a.addr, a.port)
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    plan = json.loads(Path(a.plan).read_text())
    bins = fetch(a.server, a.port, plan, a.start, stop)
    Path(a.out).write_text(json.dumps({"start": a.start, "bin": BIN, "plan": plan, "bins": bins}))


if __name__ == "__main__":
    main()
