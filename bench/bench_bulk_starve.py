"""How close a real signal at a starved viewer comes to the bulk rule's limit.

The bulk rule (``iqn_ctl/engine/discard.py``, ``--bulk-ratio``) discards a stall whose flow
carried more than R full-size packets' worth of other bytes per candidate. A signal's
answers lost at a bottleneck downstream of the agent are sent again, packed into full-size
packets that are not candidates, so a starved viewer's real signal carries "other" bytes
too. This bench measures that figure where the VM pair measures it: the namespace lab
(``iqn-lab``: OpenVPN home link, the router's NAT, the HTTP/3 OTT emulator), the whole
home link starved for 12 s (signal included), both ends of the page connection on a fixed
window with 4096 streams (as ``iqn_lab.vmpair``), the ISP agent with default options on the
router's WAN side, and a headless signal player. Per starvation rate: the player's stalls
and each agent stall's ``other_per_candidate`` (its ``stall end`` log line) or its
``stall discarded`` line.

Run as root: ``sudo .venv/bin/python bench/bench_bulk_starve.py [--rates 64kbit,100kbit,150kbit]
[--kbit 400] [--no-write]``. Time budget: about 75 s per rate (4 min for the default three).
Writes the "## Bulk rule: a starved signal's other bytes" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _results  # noqa: E402

from iqn_ctl.engine.discard import DEFAULT_BULK_RATIO  # noqa: E402
from iqn_lab import procs  # noqa: E402
from iqn_lab import topology as T  # noqa: E402
from iqn_lab.lab import Lab  # noqa: E402
from iqn_lab.ott.media import MediaSpec, ensure_media  # noqa: E402
from iqn_lab.quic_cc import PAGE_STREAMS  # noqa: E402

SECTION = "## Bulk rule: a starved signal's other bytes"
PLAY_S, STARVE_AT_S, STARVE_S = 45.0, 12.0, 12.0
END = re.compile(r"stall end .* duration=([\d.]+)s candidates=(\d+).* other_per_candidate=([\d.]+)")
DISCARD = re.compile(r"stall discarded .* duration=([\d.]+)s: (.*)")


def run_one(lab: Lab, rate: str, kbit: int, work: Path) -> dict[str, Any]:
    """One play with the whole home link at ``rate`` from STARVE_AT_S for STARVE_S."""
    s = lab.state
    media = MediaSpec(kbit=kbit)
    lab.up(media=media)
    # the lab's own OTT, again with the VM pair's page-host settings (fixed window, streams)
    procs.stop([p for p in [procs.pid_of(s, "ott")] if p is not None])
    ready = s / "ott.ready"
    ready.unlink(missing_ok=True)
    procs.spawn(s, "ott", [
        sys.executable, "-m", "iqn_lab.ott.server", "--cert", str(s / "ott.crt"), "--key", str(s / "ott.key"),
        "--media-dir", str(ensure_media(media)), "--www-host", T.WWW_HOST, "--media-host", T.MEDIA_HOST,
        "--www-addr", T.OTT_WWW, "--media-addr", T.OTT_MEDIA, "--log", str(lab.request_log),
        "--ready", str(ready), "--www-cc", "fixed", "--www-streams", str(PAGE_STREAMS),
    ], ns=lab.ott_ns)  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        if time.monotonic() > deadline:
            raise SystemExit("bench_bulk_starve: the OTT emulator did not start")
        time.sleep(0.1)
    log_path, play_dir = work / f"agent-{rate}.log", work / f"play-{rate}"
    iqn_ctl = str(ROOT / ".venv" / "bin" / "iqn-ctl")
    with open(log_path, "w") as log:
        attach = [iqn_ctl, "attach", lab.router_ott_iface, "--state-dir", str(work / f"st-{rate}")]
        agent = subprocess.Popen(lab.argv("router", attach), stderr=log,
                                 env=dict(os.environ, IQN_RUN_DIR=str(work / f"run-{rate}")))
        try:
            time.sleep(4)
            player = subprocess.Popen(lab.argv("client", [
                sys.executable, "-m", "iqn_lab.player", "--www", T.OTT_WWW, "--media", T.OTT_MEDIA,
                "--duration", str(PLAY_S), "--log-dir", str(play_dir), "--www-cc", "fixed"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(STARVE_AT_S)
            lab.set_rate(rate)
            time.sleep(STARVE_S)
            lab.set_rate(None)
            player.wait(timeout=PLAY_S + 120)
            time.sleep(3)  # the last stall's end
        finally:
            agent.send_signal(signal.SIGINT)
            agent.wait(timeout=30)
    text = log_path.read_text()
    kept = [(float(d), int(c), float(o)) for d, c, o in END.findall(text)]
    dropped = [(float(d), why) for d, why in DISCARD.findall(text)]
    events = [json.loads(ln) for f in play_dir.glob("*.jsonl") for ln in f.read_text().splitlines() if ln]
    real = [e["duration"] for e in events if e.get("event") == "stall" and not e.get("startup")]
    return {"rate": rate, "kbit": kbit, "player": real, "kept": kept, "discarded": dropped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="64kbit,100kbit,150kbit")
    ap.add_argument("--kbit", type=int, default=400, help="the clip's bitrate (the VM pair's: 400)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_bulk_starve: run as root (namespaces, XDP)")
    t0 = time.monotonic()
    lab = Lab(f"iqb{os.getpid() % 10000}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="iqn-bulk-") as tmp:
        try:
            for rate in args.rates.split(","):
                rows.append(run_one(lab, rate, args.kbit, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            lab.down()
    elapsed = time.monotonic() - t0
    lines = [
        SECTION, "",
        f"`sudo .venv/bin/python bench/bench_bulk_starve.py --rates {args.rates} --kbit {args.kbit}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} at the end; {elapsed:.0f} s. The namespace lab's "
        f"whole home link (OpenVPN, signal included) at the rate given from {STARVE_AT_S:g} s for "
        f"{STARVE_S:g} s of a {PLAY_S:g} s play; page host and player on a fixed window, {PAGE_STREAMS} "
        "streams (as the VM pair); the ISP agent with default options on the router's WAN side. "
        "*other per candidate*: what the bulk rule compares with `--bulk-ratio` (default "
        f"{DEFAULT_BULK_RATIO:g}), from each kept stall's log line; a video flow's false stall carries a "
        "segment or more per candidate (25 in tests/test_bulk_rule.py's video).", "",
        "| home link while starved | clip | player stalls (s) | agent stalls kept: duration s, candidates, "
        "other per candidate | discarded |",
        "|---|---:|---|---|---|",
    ]
    for r in rows:
        kept = "; ".join(f"{d:.1f}, {c}, **{o:.2f}**" for d, c, o in r["kept"] if c > 8) or "none"
        lines.append(f"| {r['rate']} | {r['kbit']} kbit/s | {', '.join(f'{x:.1f}' for x in r['player'])} | "
                     f"{kept} | {len(r['discarded'])} |")
    worst = max((o for r in rows for _, c, o in r["kept"] if c > 8), default=float("nan"))
    lines += ["", f"Highest figure of a real stall's signal: {worst:.2f} (limit {DEFAULT_BULK_RATIO:g}). "
              "Short stalls of 8 candidates or fewer (the player's start) are left out of the table.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        _results.write_section(SECTION, text)


if __name__ == "__main__":
    main()
