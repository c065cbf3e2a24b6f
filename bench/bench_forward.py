"""Forwarding through a router namespace (issue 12): what IQN costs a router.

sender ns --veth--> router ns (ip_forward) --veth--> sink ns. bench/blast.c
(frame-file mode, pinned to CPU 1) offers fixed frames as fast as it can; the
router's ingress veth carries, in turn, no XDP program, an empty XDP_PASS
program (native mode, loaded with bcc) and the IQN agent (``iqn-ctl attach``,
native XDP, the agent pinned to CPU 0). Delivered = packets the sink's veth
received (its rx_packets counter; the sink drops them, not being the
destination, and sends nothing back).

What is compared: the veth receive path, XDP, forwarding and the sink's
receive all run in the sender's context on CPU 1 (softirqs at its
local_bh_enable), and the sender never waits, so packets per wall-clock second
are (the share of CPU 1 the sender got) / (CPU cost of a packet). On this
shared 2-core box the share swings from 0.3 to 1.0 with the other helpers'
load, which is what made the first runs' IQN / empty ratio 0.67-0.69. The
bench therefore reports packets delivered per CPU second of the sender (its
own CLOCK_PROCESS_CPUTIME_ID, which blast prints, plus CPU 1's ksoftirqd):
what one core forwards, the figure a router's capacity depends on. The
wall-clock rate and the share are still shown.

Modes (``--modes``, MODES below; ``all`` for every one) take the IQN mode
apart: the program held by a process that never polls, with and without the
pairing classifier, the agent without pairing, on the sender's CPU, a clsact
qdisc or an empty egress classifier beside the empty program, a loop waking
every 3 ms on CPU 0, and the TC hook against an empty TC classifier. Each
round runs the modes in a fresh random order. ``--ab`` instead keeps one
agent and swaps, in place, the empty program for IQN's and the agent's loop
between stopped (SIGSTOP) and running, so compared states are seconds apart.

Traffic: (a) bulk QUIC-like video: 64 flows from UDP port 443, frames of
1,292-1,350 bytes (outside the candidate band); (b) a realistic mix: 70 % QUIC
video 1,292-1,350 B, 8 % burst tails (100-1,291 B, some in the candidate band),
10 % web QUIC server packets of 1,200-1,252 B (in the band: candidates), 7 %
TCP from port 443 (1,514-byte segments and 66-byte ACKs), 5 % DNS answers
(80-300 B from port 53).

Run as root: ``sudo .venv/bin/python bench/bench_forward.py [--secs 3] [--rounds 3]
[--modes none,empty,iqn | all] [--ab] [--prefix P] [--no-write]``. Time budget:
about 2.5 minutes with the defaults, 25 s a round for ``--modes all`` plus
about 10 s per agent or program start, 17 s a round for ``--ab``.
Writes the "## Forwarding through a router" section of bench/RESULTS.md
(``--ab``: "## Forwarding through a router: paired states").
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
AB_SECTION = "## Forwarding through a router: paired states"
CMD = "sudo .venv/bin/python bench/bench_forward.py"
AGENT_CPU, SENDER_CPU = "0", "1"
TARGET = 0.97


class Router:
    """Three namespaces (sender, router, sink), two veth pairs, forwarding on."""

    def __init__(self, prefix: str | None = None) -> None:
        p = prefix or run_prefix()
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
#
# A mode is what sits on the router's ingress veth (and around it) while blast offers frames. The
# three of the table (none, empty, iqn) answer issue 12; the others take the IQN mode apart, so a
# gap between "iqn" and "empty" can be pinned on one piece: the program itself, held by a process
# that never polls ("prog"), the forgery guard's egress classifier ("prog-nopair", "iqn-nopair"),
# a clsact qdisc or an empty egress classifier beside the empty XDP program, a loop that wakes
# every 3 ms on CPU 0 as the idle agent does ("empty+wake0"), the agent on the sender's CPU
# ("iqn-cpu1"), and the TC hook against an empty TC classifier ("tc-empty", "iqn-tc").

#: CPU seconds the "burn" holder spins after each 3 ms poll: ~5 % of a core, the agent's own
BURN_S = 0.00016


def hold(kind: str, iface: str) -> None:
    """``--hold KIND IFACE`` (run in the router namespace by :class:`Holder`): set up one piece,
    say ``ready``, keep it until stdin closes, remove it. The process holds the program's fds,
    as the agent does, and otherwise sleeps: it never polls, reads a map or wakes up."""
    from bcc import BPF
    from bench_hooks import EMPTY_SRC  # empty_xdp and empty_tc (TC_ACT_UNSPEC, as IQN's)

    from iqn_ctl.engine.params import CandidateFilter
    from iqn_ctl.live import tc
    from iqn_ctl.live.agent import AgentConfig
    from iqn_ctl.live.datapath import Datapath
    from iqn_ctl.live.settings import Guard

    undo: list[Any] = []
    if kind == "xdp-empty":
        b = BPF(text=EMPTY_SRC)
        BPF.attach_xdp(iface, b.load_func("empty_xdp", BPF.XDP), 1 << 2)
        undo.append(lambda: BPF.remove_xdp(iface, 1 << 2))
    elif kind == "clsact":
        tc.ensure_clsact(iface)
        undo.append(lambda: sh("tc", "qdisc", "del", "dev", iface, "clsact", check=False))
    elif kind in ("tc-empty", "egress-empty"):
        b = BPF(text=EMPTY_SRC)
        fn = b.load_func("empty_tc", BPF.SCHED_CLS)
        # tc.py attaches only names of IQN's prefix; the qdisc goes with the filter at the end
        tc.attach(iface, int(fn.fd), "iqn_empty_tc", "ingress" if kind == "tc-empty" else "egress")
        undo.append(lambda: sh("tc", "qdisc", "del", "dev", iface, "clsact", check=False))
    elif kind.startswith("prog"):
        guard = AgentConfig(iface=iface).guard()  # the agent's default guard (pairing on, cap 10/p)
        if kind == "prog-nopair":
            guard = Guard(False, guard.window, guard.credits, guard.cap)
        dp = Datapath(iface, CandidateFilter(), xdp_mode="native", guard=guard,
                      hook="tc" if kind == "prog-tc" else "xdp")
        dp.attach()
        undo.append(dp.detach)
    elif kind in ("wake", "burn"):
        import select

        # the idle agent's loop without the agent: a poll that times out every IDLE_POLL_MS;
        # "burn" also spins BURN_S after each, about the agent's own CPU (~5 % of a core)
        from iqn_ctl.live.agent import IDLE_POLL_MS

        poller = select.poll()
        spin = BURN_S if kind == "burn" else 0.0
        print("ready", flush=True)
        while not select.select([sys.stdin], [], [], 0)[0]:
            poller.poll(IDLE_POLL_MS)
            t = time.thread_time() + spin
            while time.thread_time() < t:
                pass
        return
    else:
        sys.exit(f"bench_forward: unknown holder {kind!r}")
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        for f in reversed(undo):
            f()


class Holder:
    """One :func:`hold` process in the router namespace, pinned to ``cpu`` (None: not pinned)."""

    def __init__(self, rt: Router, kind: str, cpu: str | None) -> None:
        pin = ["taskset", "-c", cpu] if cpu is not None else []
        self.proc = subprocess.Popen(
            [*pin, "ip", "netns", "exec", rt.ns["r"], PY, str(Path(__file__).resolve()),
             "--hold", kind, rt.rin],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            err = self.proc.stderr.read() if self.proc.stderr else ""
            sys.exit(f"bench_forward: holder {kind} failed: {line}{err}")

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)


class Iqn:
    """The IQN agent (``iqn-ctl attach``, native XDP unless ``extra`` says otherwise) pinned to ``cpu``."""

    def __init__(self, rt: Router, tmp: Path, cpu: str, extra: tuple[str, ...] = ()) -> None:
        env = dict(os.environ, IQN_RUN_DIR=str(tmp / "run"))
        self.sock = sock_path(tmp / "run", rt.rin)
        mode = () if "--hook" in extra else ("--xdp-mode", "native")
        self.proc = subprocess.Popen(
            ["taskset", "-c", cpu, "ip", "netns", "exec", rt.ns["r"], IQN_CTL, "attach", rt.rin,
             "--state-dir", str(tmp / "state"), *mode, *extra],
            env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
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


def ab_hold(iface: str) -> None:
    """``--ab-hold IFACE`` (run in the router namespace by :func:`run_ab`): hold the empty program
    and the agent's own (by its id), and on each stdin line ``empty`` or ``iqn`` attach that one
    in its place (native XDP; the replace is atomic), answering ``ok``."""
    from bcc import BPF, libbcc
    from bench_hooks import EMPTY_SRC

    from iqn_ctl.live.datapath import xdp_program_on

    b = BPF(text=EMPTY_SRC)
    on = xdp_program_on(iface)
    if on is None:
        sys.exit("bench_forward: the agent's program is not attached")
    progs = {"empty": b.load_func("empty_xdp", BPF.XDP),
             "iqn": BPF.Function(b, on[1].encode(), libbcc.lib.bpf_prog_get_fd_by_id(on[0]))}
    print("ready", flush=True)
    for line in sys.stdin:
        BPF.attach_xdp(iface, progs[line.strip()], 1 << 2)
        print("ok", flush=True)


#: paired states of --ab: (the program attached, the agent's loop running)
AB_STATES = {"empty": ("empty", False), "prog": ("iqn", False), "iqn": ("iqn", True),
             "empty+agent": ("empty", True), "empty+burn0": ("empty", False)}
AB_WHAT = {
    "empty": "empty XDP_PASS program attached, the agent stopped (SIGSTOP): the baseline",
    "prog": "IQN's program (and its pairing classifier) attached, the agent stopped",
    "iqn": "IQN's program attached, the agent running (on CPU 0)",
    "empty+agent": "the empty program attached, the agent running: its loop alone",
    "empty+burn0": "the empty program, the agent stopped, a loop on CPU 0 using about the agent's CPU "
                   "(poll 3 ms, spin 0.16 ms)",
}


def run_ab(rt: Router, exe: str, files: dict[str, Path], tmp: Path, args: argparse.Namespace,
           rng: random.Random) -> dict[tuple[str, str], list[dict[str, float]]]:
    """One agent and one holder for the whole run; each round visits the states of
    :data:`AB_STATES` in a fresh random order, switching in milliseconds (a program swap, a
    SIGSTOP or SIGCONT), so that compared measurements are seconds apart."""
    import signal

    res: dict[tuple[str, str], list[dict[str, float]]] = {}
    agent = Iqn(rt, tmp / "ab", AGENT_CPU, ("--watchdog", "0"))  # it must not take the hook back
    holder = subprocess.Popen(
        ["ip", "netns", "exec", rt.ns["r"], PY, str(Path(__file__).resolve()), "--ab-hold", rt.rin],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    burner = Holder(rt, "burn", AGENT_CPU)
    os.kill(burner.proc.pid, signal.SIGSTOP)
    burning = False
    try:
        if holder.stdout.readline().strip() != "ready":
            sys.exit("bench_forward: the --ab holder did not start")
        running = True
        for rnd in range(args.rounds):
            order = list(AB_STATES)
            rng.shuffle(order)
            for state in order:
                prog, run = AB_STATES[state]
                holder.stdin.write(prog + "\n")
                holder.stdin.flush()
                if holder.stdout.readline().strip() != "ok":
                    sys.exit("bench_forward: the --ab holder failed")
                if run != running:
                    os.kill(agent.proc.pid, signal.SIGCONT if run else signal.SIGSTOP)
                    running = run
                if (state == "empty+burn0") != burning:
                    burning = not burning
                    os.kill(burner.proc.pid, signal.SIGCONT if burning else signal.SIGSTOP)
                time.sleep(0.2)
                for kind, path in files.items():
                    m = measure(rt, exe, path, args.secs, agent.proc.pid)
                    res.setdefault((kind, state), []).append(m)
                    print(f"ab round {rnd} {state:12} {kind:4}: per CPU-s {m['per_cpu_s']:,.0f} "
                          f"delivered {m['delivered']:,.0f}/s share {m['share']:.2f} "
                          f"agent {m['agent']:.3f} load {m['load']:.1f} CPU 1 idle {m['idle1']:.2f} "
                          f"sender waits/s {m['waits']:,.0f} preempted/s {m['preempted']:,.0f}", flush=True)
        holder.stdin.write("iqn\n")  # the agent detaches its own program only
        holder.stdin.flush()
        holder.stdout.readline()
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
        os.kill(burner.proc.pid, signal.SIGCONT)
        burner.stop()
        holder.stdin.close()
        holder.wait(60)
        agent.stop()
    return res


#: mode -> its pieces: ("hold", kind, cpu) or ("agent", cpu, extra flags)
MODES: dict[str, list[tuple[Any, ...]]] = {
    "none": [],
    "empty": [("hold", "xdp-empty", None)],
    "iqn": [("agent", AGENT_CPU, ())],
    "prog": [("hold", "prog", AGENT_CPU)],
    "prog-nopair": [("hold", "prog-nopair", AGENT_CPU)],
    "iqn-nopair": [("agent", AGENT_CPU, ("--pairing", "off"))],
    "iqn-cpu1": [("agent", SENDER_CPU, ())],
    "empty+clsact": [("hold", "xdp-empty", None), ("hold", "clsact", None)],
    "empty+egress": [("hold", "xdp-empty", None), ("hold", "egress-empty", None)],
    "empty+wake0": [("hold", "xdp-empty", None), ("hold", "wake", AGENT_CPU)],
    "empty+burn0": [("hold", "xdp-empty", None), ("hold", "burn", AGENT_CPU)],
    "tc-empty": [("hold", "tc-empty", None)],
    "prog-tc": [("hold", "prog-tc", AGENT_CPU)],
    "iqn-tc": [("agent", AGENT_CPU, ("--hook", "tc"))],
}
BASIC = ("none", "empty", "iqn")
WHAT = {
    "none": "no program",
    "empty": "empty XDP_PASS program (native), the baseline",
    "iqn": "the IQN agent (defaults, native XDP, pairing on) on CPU 0",
    "prog": "IQN's program and pairing classifier, held by a process that never polls",
    "prog-nopair": "IQN's program compiled without pairing (no egress classifier), never polled",
    "iqn-nopair": "the agent with --pairing off (no egress classifier) on CPU 0",
    "iqn-cpu1": "the agent on CPU 1, the sender's (and forwarding) CPU",
    "empty+clsact": "empty XDP + a clsact qdisc on the interface, no classifier",
    "empty+egress": "empty XDP + an empty TC egress classifier (where the pairing one sits)",
    "empty+wake0": "empty XDP + a loop on CPU 0 that sleeps in poll() 3 ms at a time, as the idle agent",
    "empty+burn0": "empty XDP + that loop spinning 0.16 ms after each wake-up (~5 % of a core, "
                   "the agent's own CPU)",
    "tc-empty": "an empty TC ingress classifier (the TC hook's baseline)",
    "prog-tc": "IQN's TC ingress classifier and pairing classifier, held by a process that never polls",
    "iqn-tc": "the agent with --hook tc on CPU 0",
}


def setup(rt: Router, mode: str, tmp: Path) -> tuple[list[Any], Iqn | None]:
    held: list[Any] = []
    agent = None
    try:
        for piece in MODES[mode]:
            if piece[0] == "hold":
                held.append(Holder(rt, piece[1], piece[2]))
            else:
                agent = Iqn(rt, tmp, piece[1], piece[2])
                held.append(agent)
    except BaseException:
        for h in reversed(held):
            h.stop()
        raise
    return held, agent


#: --rt: run the sender SCHED_FIFO (chrt -f 1), so the box's other work cannot take CPU 1 from
#: it (the kernel's RT throttling still leaves them 5 %)
RT: list[str] = []


def blast(rt: Router, exe: str, frames: Path, secs: float) -> dict[str, float]:
    r = subprocess.run(
        [*RT, "taskset", "-c", SENDER_CPU, "ip", "netns", "exec", rt.ns["s"], exe, rt.snd_if,
         "0", str(secs), str(frames)],  # rate 0: as fast as it can
        capture_output=True, text=True, timeout=secs * 10 + 60,
    )
    if r.returncode:
        sys.exit(f"bench_forward: blast failed: {r.stderr}")
    return {k: float(v) for k, v in (x.split("=") for x in r.stdout.split())}


def ksoftirqd_ns(cpu: str) -> int:
    """Run time so far (ns, /proc/PID/schedstat) of the CPU's ksoftirqd: softirq work the kernel
    deferred there instead of running it in the sender's context."""
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "comm").read_text().strip() == f"ksoftirqd/{cpu}":
                return int((d / "schedstat").read_text().split()[0])
        except OSError:
            continue
    return 0


def cpu_ticks() -> list[list[int]]:
    """Each CPU's /proc/stat jiffies so far: user nice system idle iowait irq softirq steal."""
    out = []
    for line in Path("/proc/stat").read_text().splitlines()[1:]:
        if not line.startswith("cpu"):
            break
        out.append([int(x) for x in line.split()[1:9]])
    return out


def task_ns(pid: int) -> int:
    """CPU time (ns) of every thread of ``pid`` so far; 0 once it is gone."""
    total = 0
    try:
        for t in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((t / "schedstat").read_text().split()[0])
            except OSError:
                continue
    except OSError:
        return 0
    return total


def measure(rt: Router, exe: str, frames: Path, secs: float, agent: int | None = None) -> dict[str, float]:
    """One blast run. ``delivered``: packets/s the sink received. The sender offers as fast as it
    can and, on veth, runs the router's receive path, XDP, forwarding and the sink's receive in
    its own context (softirqs on its CPU): so delivered/s is the share of CPU 1 the sender got
    (other work on the box takes the rest) divided by the CPU cost of a packet. ``per_cpu_s``:
    packets delivered per CPU second of the sender plus CPU 1's ksoftirqd, the cost alone."""
    d0, c0, l0, k0 = rt.delivered(), cpu_ticks(), os.getloadavg()[0], ksoftirqd_ns(SENDER_CPU)
    a0 = task_ns(agent) if agent else 0
    b = blast(rt, exe, frames, secs)
    time.sleep(0.3)
    got = rt.delivered() - d0
    took = b["secs"]
    cpu = b["cpu"] + (ksoftirqd_ns(SENDER_CPU) - k0) / 1e9
    hz = os.sysconf("SC_CLK_TCK")
    c1 = cpu_ticks()
    d = [[b - a for a, b in zip(x, y, strict=True)] for x, y in zip(c0, c1, strict=True)]
    busy0 = (sum(d[0]) - d[0][3] - d[0][4]) / hz / (took + 0.3)
    cpu1 = int(SENDER_CPU)
    idle1 = (d[cpu1][3] + d[cpu1][4]) / max(1, sum(d[cpu1]))
    agent_cpu = (task_ns(agent) - a0) / 1e9 / (took + 0.3) if agent else 0.0
    return {"offered": b["sent"] / took, "delivered": got / took, "sent": b["sent"], "got": got,
            "cpu0": busy0, "load": l0, "share": cpu / took, "per_cpu_s": got / cpu, "agent": agent_cpu,
            "idle1": idle1, "waits": b["waits"] / took, "preempted": b["preempted"] / took}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--secs", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default=",".join(BASIC),
                    help=f"comma-separated, from: {', '.join(MODES)}; 'all' for every one")
    ap.add_argument("--prefix", default=None, help="namespace/interface prefix (default: a fresh one)")
    ap.add_argument("--seed", type=int, default=1, help="for the frames and the order of the modes")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--ab", action="store_true",
                    help="paired states with one agent, switched in place (AB_STATES), not --modes")
    ap.add_argument("--rt", action="store_true", help="run the sender SCHED_FIFO (chrt -f 1) on CPU 1")
    ap.add_argument("--hold", nargs=2, metavar=("KIND", "IFACE"), help=argparse.SUPPRESS)
    ap.add_argument("--ab-hold", metavar="IFACE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hold:
        hold(*args.hold)
        return
    if args.ab_hold:
        ab_hold(args.ab_hold)
        return
    modes = list(MODES) if args.modes == "all" else args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad or "empty" not in modes:
        sys.exit(f"bench_forward: --modes: unknown {bad}, or no 'empty' (the baseline)")
    if os.geteuid() != 0:
        sys.exit("bench_forward: needs root (namespaces, XDP)")
    if args.rt:
        RT[:] = ["chrt", "-f", "1"]
    t0 = time.time()
    res: dict[tuple[str, str], list[dict[str, float]]] = {}
    agent_cands = agent_lost = 0
    with tempfile.TemporaryDirectory(prefix="iqn-fwd-") as td, Router(args.prefix) as rt:
        tmp = Path(td)
        exe = tmp / "blast"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "bench" / "blast.c")], check=True)
        rng = random.Random(args.seed)
        files = {k: write_frames(tmp / f"{k}.bin", mix_frames(rt, k, rng)) for k in ("bulk", "mix")}
        if args.ab:
            res = run_ab(rt, str(exe), files, tmp, args, rng)
        for rnd in range(0 if args.ab else args.rounds):
            order = modes[:]
            rng.shuffle(order)  # a fresh order each round: no mode always follows another
            for mode in order:
                held, agent = setup(rt, mode, tmp / f"{mode}{rnd}")
                try:
                    time.sleep(0.5)  # let the agent's start-up work settle
                    for kind, path in files.items():
                        before = agent.status() if agent else None
                        m = measure(rt, str(exe), path, args.secs, agent.proc.pid if agent else None)
                        if agent and before:
                            after = agent.status()
                            agent_cands += after["candidates"] - before["candidates"]
                            agent_lost += after["lost"] - before["lost"]
                        res.setdefault((kind, mode), []).append(m)
                        print(f"round {rnd} {mode:12} {kind:4}: offered {m['offered']:,.0f}/s "
                              f"delivered {m['delivered']:,.0f}/s per CPU-s {m['per_cpu_s']:,.0f} "
                              f"sender's CPU share {m['share']:.2f} cpu0 {m['cpu0']:.2f} "
                              f"agent {m['agent']:.3f} "
                              f"load {m['load']:.1f}", flush=True)
                finally:
                    for h in reversed(held):
                        h.stop()
    elapsed = time.time() - t0
    if args.ab:
        text = report(res, list(AB_STATES), args, elapsed, 0, 0, AB_SECTION, AB_WHAT)
    else:
        text = report(res, modes, args, elapsed, agent_cands, agent_lost)
    print(text)
    if not args.no_write:
        _results.write_section(AB_SECTION if args.ab else SECTION, text)


def ratios(res: dict[tuple[str, str], list[dict[str, float]]], kind: str, mode: str,
           base: str = "empty", key: str = "per_cpu_s") -> list[float]:
    """Per round: the mode's ``key`` over the baseline's in the same round."""
    return [m[key] / b[key] for m, b in zip(res[kind, mode], res[kind, base], strict=True)]


def _med(res: dict[tuple[str, str], list[dict[str, float]]], kind: str, mode: str, key: str) -> float:
    return statistics.median(m[key] for m in res[kind, mode])


def report(res: dict[tuple[str, str], list[dict[str, float]]], modes: list[str], args: argparse.Namespace,
           elapsed: float, agent_cands: int, agent_lost: int, section: str = SECTION,
           what: dict[str, str] = WHAT) -> str:
    loads = [m["load"] for v in res.values() for m in v]
    flags = "".join(f" --{k} {v:g}" for k, v in (("secs", args.secs), ("rounds", args.rounds))
                    if v != {"secs": 3.0, "rounds": 3}[k])
    if args.rt:
        flags += " --rt"
    if args.ab:
        flags += " --ab"
    elif modes != list(BASIC):
        flags += f" --modes {args.modes}"
    lines = [
        section,
        "",
        f"`{CMD}{flags}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, kernel "
        f"{platform.release()}, {os.cpu_count()} CPUs shared with other work (1-min load average "
        f"{min(loads):.1f}-{max(loads):.1f} during the run); sender ns -> router ns (ip_forward) -> "
        "sink ns over veth, bench/blast.c frame-file mode pinned to CPU 1 offering as fast as it can, "
        f"{args.secs:g} s per measurement, {args.rounds} rounds, the modes in a fresh random order each "
        f"round; {elapsed:.0f} s in all.",
        "",
        "*per CPU-s*: packets the sink received per CPU second of the sender plus CPU 1's ksoftirqd "
        "(on veth the router's receive, XDP, forwarding and the sink's receive all run in the sender's "
        "context): what one core forwards, whatever share of CPU 1 the box's other work left the "
        "sender. *delivered /s*: packets per wall-clock second, which is that times the share (shown). "
        "*ratio*: the median over rounds of the mode's per-CPU-s over the empty XDP program's in the "
        "same round, with the rounds' min-max.",
        "",
    ]
    names = {
        "bulk": "(a) bulk QUIC-like video from :443, 1,292-1,350 B",
        "mix": "(b) realistic mix (video + tails, web QUIC in band, TCP, DNS)",
    }
    if all(m in modes for m in BASIC):
        lines += [
            "| traffic | per CPU-s, no program | per CPU-s, empty program (XDP; TC rows: empty TC "
            "classifier) | per CPU-s, IQN | empty / none "
            "| IQN / empty (min-max) | target IQN >= 97 % of empty |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for kind in ("bulk", "mix"):
            r = ratios(res, kind, "iqn")
            n, e, i = (_med(res, kind, m, "per_cpu_s") for m in BASIC)
            lines.append(f"| {names[kind]} | {n:,.0f} | {e:,.0f} | {i:,.0f} | "
                         f"{statistics.median(ratios(res, kind, 'empty', 'none')):.3f} | "
                         f"{statistics.median(r):.3f} ({min(r):.2f}-{max(r):.2f}) | "
                         f"{'met' if statistics.median(r) >= TARGET else 'MISSED'} |")
        if "iqn-tc" in modes and "tc-empty" in modes:
            for kind in ("bulk", "mix"):
                r = ratios(res, kind, "iqn-tc", "tc-empty")
                lines.append(f"| TC hook, {names[kind][:3]}: IQN --hook tc / empty TC classifier | | "
                             f"{_med(res, kind, 'tc-empty', 'per_cpu_s'):,.0f} | "
                             f"{_med(res, kind, 'iqn-tc', 'per_cpu_s'):,.0f} | | "
                             f"{statistics.median(r):.3f} ({min(r):.2f}-{max(r):.2f}) | "
                             f"{'met' if statistics.median(r) >= TARGET else 'MISSED'} |")
        lines.append("")
    lines += [
        "| mode | what is on the router's ingress veth | (a) per CPU-s | (a) ratio (min-max) "
        "| (b) per CPU-s | (b) ratio (min-max) | delivered /s (a), (b) | sender's share of CPU 1 "
        "| delivered/s ratio (a), (b) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in modes:
        cells = []
        for kind in ("bulk", "mix"):
            r = ratios(res, kind, mode)
            cells.append(f"{_med(res, kind, mode, 'per_cpu_s'):,.0f} | {statistics.median(r):.3f} "
                         f"({min(r):.2f}-{max(r):.2f})")
        share = statistics.median(m["share"] for k in ("bulk", "mix") for m in res[k, mode])
        dl = ", ".join(f"{_med(res, k, mode, 'delivered'):,.0f}" for k in ("bulk", "mix"))
        dr = ", ".join(f"{statistics.median(ratios(res, k, mode, key='delivered')):.2f}"
                       for k in ("bulk", "mix"))
        lines.append(f"| {mode} | {what[mode]} | {' | '.join(cells)} | {dl} | {share:.2f} | {dr} |")
    lines += [
        "",
        "Per round (per CPU-s / delivered /s, in round order): "
        + "; ".join(f"{kind} {mode}: " + ", ".join(f"{m['per_cpu_s'] / 1e3:.0f}k/{m['delivered'] / 1e3:.0f}k"
                                                   for m in res[kind, mode])
                    for kind in ("bulk", "mix") for mode in modes)
        + ".",
    ]
    if not args.ab:  # the --ab agent's API is not asked while it may be stopped
        lines.append(f"Candidates the agent's program counted during its measurements: {agent_cands:,} "
                     f"(lost in the ring: {agent_lost:,}).")
    lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
