"""Forwarding through a router namespace (issue 12): what IQN costs a router.

sender ns --veth--> router ns (ip_forward) --veth--> sink ns. bench/blast.c
(frame-file mode, pinned to CPU 1) offers fixed frames as fast as it can; the
router's ingress veth carries, in turn, no XDP program, an empty XDP_PASS
program (native mode, loaded with bcc) and the IQN agent (``iqn-ctl attach``,
native XDP, the agent pinned to CPU 0). Delivered = packets the sink's veth
received (its rx_packets counter; the sink drops them, not being the
destination, and sends nothing back). The veth receive path, XDP, forwarding
and the sink's receive all run on the sender's CPU, so delivered packets/s is
what one core forwards.

Traffic: (a) bulk QUIC-like video: 64 flows from UDP port 443, frames of
1,292-1,350 bytes (outside the candidate band); (b) a realistic mix: 70 % QUIC
video 1,292-1,350 B, 8 % burst tails (100-1,291 B, some in the candidate band),
10 % web QUIC server packets of 1,200-1,252 B (in the band: candidates), 7 %
TCP from port 443 (1,514-byte segments and 66-byte ACKs), 5 % DNS answers
(80-300 B from port 53). Rounds interleave the three modes; medians reported.

Run as root: ``sudo .venv/bin/python bench/bench_forward.py [--secs 3] [--rounds 3]
[--no-write]``. Time budget: about 2.5 minutes with the defaults.
Writes the "## Forwarding through a router" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

import _results  # noqa: E402  (bench/ is on sys.path when run as a script)

from iqn_ctl.capture.frames import _csum, udp_frame  # noqa: E402
from iqn_ctl.live.api import ApiError, request, sock_path  # noqa: E402
from iqn_lab.testbed import IQN_CTL, PY, run_prefix, sh  # noqa: E402

SECTION = "## Forwarding through a router"
CMD = "sudo .venv/bin/python bench/bench_forward.py"
AGENT_CPU, SENDER_CPU = "0", "1"
TARGET = 0.97


class Router:
    """Three namespaces (sender, router, sink), two veth pairs, forwarding on."""

    def __init__(self) -> None:
        p = run_prefix()
        self.ns = {r: f"{p}{r}" for r in ("s", "r", "k")}
        self.snd_if, self.rin, self.rout, self.sink_if = f"{p}S", f"{p}A", f"{p}B", f"{p}K"
        n = random.randrange(1, 250)
        self.snd4, self.rin4 = f"198.18.{n}.1", f"198.18.{n}.2"
        self.rout4, self.sink4 = f"198.19.{n}.1", f"198.19.{n}.2"
        self.dst_net = f"198.19.{n}.128/25"  # routed to the sink, which does not own it
        self.dst_base = f"198.19.{n}.128"
        self.created: list[str] = []

    def __enter__(self) -> Router:
        try:
            s, r, k = self.ns["s"], self.ns["r"], self.ns["k"]
            for ns in (s, r, k):
                sh("ip", "netns", "add", ns)
                self.created.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh(
                "ip",
                "link",
                "add",
                self.snd_if,
                "netns",
                s,
                "type",
                "veth",
                "peer",
                "name",
                self.rin,
                "netns",
                r,
            )
            sh(
                "ip",
                "link",
                "add",
                self.rout,
                "netns",
                r,
                "type",
                "veth",
                "peer",
                "name",
                self.sink_if,
                "netns",
                k,
            )
            sh("ip", "-n", s, "addr", "add", f"{self.snd4}/24", "dev", self.snd_if)
            sh("ip", "-n", r, "addr", "add", f"{self.rin4}/24", "dev", self.rin)
            sh("ip", "-n", r, "addr", "add", f"{self.rout4}/25", "dev", self.rout)
            sh("ip", "-n", k, "addr", "add", f"{self.sink4}/25", "dev", self.sink_if)
            for ns, dev in ((s, self.snd_if), (r, self.rin), (r, self.rout), (k, self.sink_if)):
                sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.sink_mac = self.mac(k, self.sink_if)
            self.rin_mac, self.snd_mac = self.mac(r, self.rin), self.mac(s, self.snd_if)
            sh(
                "ip",
                "-n",
                r,
                "neigh",
                "replace",
                self.sink4,
                "lladdr",
                self.sink_mac,
                "dev",
                self.rout,
                "nud",
                "permanent",
            )
            sh("ip", "-n", r, "route", "add", self.dst_net, "via", self.sink4)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def mac(ns: str, dev: str) -> str:
        return str(json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", dev).stdout)[0]["address"])

    def close(self) -> None:
        for ns in reversed(self.created):
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()

    def delivered(self) -> int:
        out = sh(
            "ip", "netns", "exec", self.ns["k"], "cat", f"/sys/class/net/{self.sink_if}/statistics/rx_packets"
        )
        return int(out.stdout)


# -- frames ---------------------------------------------------------------------------------------


def tcp_frame(src: str, dst: str, sport: int, dport: int, frame_len: int, macs: dict[str, bytes]) -> bytes:
    ip_len = frame_len - 14
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        ip_len,
        0,
        0x4000,
        64,
        6,
        0,
        bytes(map(int, src.split("."))),
        bytes(map(int, dst.split("."))),
    )
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    return macs["dst_mac"] + macs["src_mac"] + b"\x08\x00" + hdr + tcp + bytes(ip_len - 40)


def mix_frames(rt: Router, kind: str, rng: random.Random) -> list[bytes]:
    macs = {
        "src_mac": bytes.fromhex(rt.snd_mac.replace(":", "")),
        "dst_mac": bytes.fromhex(rt.rin_mac.replace(":", "")),
    }
    base = [int(x) for x in rt.dst_base.split(".")]

    def dst(i: int) -> str:
        return f"{base[0]}.{base[1]}.{base[2]}.{base[3] + i % 120}"

    def udp(sport: int, i: int, size: int) -> bytes:
        return udp_frame(rt.snd4, dst(i), sport, 40000 + i % 64, size, **macs)

    out = []
    for i in range(2000):
        if kind == "bulk":
            out.append(udp(443, i, rng.choice((1292, 1350)) if i % 4 else rng.randint(1292, 1350)))
            continue
        x = rng.random()
        if x < 0.70:
            out.append(udp(443, i, rng.randint(1292, 1350)))
        elif x < 0.78:
            out.append(udp(443, i, rng.randint(100, 1291)))
        elif x < 0.88:
            out.append(udp(443, i + 64, rng.randint(1200, 1252)))
        elif x < 0.95:
            out.append(
                tcp_frame(rt.snd4, dst(i), 443, 50000 + i % 32, 1514 if rng.random() < 0.7 else 66, macs)
            )
        else:
            out.append(udp(53, i, rng.randint(80, 300)))
    return out


def write_frames(path: Path, frames: list[bytes]) -> Path:
    with open(path, "wb") as f:
        for fr in frames:
            f.write(struct.pack("<H", len(fr)) + fr)
    return path


# -- modes ----------------------------------------------------------------------------------------

EMPTY = "int empty_pass(struct xdp_md *ctx) { return XDP_PASS; }"


def attach_empty(rt: Router) -> None:
    load = (
        f"from bcc import BPF; b = BPF(text={EMPTY!r}); "
        f"BPF.attach_xdp({rt.rin!r}, b.load_func('empty_pass', BPF.XDP), 1 << 2)"
    )
    subprocess.run(
        ["ip", "netns", "exec", rt.ns["r"], PY, "-c", load], check=True, capture_output=True, timeout=300
    )


def detach_xdp(rt: Router) -> None:
    sh("ip", "-n", rt.ns["r"], "link", "set", "dev", rt.rin, "xdp", "off")


class Iqn:
    def __init__(self, rt: Router, tmp: Path) -> None:
        env = dict(os.environ, IQN_RUN_DIR=str(tmp / "run"))
        self.sock = sock_path(tmp / "run", rt.rin)
        self.proc = subprocess.Popen(
            [
                "taskset",
                "-c",
                AGENT_CPU,
                "ip",
                "netns",
                "exec",
                rt.ns["r"],
                IQN_CTL,
                "attach",
                rt.rin,
                "--state-dir",
                str(tmp / "state"),
                "--xdp-mode",
                "native",
            ],
            env=env,
            stderr=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        for _ in range(3000):
            try:
                request(self.sock, "ping", timeout=5.0)
                return
            except ApiError:
                if self.proc.poll() is not None:
                    sys.exit("bench_forward: the agent did not start")
                time.sleep(0.1)
        sys.exit("bench_forward: the agent did not come up")

    def status(self) -> dict[str, Any]:
        return dict(request(self.sock, "status", timeout=30.0))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def blast(rt: Router, exe: str, frames: Path, secs: float) -> tuple[int, float]:
    r = subprocess.run(
        [
            "taskset",
            "-c",
            SENDER_CPU,
            "ip",
            "netns",
            "exec",
            rt.ns["s"],
            exe,
            rt.snd_if,
            "0",  # as fast as it can
            str(secs),
            str(frames),
        ],
        capture_output=True,
        text=True,
        timeout=secs * 10 + 60,
    )
    if r.returncode:
        sys.exit(f"bench_forward: blast failed: {r.stderr}")
    kv = dict(x.split("=") for x in r.stdout.split())
    return int(kv["sent"]), float(kv["secs"])


def measure(rt: Router, exe: str, frames: Path, secs: float) -> dict[str, float]:
    d0 = rt.delivered()
    sent, took = blast(rt, exe, frames, secs)
    time.sleep(0.3)
    got = rt.delivered() - d0
    return {"offered": sent / took, "delivered": got / took, "sent": sent, "got": got}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--secs", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_forward: needs root (namespaces, XDP)")
    t0 = time.time()
    res: dict[tuple[str, str], list[dict[str, float]]] = {}
    agent_cands = 0
    agent_lost = 0
    with tempfile.TemporaryDirectory(prefix="iqn-fwd-") as td, Router() as rt:
        tmp = Path(td)
        exe = tmp / "blast"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "bench" / "blast.c")], check=True)
        rng = random.Random(1)
        files = {k: write_frames(tmp / f"{k}.bin", mix_frames(rt, k, rng)) for k in ("bulk", "mix")}
        for rnd in range(args.rounds):
            for mode in ("none", "empty", "iqn"):
                agent = None
                if mode == "empty":
                    attach_empty(rt)
                elif mode == "iqn":
                    agent = Iqn(rt, tmp / f"iqn{rnd}")
                try:
                    for kind, path in files.items():
                        before = agent.status() if agent else None
                        m = measure(rt, str(exe), path, args.secs)
                        if agent and before:
                            after = agent.status()
                            agent_cands += after["candidates"] - before["candidates"]
                            agent_lost += after["lost"] - before["lost"]
                        res.setdefault((kind, mode), []).append(m)
                        print(
                            f"round {rnd} {mode:5} {kind:4}: offered {m['offered']:,.0f}/s "
                            f"delivered {m['delivered']:,.0f}/s",
                            flush=True,
                        )
                finally:
                    if mode == "empty":
                        detach_xdp(rt)
                    if agent:
                        agent.stop()
    elapsed = time.time() - t0
    load = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    med = {k: statistics.median(m["delivered"] for m in v) for k, v in res.items()}
    off = {k: statistics.median(m["offered"] for m in v) for k, v in res.items()}
    lines = [
        SECTION,
        "",
        f"`{CMD}{f' --secs {args.secs:g}' if args.secs != 3 else ''}"
        f"{f' --rounds {args.rounds}' if args.rounds != 3 else ''}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, kernel {platform.release()}, "
        f"{os.cpu_count()} CPUs shared with other work (load average at the end {load}); sender ns -> router "
        "ns (ip_forward) -> sink ns over veth, bench/blast.c frame-file mode pinned to CPU 1 offering "
        f"as fast as it can, {args.secs:g} s per measurement, {args.rounds} rounds interleaving the modes "
        f"(median shown); the IQN agent (defaults, native XDP) pinned to CPU 0; {elapsed:.0f} s in all. "
        "Baseline: the empty XDP_PASS program in the same rounds.",
        "",
        "| traffic | offered /s | delivered, no program /s | delivered, empty XDP /s | delivered, IQN /s "
        "| empty / none | IQN / empty | target IQN >= 97 % of empty |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    names = {
        "bulk": "(a) bulk QUIC-like video from :443, 1,292-1,350 B",
        "mix": "(b) realistic mix (video + tails, web QUIC in band, TCP, DNS)",
    }
    for kind in ("bulk", "mix"):
        n, e, i = med[kind, "none"], med[kind, "empty"], med[kind, "iqn"]
        lines.append(
            f"| {names[kind]} | {off[kind, 'none']:,.0f} | {n:,.0f} | {e:,.0f} | {i:,.0f} | "
            f"{e / n:.3f} | {i / e:.3f} | {'met' if i / e >= TARGET else 'MISSED'} |"
        )
    lines += [
        "",
        "Per round (delivered /s): "
        + "; ".join(
            f"{kind} {mode}: " + ", ".join(f"{m['delivered']:,.0f}" for m in res[kind, mode])
            for kind in ("bulk", "mix")
            for mode in ("none", "empty", "iqn")
        )
        + ".",
        f"Candidates the IQN program counted during its measurements: {agent_cands:,} (lost in the ring: "
        f"{agent_lost:,}).",
        "",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        _results.write_section(SECTION, text)


if __name__ == "__main__":
    main()
