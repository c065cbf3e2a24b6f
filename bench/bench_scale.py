"""The whole agent at outage scale, live (issues 19 and 12): real XDP on a
veth pair, bench/blast.c's many-flow mode as the sender, ``iqn-ctl attach`` as
the agent. The agent is pinned to CPU 0 (taskset), the sender to CPU 1 (the
veth's receive path, XDP included, runs on the sender's CPU).

1. Steady (issue 19 "whole agent", issue 12 "the agent"): M flows, every one
   stalling for the whole run (a burst of n = 4 candidates, 2 ms apart, every
   p = 0.2 s, random phase), M = 1 (the single-flow baseline), 1,000, 10,000,
   50,000. Per row: bursts/s and candidates/s offered (blast's count),
   handled by the engine, shed by the agent, lost in the ring; flows stalling
   at once (most seen in ``status``); agent CPU (cores, µs per record);
   stall-visible latency = the agent's log line for the stall's start minus
   the send time of the n-th candidate of the flow's first burst (blast's
   log); start error = recorded start minus the first candidate's send time.
2. Outage (issue 19): 20,000 flows sending video (1,350-byte frames, 5/s
   each); at t = 10 s, 80 % of them stall within 2 s and recover 30 s later
   (``--short``: at 5 s, for 10 s). Every stall must be in the history,
   exactly once, with its start within 50 ms of the first candidate's send time
   (the single-flow case); ``status`` (lag, backlog, shed, lost, flows in
   stall) and the agent's RSS sampled every 0.5 s go to bench/outage-live.png.

Sender (``--sender``, default ``packet``): blast puts frames on the veth either
with AF_PACKET sendmmsg (``packet``, the old sender) or with the XDP
live-frames generator of bench/xdpgen.py (``xdp``: BPF_PROG_TEST_RUN redirecting
to the veth, no skbs on the sending side); the flows, stalls, phases, counts and
log are blast's in both. ``--only offer`` measures what each sender offers on the
bench veth (agent attached); ``--only senders`` adds the steady rows with
``--sender-baseline`` (before) and ``--sender``; both write "## Live senders".
With ``xdp`` every test run waits ~28 ms in the kernel (two XDP dispatcher
changes, each an RCU grace period: bench/blast.c) before its frames go out
and up to 16 runs are in flight, so frames arrive in clumps, up to hundreds of
ms after they fell due, and runs may overtake each other; blast's log takes the
generator's own send times, so latencies stay right, but at 10,000 flows the
agent's p99 was 3.7x the AF_PACKET one (RESULTS "Live senders"). Hence the
default stays ``packet``; ``xdp`` is for the rows ``packet`` cannot offer.

``--baseline CHECKOUT`` runs every row twice in the same run, once with the
agent of another checkout (its ``.venv/bin/iqn-ctl``: e.g. main's worktree)
and once with this one, and gives this one's ratios to it.

Since issue 19's batching the agent logs the first 32 stall starts of a poll
round one by one and the rest of that round in one summary line, so the
latency is measured on the starts that have their own line (the earliest
detected of each round; the summarised ones of a round are shown by the same
round, a few ms later at most) and the table says how many flows that is.

Run as root: ``sudo .venv/bin/python bench/bench_scale.py [--only steady|outage]
[--sizes 1,1000,10000,50000] [--secs 10] [--short] [--baseline /work/main] [--no-write]
[--agent-args "--backlog 262144"]`` (``--agent-args``: more ``attach`` options for every agent).
Time budget: about 3 minutes for the steady sweep, 1.5 for the outage (--short: 1),
twice that with --baseline. Writes the "## Live agent at scale" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

import _results  # noqa: E402  (bench/ is on sys.path when run as a script)

from iqn_ctl.engine.estimators import DEFAULT_ESTIMATOR  # noqa: E402
from iqn_ctl.engine.params import SignalParams  # noqa: E402
from iqn_ctl.engine.tracker import StallEnded, StallTracker  # noqa: E402
from iqn_ctl.live.api import ApiError, request, sock_path  # noqa: E402
from iqn_ctl.live.history import History  # noqa: E402
from iqn_lab.testbed import IQN_CTL  # noqa: E402
from iqn_lab.testbed import Testbed as Lab  # noqa: E402

SECTION = "## Live agent at scale"
CMD = "sudo .venv/bin/python bench/bench_scale.py"
PLOT = ROOT / "bench" / "outage-live.png"
OTHER_MAC = "02:00:00:00:00:99"  # the client's stack drops these after XDP has seen them
AGENT_CPU, SENDER_CPU = "0", "1"
#: ``nice -n N`` for the agent and the sender (--nice): on a shared box, the share
#: of its core the agent would have on a router of its own
NICE: list[str] = []
#: --ns-prefix: the labs' names start with this (a counter follows), else the testbed's own
NS_PREFIX: list[str] = []
DST, PORTS, SERVERS = "198.19.0.0", 50000, 64
N, P, GAP_US = 4, 0.2, 2000
LOG_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO \S+: stall (start|end) flow=(\S+) "
    r"client=\S+ start=(\S+)"
)


def new_lab() -> Lab:
    if not NS_PREFIX:
        return Lab()
    NS_PREFIX.append(NS_PREFIX[0])
    return Lab(prefix=f"{NS_PREFIX[0]}{len(NS_PREFIX) % 16:x}")


#: --sender: how blast puts frames on the veth (xdp: the live-frames generator of
#: bench/xdpgen.py; packet: AF_PACKET sendmmsg), and the loaded generator
SENDER = ["packet"]
_GEN: list[Any] = []


def generator() -> tuple[int, int]:
    """The XDP generator's (program fd, map fd), loaded once per run."""
    if not _GEN:
        import xdpgen

        _GEN.extend(xdpgen.load())
    return int(_GEN[1]), int(_GEN[2])


def build_blast(tmp: Path) -> str:
    exe = tmp / "blast"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "bench" / "blast.c")], check=True)
    return str(exe)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


#: extra ``iqn-ctl attach`` options for every agent (--agent-args)
AGENT_ARGS: list[str] = []


def load_avg() -> str:
    return " / ".join(Path("/proc/loadavg").read_text().split()[:3])


class Agent:
    """``iqn-ctl attach`` (the command ``exe``) on the client side, pinned to
    AGENT_CPU, logging to a file."""

    def __init__(self, lab: Lab, tmp: Path, name: str, *extra: str, exe: str = IQN_CTL) -> None:
        self.lab, self.state = lab, tmp / f"state-{name}"
        self.logpath = tmp / f"{name}.log"
        env = dict(os.environ, IQN_RUN_DIR=str(tmp / f"run-{name}"))
        self.sock = sock_path(tmp / f"run-{name}", lab.cli_if)
        self._log = self.logpath.open("w")
        self.proc = subprocess.Popen(
            [
                *NICE,
                "taskset",
                "-c",
                AGENT_CPU,
                # blast.c sends no client side: the forgery guard would keep every
                # candidate from user space, which is what this bench loads
                "ip", "netns", "exec", lab.cli_ns, exe,
                "attach", lab.cli_if, "--state-dir", str(self.state),
                "--pairing", "off", "--cap", "0", *AGENT_ARGS, *extra,
            ],
            env=env,
            stderr=self._log,
            stdout=subprocess.DEVNULL,
        )
        for _ in range(1200):
            try:
                self.pid = int(self.status()["pid"])
                return
            except ApiError:
                if self.proc.poll() is not None:
                    sys.exit(f"bench_scale: the agent did not start: {self.logpath.read_text()[-500:]}")
                time.sleep(0.1)
        sys.exit("bench_scale: the agent did not come up")

    def status(self) -> dict[str, Any]:
        return dict(request(self.sock, "status", timeout=60.0))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self._log.close()

    def log_lines(self) -> list[tuple[float, str, str, str]]:
        """(log time, start|end, flow label, start as logged) of every stall line."""
        out = []
        for line in self.logpath.read_text().splitlines():
            m = LOG_RE.match(line)
            if m:
                t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time
                out.append((t, m.group(2), m.group(3), m.group(4)))
        return out


def iso_epoch(iso: str) -> float:
    """Epoch seconds of a log line's ``start=`` (UTC, ``...Z``)."""
    return dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


def flow_index(label: str) -> int:
    """blast's flow number from a flow label ``server:443>client:port``."""
    client = label.rsplit(">", 1)[1]
    addr, port = client.rsplit(":", 1)
    return (int(ipaddress.IPv4Address(addr)) - int(ipaddress.IPv4Address(DST))) * PORTS + int(port) - 10000


def blast(lab: Lab, exe: str, secs: float, log: Path | None, sender: str = "", **kw: Any) -> dict[str, float]:
    sender = sender or SENDER[0]
    fds: tuple[int, ...] = generator() if sender == "xdp" else ()
    args = {
        "src_mac": lab.srv_mac,
        "dst_mac": OTHER_MAC,
        "src": lab.srv4,
        "servers": SERVERS,
        "dst": DST,
        "ports": PORTS,
        "n": N,
        "p": P,
        "gap_us": GAP_US,
        "size": 1250,
        **({"log": log} if log else {}),
        **({"xdp_prog": fds[0], "xdp_map": fds[1]} if fds else {}),
        **kw,
    }
    r = subprocess.run(
        [
            *NICE,
            "taskset",
            "-c",
            SENDER_CPU,
            "ip",
            "netns",
            "exec",
            lab.srv_ns,
            exe,
            "-m",
            lab.srv_if,
            str(secs),
            *(f"{k}={v}" for k, v in args.items()),
        ],
        capture_output=True,
        text=True,
        timeout=secs * 30 + 120,
        pass_fds=fds,
    )
    if r.returncode:
        sys.exit(f"bench_scale: blast failed: {r.stderr}")
    return {k: float(v) for k, v in (x.split("=") for x in r.stdout.split())}


def sent_log(path: Path) -> dict[int, tuple[float, float, float, int]]:
    out = {}
    for line in path.read_text().splitlines():
        i, first, nth, last, bursts = line.split()
        out[int(i)] = (float(first), float(nth), float(last), int(bursts))
    return out


class Sampler(threading.Thread):
    """``status`` and the agent's RSS/CPU every ``every`` s until stopped."""

    def __init__(self, agent: Agent, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.agent, self.every = agent, every
        self.rows: list[dict[str, float]] = []
        self.halt = threading.Event()
        self.t0 = time.time()

    def run(self) -> None:
        while not self.halt.is_set():
            t = time.time()
            try:
                st = self.agent.status()
            except ApiError:
                continue
            self.rows.append(
                {
                    "t": t - self.t0,
                    "answered": time.time() - self.t0,
                    "lag_ms": st["lag_ms"],
                    "backlog": st["backlog"],
                    "shed": st["shed"],
                    "lost": st["lost"],
                    "in_stall": st["flows_in_stall"],
                    "rss": rss_mb(self.agent.pid),
                    "cpu": cpu_seconds(self.agent.pid),
                    "load": st["load"] != "ok",
                }
            )
            self.halt.wait(max(0.0, self.every - (time.time() - t)))


def settle(agent: Agent, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until every stall has ended, every counted candidate is accounted for
    and the history holds every ended stall (while behind, the agent commits in
    batches: a stall can have ended and not be on disk yet)."""
    deadline = time.monotonic() + timeout
    while True:
        st = agent.status()
        done = (st["flows_in_stall"] == 0 and st["events"] + st["shed"] + st["lost"] >= st["candidates"]
                and not st.get("history_pending", 0))
        if done or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def reference(first: float, bursts: int) -> tuple[float, float]:
    """(start, duration) a lone StallTracker (the agent's default estimator) infers
    from a flow's schedule: ``bursts`` bursts of N, GAP_US apart, every P from
    ``first``: the single-flow case the recorded stalls are compared with."""
    times = first + P * np.arange(bursts)[:, None] + GAP_US / 1e6 * np.arange(N)[None, :]
    tr = StallTracker(SignalParams(P, N), DEFAULT_ESTIMATOR, 0)
    (end,) = [e for e in tr.feed(times.ravel()) + tr.close() if isinstance(e, StallEnded)]
    return end.start, end.duration


def same(kernel: int, fed: int) -> str:
    """The trust column: every candidate the kernel counted reached the engine (or
    how many did not, or how many more were fed than counted: a forged record)."""
    return "yes" if kernel == fed else f"**no**: {kernel:,} counted, {fed:,} fed"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def history_of(agent: Agent) -> list[Any]:
    with History(agent.state, create=False) as h:
        return h.query(agent.lab.cli_if)


# -- 1. steady ----------------------------------------------------------------------------------


def steady(exe: str, tmp: Path, flows: int, secs: float, agent_exe: str = IQN_CTL,
           tag: str = "", sender: str = "") -> dict[str, Any]:
    with new_lab() as lab:
        agent = Agent(lab, tmp, f"steady{flows}{tag}", exe=agent_exe)
        try:
            samp = Sampler(agent)
            c0, w0 = cpu_seconds(agent.pid), time.time()
            samp.start()
            log = tmp / f"steady{flows}{tag}.sent"
            said = blast(lab, exe, secs, log, sender, flows=flows, stall=flows)
            c1, w1 = cpu_seconds(agent.pid), time.time()
            st = settle(agent)
            c2 = cpu_seconds(agent.pid)
            samp.halt.set()
            samp.join()
            lines = agent.log_lines()
            rows = history_of(agent)
        finally:
            agent.stop()
    sent = sent_log(log)
    starts: dict[int, float] = {}
    for t, kind, label, logged in lines:
        i = flow_index(label)
        # the line of the flow's first stall only: when that start was summarised, a
        # later stall's own line (the flow's stall broke up) is not its latency
        if kind == "start" and i in sent and abs(iso_epoch(logged) - sent[i][0]) < 0.5:
            starts.setdefault(i, t)
    lat = [1000 * (starts[i] - sent[i][1]) for i in sent if i in starts]
    ended = [r for r in rows if r.state == "ended"]
    per: dict[int, int] = {}
    for r in ended:
        per[flow_index(r.flow)] = per.get(flow_index(r.flow), 0) + 1
    err = [
        1000 * abs(r.start - reference(sent[flow_index(r.flow)][0], sent[flow_index(r.flow)][3])[0])
        for r in ended
        if flow_index(r.flow) in sent
    ]
    in_stall = max((r["in_stall"] for r in samp.rows), default=0)
    return {
        "flows": flows,
        "secs": said["secs"],
        "bursts": said["bursts"],
        "cands": said["candidates"],
        "kernel": st["candidates"],
        "events": st["events"],
        "records": st.get("bursts", 0),
        "shed": st["shed"],
        "lost": st["lost"],
        "backlog_max": st.get("backlog_max", 0),
        "backlog_k": [round(r["backlog"] / 1000) for r in samp.rows],  # every 0.5 s, thousands
        "refused": st["refused_events"],
        "in_stall_max": in_stall,
        "stalled_flows": len(starts),
        "one_stall_each": sum(1 for i in sent if per.get(i) == 1),
        "stalls": len(ended),
        "cpu_run": (c1 - c0) / (w1 - w0),
        "us_per_rec": 1e6 * (c2 - c0) / max(st["events"], 1),
        "lat": lat,
        "err": err,
        "lag_max_ms": st["lag_max_ms"],
        "late_ms": said["late_max_ms"],
        "hist_dropped": st["history_dropped"],
        "rss_max": max((r["rss"] for r in samp.rows), default=float("nan")),
        "load": load_avg(),
        "sender": sender or SENDER[0],
    }


# -- 0. what a sender can offer -----------------------------------------------------------------


def rx_packets(lab: Lab) -> int:
    """Frames the client-side veth received (its XDP program saw them)."""
    out = subprocess.run(["ip", "-n", lab.cli_ns, "-s", "-j", "link", "show", "dev", lab.cli_if],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def offer(exe: str, tmp: Path, sender: str, kind: str, secs: float) -> dict[str, Any]:
    """The most a sender offers on the bench veth, with this agent attached (its
    XDP program on the receiving side, as in every row): ``kind`` candidates: 50,000
    flows stalling with a burst every 10 ms (20M candidates/s asked); video: 50,000
    flows at 400 frames/s each (20M/s asked). Offered = blast's count over its time;
    arrived = the client veth's received frames; kernel-counted = the XDP
    program's candidate count."""
    with new_lab() as lab:
        agent = Agent(lab, tmp, f"offer-{sender}-{kind}")
        try:
            st0 = agent.status()
            rx0 = rx_packets(lab)
            u0 = os.times()
            if kind == "candidates":
                said = blast(lab, exe, secs, None, sender, flows=50_000, stall=50_000, p=0.01, wall=1)
            else:
                said = blast(lab, exe, secs, None, sender, flows=50_000, stall=0, vpps=400, wall=1)
            u1 = os.times()
            time.sleep(0.5)
            rx1 = rx_packets(lab)
            st = agent.status()
        finally:
            agent.stop()
    return {
        "sender": sender,
        "kind": kind,
        "secs": said["secs"],
        "sent": said["sent"],
        "cands": said["candidates"],
        "arrived": rx1 - rx0,
        "kernel": st["candidates"] - st0["candidates"],
        "sender_cpu": (u1.children_user + u1.children_system - u0.children_user - u0.children_system)
        / said["secs"],
        "late_ms": said["late_max_ms"],
        "load": load_avg(),
    }


# -- 2. outage ----------------------------------------------------------------------------------


def outage(exe: str, tmp: Path, short: bool, agent_exe: str = IQN_CTL, tag: str = "") -> dict[str, Any]:
    flows, at, spread, dur = 20_000, (5.0 if short else 10.0), 2.0, (10.0 if short else 30.0)
    secs = at + spread + dur + (3.0 if short else 8.0)
    stalling = int(0.8 * flows)
    with new_lab() as lab:
        agent = Agent(lab, tmp, f"outage{tag}", exe=agent_exe)
        try:
            samp = Sampler(agent)
            samp.start()
            log = tmp / f"outage{tag}.sent"
            said = blast(
                lab,
                exe,
                secs,
                log,
                flows=flows,
                stall=stalling,
                stall_at=at,
                spread=spread,
                stall_for=dur,
                vpps=5,
                vsize=1350,
            )
            st = settle(agent)
            time.sleep(1.0)
            samp.halt.set()
            samp.join()
            rows = history_of(agent)
        finally:
            agent.stop()
    sent = sent_log(log)
    by: dict[int, list[Any]] = {}
    for r in rows:
        by.setdefault(flow_index(r.flow), []).append(r)
    once = [i for i in sent if len(by.get(i, [])) == 1 and by[i][0].state == "ended"]
    ref = {i: reference(sent[i][0], sent[i][3]) for i in once}
    err = [1000 * abs(by[i][0].start - ref[i][0]) for i in once]
    derr = [1000 * abs(by[i][0].duration - ref[i][1]) for i in once]
    s = samp.rows
    if not tag:
        plot(s, at)
    return {
        "flows": flows,
        "stalling": stalling,
        "at": at,
        "dur": dur,
        "secs": said["secs"],
        "sent_stalls": len(sent),
        "recorded": sum(len(v) for v in by.values()),
        "once": len(once),
        "missing": len(set(sent) - set(by)),
        "extra": sum(max(0, len(v) - 1) for v in by.values()) + sum(1 for i in by if i not in sent),
        "open": sum(1 for r in rows if r.state != "ended"),
        "err_p99": pct(err, 99),
        "err_max": max(err, default=float("nan")),
        "derr_p99": pct(derr, 99),
        "cands": said["candidates"],
        "video": said["video"],
        "kernel": st["candidates"],
        "events": st["events"],
        "shed": st["shed"],
        "lost": st["lost"],
        "lag_max_ms": st["lag_max_ms"],
        "lag_p99": pct([r["lag_ms"] for r in s], 99),
        "rss": (min(r["rss"] for r in s), max(r["rss"] for r in s)),
        "in_stall_max": max(r["in_stall"] for r in s),
        "cpu": (s[-1]["cpu"] - s[0]["cpu"]) / (s[-1]["t"] - s[0]["t"]),
        "late_ms": said["late_max_ms"],
        "hist_dropped": st["history_dropped"],
        "samples": [
            (round(r["t"], 1), round(r["lag_ms"], 1), int(r["in_stall"]), round(r["rss"])) for r in s
        ],
        "load": load_avg(),
    }


def plot(s: list[dict[str, float]], at: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in s]
    fig, ax = plt.subplots(4, 1, figsize=(8, 8), sharex=True)
    ax[0].plot(t, [r["in_stall"] for r in s])
    ax[0].set_ylabel("flows in stall")
    ax[1].plot(t, [r["lag_ms"] for r in s], label="lag (last poll)")
    ax[1].axhline(50, ls=":", c="k", label="budget 50 ms")
    ax[1].set_ylabel("ms")
    ax[1].legend(loc="upper right")
    ax[2].plot(t, [r["backlog"] for r in s], label="backlog")
    ax[2].plot(t, [r["shed"] for r in s], label="shed (total)")
    ax[2].plot(t, [r["lost"] for r in s], label="lost in ring (total)")
    ax[2].set_ylabel("records")
    ax[2].legend(loc="upper left")
    ax[3].plot(t, [r["rss"] for r in s])
    ax[3].set_ylabel("agent RSS (MiB)")
    ax[3].set_xlabel("s since the sender started")
    fig.suptitle(f"Live outage: 80 % of 20,000 flows stall within 2 s at t = {at:g} s (agent on one core)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=80)


# -- report -------------------------------------------------------------------------------------


def offer_table(offers: list[dict[str, Any]]) -> list[str]:
    return [
        "| sender | frames | s | frames/s offered | candidates/s offered | arrived / offered "
        "| kernel-counted candidates / offered | sender process CPU (cores) | late max ms | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *(
            f"| {o['sender']} | {o['kind']} | {o['secs']:.1f} | {o['sent'] / o['secs']:,.0f} | "
            f"{o['cands'] / o['secs']:,.0f} | {o['arrived'] / max(o['sent'], 1):.3f} | "
            + (f"{o['kernel'] / o['cands']:.3f}" if o["cands"] else "-")
            + f" | {o['sender_cpu']:.2f} | {o['late_ms']:,.0f} | {o['load']} |"
            for o in offers
        ),
    ]


SENDER_SECTION = "## Live senders: AF_PACKET vs XDP live frames"


def sender_report(offers: list[dict[str, Any]], st: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The senders' own section: what each offers, and (with --sender-baseline) the
    steady rows measured with both in the same run."""
    cmd = (CMD + (f" --only {args.only}" if args.only else "") + f" --sender {args.sender}"
           + (f" --sender-baseline {args.sender_baseline}" if args.sender_baseline else "")
           + (f" --sizes {args.sizes}" if st else "")
           + (f" --secs {args.secs:g}" if st and args.secs != 10 else "")
           + (f" --offer-secs {args.offer_secs:g}" if offers else ""))
    lines = [
        SENDER_SECTION,
        "",
        f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, kernel {platform.release()}, "
        f"{os.cpu_count()} CPUs shared with other work. bench/blast.c's many-flow mode on CPU {SENDER_CPU} "
        "with either sender: `packet` = AF_PACKET sendmmsg (PACKET_QDISC_BYPASS), `xdp` = "
        "BPF_PROG_TEST_RUN in live-frames mode redirecting to the veth (bench/xdpgen.py). On a veth "
        "the receive side (the agent's XDP program included) runs on the sender's CPU in both cases. "
        f"The agent (this checkout, {args.rev}) is attached on CPU {AGENT_CPU} in every row.",
        "",
    ]
    if offers:
        lines += [
            "### What each sender offers",
            "",
            "50,000 flows asked for 20M frames/s (candidates: every flow stalling, a burst of 4 every "
            "10 ms; video: 400 frames/s each, outside the candidate band). Offered = blast's count over "
            "its run time; arrived = the client veth's received frames; kernel-counted = the agent's "
            "XDP candidate count. Sender process CPU includes the softirq work (veth receive, XDP) "
            "run in its context.",
            "",
            *offer_table(offers),
            "",
        ]
    if st:
        lines += [
            "### Steady rows with both senders (baseline = the --sender-baseline sender)",
            "",
            "Columns as in \"Live agent at scale\" above; `agent` names the sender here.",
            "",
            *steady_table(st, args),
            "",
        ]
    return "\n".join(lines) + "\n"


def steady_table(st: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    base = next((r for r in st if r["flows"] == 1 and r["agent"] == "this"), None)
    b99 = pct(base["lat"], 99) if base else float("nan")
    other = {r["flows"]: r for r in st if r["agent"] == "baseline"}
    lines = [
        "| stalling flows | agent | sender | bursts/s offered | candidates/s offered | handled / offered "
        "| kernel-counted = handled | ring records per burst | shed "
        "| lost | flows in stall (most seen) | one stall per flow | agent cores | agent µs/record "
        "| µs/record x baseline | logged starts | latency p50 / p99 / max ms | p99 x single flow "
        "| p99 x baseline | start error p99 ms | sender late max ms | load avg |",
        "|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in st:
        lat = r["lat"]
        o = other.get(r["flows"]) if r["agent"] == "this" else None
        xrec = f"{r['us_per_rec'] / o['us_per_rec']:.2f}x" if o else "-"
        x99 = f"{pct(lat, 99) / pct(o['lat'], 99):.2f}x" if o else "-"
        lines.append(
            f"| {r['flows']:,} | {r['agent']} | {r['sender']} | {r['bursts'] / r['secs']:,.0f} | "
            f"{r['cands'] / r['secs']:,.0f} | "
            f"{r['events'] / max(r['cands'], 1):.3f} | {same(r['kernel'], r['events'])} | "
            f"{r['records'] / max(r['bursts'], 1):.2f} | "
            f"{r['shed']:,} | {r['lost']:,} | {r['in_stall_max']:,} | "
            f"{r['one_stall_each']:,}/{r['flows']:,} | {r['cpu_run']:.2f} | {r['us_per_rec']:.2f} | "
            f"{xrec} | "
            f"{r['stalled_flows']:,} | "
            f"{pct(lat, 50):.1f} / {pct(lat, 99):.1f} / {max(lat, default=float('nan')):.1f} | "
            f"{pct(lat, 99) / b99:.1f}x | {x99} | {pct(r['err'], 99):.2f} | {r['late_ms']:,.0f} | "
            f"{r['load']} |"
        )
    return lines


def report(
    st: list[dict[str, Any]], out: list[dict[str, Any]], args: argparse.Namespace, elapsed: float,
    offers: list[dict[str, Any]] | None = None,
) -> str:
    cmd = (
        CMD
        + (f" --sizes {args.sizes}" if args.sizes != DEFAULT_SIZES else "")
        + (f" --secs {args.secs:g}" if args.secs != 10 else "")
        + (f" --nice {args.nice}" if args.nice else "")
        + (" --short" if args.short else "")
        + (f" --baseline {args.baseline}" if args.baseline else "")
    )
    nice = f", nice {args.nice}" if args.nice else ""
    lines = [
        SECTION,
        "",
        f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, kernel {platform.release()}, "
        f"{os.cpu_count()} CPUs shared with other work, veth XDP (native), one agent pinned to CPU "
        f"{AGENT_CPU} (`taskset`{nice}), bench/blast.c's many-flow mode pinned to CPU {SENDER_CPU}{nice} "
        "(the veth "
        f"receive path and XDP run there too); agent flags: defaults; flows from {SERVERS} server "
        f"addresses (the default --source-rate admits 1,000 new flows/s per server address); "
        f"{elapsed:.0f} s in all. Budget: 3 min steady, 1.5 min outage"
        + (f", twice with --baseline (agent `baseline`: {args.baseline}'s checkout at "
           f"{args.baseline_rev}, run just before this one for each row; `this`: this checkout at "
           f"{args.rev})" if args.baseline else "") + ".",
        "",
    ]
    if st:
        lines += [
            "### Steady: every flow stalling at once (issue 19 whole agent; issue 12 agent)",
            "",
            f"Each row {args.secs:g} s of traffic; a burst of {N} candidates ({GAP_US / 1000:g} ms apart) "
            f"every {P:g} s per flow. Offered = blast's count (the baseline of the ratios); handled = fed "
            "to the engine; kernel-counted = handled: the XDP program's candidate count equals what "
            "the engine was fed; shed = dropped oldest-first by the agent; lost = no room in the ring. "
            "Latency = stall-start log line minus the send time of the flow's n-th candidate, over the "
            "flows whose start has its own line (`logged`; the rest of a round's starts share one "
            "summary line, written in the same round); p99 x single flow: against this agent's "
            "single-flow row (whose µs/record is the idle loop's cost over 80 records); x baseline: "
            "this agent's µs/record and p99 latency over the baseline agent's in the row above. "
            "Ring records per burst: the burst records the kernel wrote over the bursts sent (a burst "
            "whose table slot another flow's candidate takes is written out early, in parts; the "
            "table's short bursts the agent takes are not counted). "
            "Start error: as in the outage below.",
            "",
            *steady_table(st, args),
        ]
        st = [r for r in st if r["agent"] == "this"]
        ok = [r for r in st if r["lost"] == 0 and r["shed"] == 0 and r["events"] == r["cands"]]
        okl = [r for r in ok if pct(r["lat"], 99) <= 50]
        best = max(ok, key=lambda r: r["flows"], default=None)
        bestl = max(okl, key=lambda r: r["flows"], default=None)
        lines += [
            "",
            "Most concurrently stalling flows with 0 lost and 0 shed: "
            + (
                f"**{best['flows']:,}** ({best['cands'] / best['secs']:,.0f} candidates/s, "
                f"{best['us_per_rec']:.2f} µs of agent CPU per record)"
                if best
                else "none"
            )
            + "; of those with stall-visible latency p99 <= 50 ms: "
            + (f"**{bestl['flows']:,}**." if bestl else "none.")
            + " Target: 50,000 (issue 19); 1,000,000 candidate packets/s = 250,000 bursts/s (issue 12).",
            "",
        ]
    if out:
        o = out[-1]
        lines += [
            "### Outage, live (issue 19)",
            "",
            f"{o['flows']:,} flows sending video (1,350-byte frames, 5/s each, outside the candidate band); "
            f"at t = {o['at']:g} s {o['stalling']:,} of them (80 %) stall within 2 s and recover "
            f"{o['dur']:g} s later"
            + (" (shortened with --short from 30 s)" if args.short else "")
            + f"; {o['secs']:.0f} s of traffic, {o['cands']:,.0f} candidates and {o['video']:,.0f} "
            "video frames. "
            "Start (duration) error = recorded start (duration) minus what a lone StallTracker with the "
            "agent's estimator infers from the flow's send schedule (the single-flow case). Load average "
            "at the end: " + " and ".join(f"{x['load']} ({x['agent']})" for x in out) + ".",
            "",
            "| agent | stalls sent | recorded | exactly once | missing | extra | left open "
            "| start error p99 / max ms | duration error p99 ms | handled / offered candidates | shed "
            "| lost | lag max / p99 "
            "of samples ms | flows in stall (most seen) | agent CPU (cores) | agent RSS min-max MiB "
            "| history writes dropped | sender late max ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {x['agent']} | {x['sent_stalls']:,} | {x['recorded']:,} | {x['once']:,} | "
                f"{x['missing']} | {x['extra']} | {x['open']} | {x['err_p99']:.2f} / {x['err_max']:.2f} | "
                f"{x['derr_p99']:.1f} | "
                f"{x['events'] / x['cands']:.3f} | {x['shed']:,} | {x['lost']:,} | "
                f"{x['lag_max_ms']:.1f} / {x['lag_p99']:.1f} | {x['in_stall_max']:,} | {x['cpu']:.2f} | "
                f"{x['rss'][0]:.0f}-{x['rss'][1]:.0f} | {x['hist_dropped']} | {x['late_ms']:,.0f} |"
                for x in out
            ),
            "",
            f"Every stall recorded exactly once with its start within 50 ms (this agent): "
            f"**{'yes' if o['once'] == o['sent_stalls'] and o['err_max'] <= 50 else 'NO'}**.",
            "",
            "![live outage: flows in stall, lag, backlog/shed/lost, RSS](outage-live.png)",
            "",
        ]
    return "\n".join(lines) + "\n"


DEFAULT_SIZES = "1,1000,10000,50000"


def _rev(checkout: Path) -> str:
    r = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES)
    ap.add_argument("--secs", type=float, default=10.0)
    ap.add_argument("--short", action="store_true", help="outage: stall at 5 s for 10 s (not 10 s for 30 s)")
    ap.add_argument("--only", choices=("steady", "outage", "offer", "senders"),
                    help="offer: only the table of what each sender can offer; senders: that table "
                         "and the steady rows with --sender-baseline and --sender")
    ap.add_argument("--sender", choices=("xdp", "packet"), default="packet",
                    help="blast's sender: packet (AF_PACKET) or xdp (live frames, bench/xdpgen.py: "
                         "about 1.7-2x the frames/s, but clumped and late at moderate rates)")
    ap.add_argument("--sender-baseline", choices=("xdp", "packet"),
                    help="also run every steady row with this sender, before the --sender one "
                         "(the rows are then 'baseline' and 'this'; not with --baseline)")
    ap.add_argument("--offer-secs", type=float, default=5.0)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--agent-args", default="", metavar="OPTIONS",
                    help="more `iqn-ctl attach` options for every agent, one string "
                         "(e.g. \"--backlog 4194304\")")
    ap.add_argument("--nice", type=int, default=0, help="run the agent and the sender at this nice value")
    ap.add_argument("--baseline", metavar="CHECKOUT",
                    help="also run the agent of this checkout (its .venv/bin/iqn-ctl) before each row")
    ap.add_argument("--ns-prefix", help="name the labs' namespaces and interfaces with this (<= 9 chars)")
    args = ap.parse_args()
    if args.ns_prefix:
        NS_PREFIX[:] = [args.ns_prefix[:9]]
    args.rev = _rev(ROOT)
    SENDER[0] = args.sender
    AGENT_ARGS[:] = shlex.split(args.agent_args)
    runs = [("this", IQN_CTL, args.sender)]
    if args.baseline and args.sender_baseline:
        sys.exit("bench_scale: --baseline or --sender-baseline, not both")
    if args.baseline:
        base_exe = str(Path(args.baseline).resolve() / ".venv" / "bin" / "iqn-ctl")
        if not os.access(base_exe, os.X_OK):
            sys.exit(f"bench_scale: no agent at {base_exe}")
        args.baseline_rev = _rev(Path(args.baseline))
        runs.insert(0, ("baseline", base_exe, args.sender))
    if args.sender_baseline:
        runs.insert(0, ("baseline", IQN_CTL, args.sender_baseline))
    if args.nice:
        NICE[:] = ["nice", "-n", str(args.nice)]
    if os.geteuid() != 0:
        sys.exit("bench_scale: needs root (XDP, namespaces)")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="iqn-scale-") as td:
        tmp = Path(td)
        exe = build_blast(tmp)
        st: list[dict[str, Any]] = []
        offers: list[dict[str, Any]] = []
        if args.only in (None, "offer", "senders"):
            for kind in ("candidates", "video"):
                for sender in ("packet", "xdp"):
                    o = offer(exe, tmp, sender, kind, args.offer_secs)
                    print("offer", o, flush=True)
                    offers.append(o)
        if args.only in (None, "steady", "senders"):
            for f in [int(x) for x in args.sizes.split(",")]:
                for name, agent_exe, sender in runs:
                    r = steady(exe, tmp, f, args.secs, agent_exe, "" if name == "this" else "-" + name,
                               sender)
                    r["agent"] = name
                    print(
                        name,
                        {k: v for k, v in r.items() if k not in ("lat", "err")},
                        "lat p50/p99",
                        pct(r["lat"], 50),
                        pct(r["lat"], 99),
                        flush=True,
                    )
                    st.append(r)
        out = []
        if args.only in (None, "outage"):
            for name, agent_exe, _sender in runs:
                o = outage(exe, tmp, args.short, agent_exe, "" if name == "this" else "-" + name)
                o["agent"] = name
                print(name, {k: v for k, v in o.items() if k != "samples"}, flush=True)
                out.append(o)
    if args.only in ("offer", "steady", "senders") and (offers or args.sender_baseline):
        text = sender_report(offers, st, args)
        print(text)
        if not args.no_write:
            _results.write_section(SENDER_SECTION, text)
        return
    text = report(st, out, args, time.time() - t0, offers)
    print(text)
    if not args.no_write and not args.only:
        _results.write_section(SECTION, text)
        if offers:
            _results.write_section(SENDER_SECTION, sender_report(offers, [], args))


if __name__ == "__main__":
    main()
