"""Background runner of a bottleneck schedule (started by ``Lab.run_schedule``).

A separate process so the schedule outlives the ``iqn-lab up`` that set it and
``down`` can stop it by its pid file.
"""

from __future__ import annotations

import argparse
import time

from .shaping import apply_rate, parse_schedule


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m iqn_lab.schedule")
    ap.add_argument("netns")
    ap.add_argument("iface")
    ap.add_argument("steps", help="SECONDS:RATE,...")
    ap.add_argument("--repeat", type=float, default=0.0, help="start over every this many seconds")
    args = ap.parse_args(argv)
    steps = parse_schedule(args.steps)
    period = args.repeat
    start = time.monotonic()
    while True:
        for s in steps:
            delay = start + s.at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            apply_rate(args.netns, args.iface, s.rate)
            print(f"{time.time():.3f} rate {s.rate or 'none'}", flush=True)
        if period <= 0:
            return
        start += period


if __name__ == "__main__":
    main()
