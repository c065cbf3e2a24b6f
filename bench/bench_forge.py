"""The forgery guard (issue 12, item 4): what it costs per packet and what it
stops.

1. Per-packet cost in the kernel (BPF_PROG_TEST_RUN, CPU time of the calling
   thread, median of interleaved rounds), each against an empty program of
   the same type loaded the same way in the same run: the TC egress program
   (``iqn_tc_egress``) on client packets, and ``iqn_xdp``'s candidate path
   with the guard (pairing and the per-client cap) against the same path
   without it. Records go to a ring buffer drained by a live reader thread.
2. A forging flood, live: a veth testbed, the real agent (``iqn-ctl attach``,
   defaults: pairing on), and bench/blast.c offering forged in-band
   candidates (spoofed sources including the real server, port 443, sizes
   in the band, 3 x 256 guessed client ports) as fast as it can for a few
   seconds, while the viewer's real signal runs. Reported: forged datagrams/s
   offered, false stalls recorded (must be 0), user-space records caused by
   the forger, and whether the real stall was inferred; then the same with
   ``--pairing off``.

    sudo .venv/bin/python bench/bench_forge.py [--rounds 15] [--secs 5] [--no-write]

Prints markdown tables and replaces the "## Forgery guard" section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _results  # noqa: E402
from bench_agent import OTHER_MAC, blast, build_blast  # noqa: E402
from bench_xdp import tcp_frame  # noqa: E402

from iqn_ctl.capture.frames import udp_frame  # noqa: E402
from iqn_ctl.engine.params import CandidateFilter  # noqa: E402
from iqn_ctl.live.bpf_testrun import TestRunner  # noqa: E402

SECTION = "## Forgery guard"
CMD = "sudo .venv/bin/python bench/bench_forge.py"
S, C = "198.18.0.1", "198.18.0.2"
XDP_PASS, TC_ACT_OK = 2, 0
RING_PAGES = 4096


def measure(runner: TestRunner, frame: bytes, repeat: int, verdict: int) -> float:
    """ns per run, from the calling thread's CPU time (see bench_xdp.measure)."""
    t0 = time.thread_time_ns()
    got, _ = runner.run(frame, repeat)
    cpu = time.thread_time_ns() - t0
    if got != verdict:
        raise SystemExit(f"bench: program returned {got}, not {verdict}")
    return cpu / repeat


def kernel_costs(rounds: int, repeat: int, cand_repeat: int) -> tuple[list[str], dict[str, int]]:
    from bcc import BPF

    from iqn_ctl.live.datapath import Datapath
    from iqn_ctl.live.settings import Guard

    filt = CandidateFilter()
    empty = BPF(text=b"int empty_xdp(struct xdp_md *c) { return XDP_PASS; }\n"
                     b"int empty_tc(struct __sk_buff *s) { return 0; }")
    e_xdp = TestRunner(empty.load_func(b"empty_xdp", BPF.XDP).fd)
    e_tc = TestRunner(empty.load_func(b"empty_tc", BPF.SCHED_CLS).fd)
    # guard off: the candidate path as it was; guard on: credits and a cap so high
    # that every measured candidate is paired and under its cap (the accept path)
    off = Datapath("lo", filt, ring_pages=RING_PAGES)
    on = Datapath("lo", filt, ring_pages=RING_PAGES, guard=Guard(True, 2.0, 1 << 20, 1e6))
    # forged: pairing on, nothing paired; capped: no pairing, a cap of one burst a second
    forged = Datapath("lo", filt, ring_pages=RING_PAGES, guard=Guard(True, 2.0, 16, 0.0))
    capped = Datapath("lo", filt, ring_pages=RING_PAGES, guard=Guard(False, 2.0, 16, 1.0))
    assert on.egress_fd is not None
    r_off, r_on, r_forged, r_capped = (TestRunner(d.prog_fd) for d in (off, on, forged, capped))
    egress = TestRunner(on.egress_fd)
    mid = (filt.min_size + filt.max_size) // 2
    cand = udp_frame(S, C, filt.port, 51234, frame_len=mid)
    req = udp_frame(C, S, 51234, filt.port, frame_len=80)
    stop = threading.Event()

    def drain(d: Datapath) -> None:
        while not stop.is_set():
            d.poll_batch(3)

    readers = [threading.Thread(target=drain, args=(d,), daemon=True) for d in (off, on)]
    for r in readers:
        r.start()
    xdp_rows: list[tuple[str, TestRunner, bytes, int]] = [
        ("candidate, no guard (ring record)", r_off, cand, cand_repeat),
        ("candidate, paired and under its cap (pair_check + client_cap + ring record)", r_on, cand,
         cand_repeat),
        ("forged candidate, unpaired (pair_check misses; no record)", r_forged, cand, repeat),
        ("candidate over its client's cap (client_cap only; no record)", r_capped, cand, repeat),
        ("UDP :443 outside the band, guard on (no guard code on this path)", r_on,
         udp_frame(S, C, filt.port, 51234, frame_len=filt.max_size + 100), repeat),
    ]
    tc_rows: list[tuple[str, bytes]] = [
        ("client UDP to :443, 80 B (pair_note: one hash update)", req),
        ("client UDP to another port", udp_frame(C, S, 51234, 4433, frame_len=80)),
        ("client TCP (to :443)", tcp_frame(80)),
    ]
    base: dict[str, list[float]] = {}
    cost: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            for label, runner, frame, rep in xdp_rows:
                if runner is r_on and frame is cand:
                    egress.run(req, rep)  # bank a credit per measured candidate (not timed)
                base.setdefault(label, []).append(measure(e_xdp, frame, rep, XDP_PASS))
                cost.setdefault(label, []).append(measure(runner, frame, rep, XDP_PASS))
            for label, frame in tc_rows:
                base.setdefault(label, []).append(measure(e_tc, frame, repeat, TC_ACT_OK))
                cost.setdefault(label, []).append(measure(egress, frame, repeat, TC_ACT_OK))
        counts = {k: on.counters()[k] for k in ("unpaired", "capped", "lost")}
        counts["forged_unpaired"] = forged.counters()["unpaired"]
        counts["capped_capped"] = capped.counters()["capped"]
        counts["off_lost"] = off.counters()["lost"]
    finally:
        stop.set()
        for r in readers:
            r.join()
        for d in (off, on, forged, capped):
            d.close()
        empty.cleanup()
    med = {k: (statistics.median(base[k]), statistics.median(cost[k])) for k in base}
    plain = med[xdp_rows[0][0]][1]
    lines = ["| program: packet | empty program ns/pkt | IQN ns/pkt | ratio to empty | vs no guard |",
             "|---|---:|---:|---:|---:|"]
    for label, *_ in xdp_rows:
        b, c = med[label]
        extra = f"{c - plain:+.1f} ns" if "candidate" in label and label != xdp_rows[0][0] else ""
        lines.append(f"| iqn_xdp: {label} | {b:.2f} | {c:.2f} | {c / b:.2f}x | {extra} |")
    for label, _ in tc_rows:
        b, c = med[label]
        lines.append(f"| iqn_tc_egress: {label} | {b:.2f} | {c:.2f} | {c / b:.2f}x | |")
    return lines, counts


# -- 2. a forging flood, live -------------------------------------------------------------


def forged_frames(tmp: Path, lab: Any, ports: int = 256) -> Path:
    """Forged in-band candidates: 3 spoofed sources (the real server's among them)
    x ``ports`` guessed client ports, sizes across the band, to the viewer."""
    macs = {"src_mac": bytes.fromhex(lab.srv_mac.replace(":", "")),
            "dst_mac": bytes.fromhex(OTHER_MAC.replace(":", ""))}
    sizes = (1180, 1212, 1250, 1288)
    path = tmp / "forged.bin"
    with open(path, "wb") as f:
        for i, src in enumerate((lab.srv4, lab.srv4b, lab.srv4.rsplit(".", 1)[0] + ".77")):
            for j in range(ports):
                fr = udp_frame(src, lab.cli4, 443, 41000 + j, sizes[(i + j) % 4], **macs)
                f.write(struct.pack("<H", len(fr)) + fr)
    return path


def forge_run(lab: Any, exe: str, frames: Path, tmp: Path, flags: tuple[str, ...], rate: float,
              secs: float) -> dict[str, Any]:
    import numpy as np

    from iqn_ctl.engine.synth import SignalModel, signal_times
    from iqn_ctl.live.api import ApiError, request, sock_path
    from iqn_lab.testbed import IQN_CTL

    name = "-".join(f.strip("-") for f in flags) or "defaults"
    run_dir, state = tmp / f"run-{name}", tmp / f"state-{name}"
    env = dict(os.environ, IQN_RUN_DIR=str(run_dir))
    agent = subprocess.Popen(lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(state), *flags),
                             env=env, stderr=subprocess.DEVNULL)
    sock = sock_path(run_dir, lab.cli_if)
    try:
        for _ in range(1200):
            try:
                request(sock, "status")
                break
            except ApiError:
                if agent.poll() is not None:
                    raise SystemExit("bench_forge: the agent did not start") from None
                time.sleep(0.1)
        sig = [float(t) for t in signal_times([(0.5, secs - 0.5)], SignalModel(), np.random.default_rng(5))]
        snd = lab.send({"lead": 0.3, "flows": [{"name": "real", "src": lab.srv4, "dst": lab.cli4,
                                                "dport": 40050, "frame": 1250, "times": sig}]})
        sent, took = blast(lab, exe, rate, secs, frames)
        out, _ = snd.communicate(timeout=120)
        real = len(json.loads(out)["sent"]["real"])
        deadline = time.time() + 60
        while time.time() < deadline:
            st = dict(request(sock, "status"))
            if st["candidates"] >= sent + real and st["flows_in_stall"] == 0:
                break
            time.sleep(0.2)
        recs = [json.loads(x) for x in subprocess.run(
            ["ip", "netns", "exec", lab.cli_ns, IQN_CTL, "stalls", "--json", "--state-dir", str(state)],
            env=env, capture_output=True, text=True, timeout=120).stdout.splitlines()]
    finally:
        agent.terminate()
        agent.wait(30)
    false = [r for r in recs if not r["flow"].endswith(":40050")]
    return {"flags": " ".join(flags) or "defaults (pairing on, cap 50)",
            "offered": sent / took, "sent": sent, "seen": st["candidates"] - real,
            "unpaired": st["unpaired"], "capped": st["capped"], "records": st["events"] + st["lost"] - real,
            "lost": st["lost"], "false_stalls": len(false),
            "real_stall": sum(1 for r in recs if r["flow"].endswith(":40050"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1_000_000, help="runs per BPF_PROG_TEST_RUN call")
    ap.add_argument("--cand-repeat", type=int, default=65536, help="runs per call for recorded candidates")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--rate", type=float, default=400e3, help="forged datagrams/s blast.c aims at")
    ap.add_argument("--secs", type=float, default=5.0, help="seconds of forging per run")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_forge: error: needs root (BPF, namespaces): run with sudo")
    from iqn_lab.testbed import Testbed

    t0 = time.monotonic()
    lines, counts = kernel_costs(args.rounds, args.repeat, args.cand_repeat)
    print("\n".join(lines), flush=True)
    print(counts, flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="iqn-forge-") as td, Testbed() as lab:
        tmp = Path(td)
        exe = build_blast(tmp)
        frames = forged_frames(tmp, lab)
        for flags in ((), ("--pairing", "off"), ("--pairing", "off", "--cap", "0")):
            r = forge_run(lab, exe, frames, tmp, flags, args.rate, args.secs)
            print(r, flush=True)
            runs.append(r)
    elapsed = time.monotonic() - t0
    live = ["| agent | forged in-band datagrams/s offered (sent) | seen by XDP "
            "| kept back: unpaired / capped | user-space records caused | false stalls recorded "
            "| real stall recorded |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        live.append(f"| {r['flags']} | {r['offered']:,.0f} ({r['sent']:,}) | {r['seen']:,} | "
                    f"{r['unpaired']:,} / {r['capped']:,} | {r['records']:,} | {r['false_stalls']} | "
                    f"{r['real_stall']} |")
    cpu = _results.cpu_model()
    body = (
        f"{SECTION}\n\n"
        f"`iqn_xdp.c`'s forgery guard ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; kernel "
        f"{platform.release()}, {cpu}, {os.cpu_count()} CPUs; {elapsed:.0f} s). Re-run: `{CMD}`\n\n"
        "Per-packet cost, BPF_PROG_TEST_RUN, each against an empty program of the same type in the same "
        f"run (median of {args.rounds} interleaved calls x {args.repeat:,} runs, {args.cand_repeat:,} for "
        "recorded candidates; a live reader drains the ring). The guard runs only on candidates; "
        "\"vs no guard\" is the candidate check's own cost.\n\n"
        + "\n".join(lines) + "\n\n"
        f"A forging flood, live (veth, native XDP, the agent with its defaults: `--cap` 50 bursts/s per "
        f"client): bench/blast.c sends {args.secs:g} s of forged candidates (3 spoofed sources, the real "
        "server's among them, x 256 guessed client ports, 1,180-1,288 B, port 443) at the viewer while "
        "its real signal runs (QUIC-shaped: the testbed's client requests before each answer). The same "
        "with `--pairing off` (the cap alone) and `--pairing off --cap 0` (no guard) shows what each "
        "part stops; \"real stall recorded\" counts the viewer's stall records (1: intact).\n\n"
        + "\n".join(live) + "\n"
    )
    print(body)
    if not args.no_write:
        _results.write_section(SECTION, body)


if __name__ == "__main__":
    main()
