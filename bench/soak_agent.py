"""Soak: the live agent under mixed hostile traffic while one real signal runs.

A veth testbed (iqn_lab.testbed), the real agent (``iqn-ctl attach`` as a
foreground subprocess, default flags) on the client side, and for
``--duration`` seconds, all at once, from the server namespace:

(a) one real signalling flow (``srv:443 > cli:40443``): a stall of 1-4 s about
    every 10 s, bursts of n candidates every p inside it (the paper's signal,
    engine.synth's model with no missed screenshot), plus a 120-byte packet
    every 0.5 s so the connection is never silent; the actual send times are
    the ground truth;
(b) a flow flood: ``--flood-rate`` one-packet flows per second, each a fresh
    5-tuple (random spoofed source address and port, IPv4 and IPv6, at the
    real client and at other addresses), most from port 443 and candidate-sized,
    the rest outside the size band or from other ports;
(c) forged candidates: about one forged "stall" per ``--forged-every`` s, 1-6
    bursts of n in-band packets from a spoofed server at the real client (other
    ports) or at other clients, plus sub-threshold bursts (n-1 packets);
(d) malformed frames on a raw AF_PACKET socket: runts, truncated IPv4/IPv6/UDP
    headers, bad IHL/version/lengths, IPv4 fragments (first and later),
    IPv6 extension-header chains, VLAN stacks up to 6 deep, truncated tags;
(e) clock steps, only if the agent has an injectable wall clock (the real
    system clock is never stepped: other processes share this machine).

Sampled every ``--sample`` s: the agent's RSS (psutil) and ``iqn-ctl status``.
Event-loop lag: the agent's own metric if its status has one; else the time
from the n-th packet of each real stall's first burst to the agent's log line
"stall start flow=<real flow>" (stamped by the event loop, 1 ms resolution),
and to the stall showing in the flows API, polled.

At the end the stall history is scored against the real schedule with the
project's scoring (iqn_ctl.evaluate.scoring): every real stall recorded exactly
once, no false stall on the real flow; forged stalls recorded per client kind.

Run as root: ``sudo .venv/bin/python bench/soak_agent.py`` (``--duration 60``
for a short run). Writes the "## Soak" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import inspect
import ipaddress
import json
import os
import platform
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

import _results  # noqa: E402  (bench/ is on sys.path when run as a script)

from iqn_ctl.capture.frames import udp_frame  # noqa: E402
from iqn_ctl.engine.flowkey import flow_label  # noqa: E402
from iqn_ctl.engine.params import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, SignalParams  # noqa: E402
from iqn_ctl.evaluate.scoring import score  # noqa: E402
from iqn_ctl.evaluate.traces import Stall  # noqa: E402

SECTION = "## Soak: live agent under hostile traffic"
CMD = "sudo .venv/bin/python bench/soak_agent.py"
REAL_DPORT = 40443
#: frames nobody's stack wants (the flood): dropped on arrival, after XDP saw them
OTHER_MAC = "02:00:00:00:00:99"
BAND = (DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


# -- hostile senders (run inside the server namespace: --worker KIND CONFIG) ---------------


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _rand4(rng: random.Random, avoid: str) -> str:
    """A spoofed address in 198.18.0.0/15 outside the lab's own /24s."""
    net = avoid.rsplit(".", 2)[1]
    while True:
        a = ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.0")) + rng.randrange(1 << 17))
        if str(a).split(".")[2] != net:
            return str(a)


def _rand6(rng: random.Random) -> str:
    base = int(ipaddress.IPv6Address("fd00:198:18:ffff::"))
    return str(ipaddress.IPv6Address(base + rng.randrange(1, 1 << 48)))


def _eth(dst: bytes, src: bytes, ethertype: int, tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    vlan = b"".join(struct.pack("!HH", tp, vid) for tp, vid in tags)
    return dst + src + vlan + struct.pack("!H", ethertype)


def _ip4(src: str, dst: str, payload: bytes, *, proto: int = 17, ihl: int = 5, total: int | None = None,
         frag: int = 0, version: int = 4) -> bytes:
    opts = bytes(max(0, ihl - 5) * 4)
    tot = total if total is not None else ihl * 4 + len(payload)
    h = struct.pack("!BBHHHBBH4s4s", (version << 4) | (ihl & 15), 0, tot & 0xFFFF, 0, frag, 64, proto, 0,
                    ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return h + opts + payload


def _ip6(src: str, dst: str, nexthdr: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nexthdr, 64, ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


def _udp(sport: int, dport: int, body: bytes, length: int | None = None) -> bytes:
    ln = length if length is not None else 8 + len(body)
    return struct.pack("!HHHH", sport, dport, ln & 0xFFFF, 0) + body


def _fill(head: bytes, frame_len: int) -> bytes:
    return head + bytes(max(0, frame_len - len(head)))


def malformed_frame(kind: str, rng: random.Random, c: dict[str, Any]) -> bytes:
    """One broken (or oddly built) frame of ``kind``; where a lax parser could
    take it for a candidate it is candidate-sized and from port 443."""
    dm, sm = _mac(c["dst_mac"]), _mac(c["src_mac"])
    src, dst = _rand4(rng, c["cli4"]), rng.choice([c["cli4"], _rand4(rng, c["cli4"])])
    size = rng.randint(*BAND)
    port = rng.randrange(1024, 65536)
    good_udp = _udp(443, port, b"")
    if kind == "eth_only":
        return _eth(dm, sm, 0x0800)
    if kind == "ip4_truncated":
        return _eth(dm, sm, 0x0800) + _ip4(src, dst, good_udp)[: rng.randint(1, 19)]
    if kind == "ip4_bad_ihl":
        return _fill(_eth(dm, sm, 0x0800) + _ip4(src, dst, good_udp, ihl=rng.randint(0, 4)), size)
    if kind == "ip4_ihl_past_end":
        return _eth(dm, sm, 0x0800) + _ip4(src, dst, b"", ihl=15)[:20] + good_udp[:4]
    if kind == "ip4_bad_version":
        return _fill(_eth(dm, sm, 0x0800) + _ip4(src, dst, good_udp, version=rng.choice([0, 5, 6, 15])), size)
    if kind == "ip4_bad_total_len":
        head = _eth(dm, sm, 0x0800) + _ip4(src, dst, _udp(443, port, bytes(size - 42)),
                                           total=rng.choice([0, 10, 65535]))
        return _fill(head, size)
    if kind == "udp_truncated":
        return _eth(dm, sm, 0x0800) + _ip4(src, dst, good_udp[: rng.randint(0, 7)])
    if kind == "udp_bad_len":
        body = bytes(size - 42)
        return _eth(dm, sm, 0x0800) + _ip4(src, dst, _udp(443, port, body, length=rng.choice([0, 7, 65535])))
    if kind == "frag_first":
        udp = _udp(443, port, bytes(size - 42), length=3000)
        return _eth(dm, sm, 0x0800) + _ip4(src, dst, udp, frag=0x2000)  # MF set, offset 0
    if kind == "frag_later":  # its payload starts like a UDP header from 443
        return _eth(dm, sm, 0x0800) + _ip4(src, dst, _udp(443, port, bytes(size - 42)), frag=185)
    if kind == "ip6_ext_chain":
        s6, d6 = _rand6(rng), rng.choice([c["cli6"], _rand6(rng)])
        chain = rng.sample([0, 43, 60, 44], rng.randint(1, 4))
        payload = b""
        hdrs = []
        for i, h in enumerate(chain):
            nxt = chain[i + 1] if i + 1 < len(chain) else 17
            hdrs.append(struct.pack("!BBHI", nxt, 0, 0, 0) if h != 44 else struct.pack("!BBHI", nxt, 0, 1, 7))
        payload = b"".join(hdrs)
        body = bytes(max(0, size - 14 - 40 - len(payload) - 8))
        return _eth(dm, sm, 0x86DD) + _ip6(s6, d6, chain[0], payload + _udp(443, port, body))
    if kind == "ip6_truncated":
        return _eth(dm, sm, 0x86DD) + _ip6(_rand6(rng), c["cli6"], 17, good_udp)[: rng.randint(1, 39)]
    if kind == "vlan_stack":
        depth = rng.randint(1, 6)
        tags = tuple((rng.choice([0x8100, 0x88A8]), rng.randrange(4096)) for _ in range(depth))
        head = _eth(dm, sm, 0x0800, tags)
        return head + _ip4(src, dst, _udp(443, port, bytes(max(0, size - len(head) - 28))))
    if kind == "vlan_truncated":
        tags = tuple((0x8100, rng.randrange(4096)) for _ in range(rng.randint(0, 2)))
        return (_eth(dm, sm, 0x8100, tags) + b"\x00\x2a")[: 14 + 4 * len(tags) + rng.randint(0, 3)]
    if kind == "odd_ethertype":
        return _fill(_eth(dm, sm, rng.choice([0x0806, 0x88CC, 0x8847, 0xFFFF, 0x0000])), size)
    raise ValueError(kind)


#: (frames under 14 bytes are not here: AF_PACKET refuses to send them on a veth)
MALFORMED = ("eth_only", "ip4_truncated", "ip4_bad_ihl", "ip4_ihl_past_end", "ip4_bad_version",
             "ip4_bad_total_len", "udp_truncated", "udp_bad_len", "frag_first", "frag_later", "ip6_ext_chain",
             "ip6_truncated", "vlan_stack", "vlan_truncated", "odd_ethertype")


def _raw(dev: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((dev, 0))
    return s


def _pace(start: float, i: int, rate: float) -> None:
    d = start + i / rate - time.time()
    if d > 0.002:
        time.sleep(d)


def worker_flood(c: dict[str, Any]) -> dict[str, Any]:
    """One fresh 5-tuple per packet at ``rate`` per second."""
    rng, s = random.Random(c["seed"]), _raw(c["dev"])
    dm, sm = _mac(OTHER_MAC), _mac(c["src_mac"])
    start, end, rate = c["start"], c["end"], c["rate"]
    kinds = ("flows", "from_443_in_band", "from_443_other_size", "other_port", "ipv6", "refused")
    n = dict.fromkeys(kinds, 0)
    i = 0
    while True:
        _pace(start, i, rate)
        if time.time() >= end:
            break
        i += 1
        v6 = rng.random() < 0.2
        src = _rand6(rng) if v6 else _rand4(rng, c["cli4"])
        dst = (c["cli6"] if v6 else c["cli4"]) if rng.random() < 0.5 else (_rand6(rng) if v6 else
                                                                          _rand4(rng, c["cli4"]))
        from443 = rng.random() < 0.85
        in_band = rng.random() < 0.8
        size = rng.randint(*BAND) if in_band else rng.choice([rng.randint(70, BAND[0] - 1),
                                                              rng.randint(BAND[1] + 1, 1514)])
        sport = 443 if from443 else rng.choice([80, 444, 4433, rng.randrange(1024, 65536)])
        try:
            s.send(udp_frame(src, dst, sport, rng.randrange(1024, 65536), size, src_mac=sm, dst_mac=dm))
        except OSError:
            n["refused"] += 1
            continue
        n["flows"] += 1
        n["ipv6"] += v6
        key = "other_port" if not from443 else ("from_443_in_band" if in_band else "from_443_other_size")
        n[key] += 1
    return n


def worker_forged(c: dict[str, Any]) -> dict[str, Any]:
    """Forged signals: n in-band packets within a burst, 1-6 bursts p apart,
    from spoofed servers; a third at the real client, the rest at others."""
    rng, s = random.Random(c["seed"]), _raw(c["dev"])
    dm, sm = _mac(c["dst_mac"]), _mac(c["src_mac"])
    p, n, every = c["p"], c["n"], c["every"]
    plan: list[tuple[float, int, bytes]] = []
    groups: list[dict[str, Any]] = []
    t = c["start"] + rng.uniform(0, every)
    while t < c["end"] - 3:
        v6 = rng.random() < 0.2
        same = rng.random() < 1 / 3
        cli = (c["cli6"] if v6 else c["cli4"]) if same else (_rand6(rng) if v6 else _rand4(rng, c["cli4"]))
        srv = _rand6(rng) if v6 else rng.choice([_rand4(rng, c["cli4"]), c["srv4"]])
        dport = rng.randrange(1024, 65536)
        if dport == c["real_dport"]:
            dport += 1
        # a lone burst of n-1 packets must never start a stall (two such bursts p apart
        # do hold n candidates within w_start, so a sub-threshold signal is one burst)
        sub = rng.random() < 0.2
        bursts = 1 if sub else rng.randint(1, 6)
        g = len(groups)
        groups.append({"flow": flow_label(srv, 443, cli, dport), "client": cli, "same_client": same,
                       "sub": sub, "bursts": bursts, "sent": []})
        for b in range(bursts):
            for k in range(n - 1 if sub else n):
                plan.append((t + b * p + k * 0.002, g,
                             udp_frame(srv, cli, 443, dport, rng.randint(*BAND), src_mac=sm, dst_mac=dm)))
        t += every * rng.uniform(0.5, 1.5)
    plan.sort(key=lambda x: x[0])
    for when, g, frame in plan:
        d = when - time.time()
        if d > 0:
            time.sleep(d)
        s.send(frame)
        groups[g]["sent"].append(time.time())
    return {"groups": groups}


def worker_malformed(c: dict[str, Any]) -> dict[str, Any]:
    rng, s = random.Random(c["seed"]), _raw(c["dev"])
    sent = dict.fromkeys(MALFORMED, 0)
    refused = dict.fromkeys(MALFORMED, 0)
    start, end, rate = c["start"], c["end"], c["rate"]
    i = 0
    while True:
        _pace(start, i, rate)
        if time.time() >= end:
            break
        kind = MALFORMED[i % len(MALFORMED)]
        i += 1
        try:
            s.send(malformed_frame(kind, rng, c))
            sent[kind] += 1
        except OSError:
            refused[kind] += 1
    return {"sent": sent, "refused": refused}


WORKERS = {"flood": worker_flood, "forged": worker_forged, "malformed": worker_malformed}


def worker_main(kind: str, conf: str) -> None:
    c = json.loads(conf)
    print("ready", flush=True)
    d = c["start"] - time.time()
    if d > 0:
        time.sleep(d)
    print(json.dumps(WORKERS[kind](c)), flush=True)


# -- the real signal -------------------------------------------------------------------------


@dataclass
class RealStall:
    start: float  # planned epoch
    end: float
    bursts: list[float]  # planned epoch of each burst's first packet


def real_schedule(t0: float, duration: float, rng: random.Random, p: float) -> list[RealStall]:
    """A stall of 1-4 s starting about every 10 s (6-8 s of playback between);
    a burst every p while it lasts, starting at a random phase (synth's model)."""
    out: list[RealStall] = []
    t = 5.0
    while True:
        d = rng.uniform(1.0, 4.0)
        if t + d + 3.0 > duration:
            return out
        phase = rng.uniform(0.0, p)
        k = 0
        bursts = []
        while t + phase + k * p < t + d:
            bursts.append(t0 + t + phase + k * p)
            k += 1
        out.append(RealStall(t0 + t, t0 + t + d, bursts))
        t += d + rng.uniform(6.0, 8.0)


# -- the agent, watched ----------------------------------------------------------------------

LOG_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (.*)$")
START_RE = re.compile(r"stall start flow=(\S+)")
END_RE = re.compile(r"stall end flow=(\S+) client=\S+ start=(\S+)")


def iso(t: float) -> str:
    """An epoch as the agent's log lines print it."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class AgentLog:
    """The agent's stderr, read as it comes: stall starts with the event loop's
    own timestamp, warnings and errors."""

    starts: list[tuple[float, float, str]] = field(default_factory=list)  # (logged, read, flow)
    #: (flow, start as printed) -> when the event loop logged the stall's end
    ends: dict[tuple[str, str], float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    lines: int = 0

    def follow(self, stream: Any) -> None:
        for line in stream:
            got = time.time()
            self.lines += 1
            m = LOG_RE.match(line.rstrip("\n"))
            if not m:
                self.warnings.append(line.rstrip("\n"))
                continue
            stamp, level, msg = m.groups()
            if level in ("WARNING", "ERROR", "CRITICAL"):
                self.warnings.append(line.rstrip("\n"))
            # asctime is the real clock (logging's own), local time truncated to the ms:
            # take the middle of that ms
            s, e = START_RE.search(msg), END_RE.search(msg)
            if s or e:
                t = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() + 0.0005
                if s:
                    self.starts.append((t, got, s.group(1)))
                elif e:
                    self.ends[(e.group(1), e.group(2))] = t


def lag_key(st: dict[str, Any]) -> str | None:
    """The agent's own event-loop lag figure in its status, if it has one."""
    for k in st:
        if "lag" in k.lower():
            return k
    return None


class Sampler(threading.Thread):
    def __init__(self, sock: Path, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.sock, self.every = sock, every
        self.rows: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.errors = 0
        self.last_error = ""

    def sample(self) -> dict[str, Any]:
        from iqn_ctl.live.api import ApiError, request

        row: dict[str, Any] = {"t": time.time(), "rss": self.proc.memory_info().rss,
                               "cpu": sum(self.proc.cpu_times()[:2])}
        for _ in range(5):  # an error answer is counted, then asked again
            try:
                t = time.time()
                st = dict(request(self.sock, "status", timeout=10.0))
                row["status_rtt"] = time.time() - t
                row["status"] = st
                break
            except ApiError as e:
                self.errors += 1
                self.last_error = str(e)
        return row

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.rows.append(self.sample())


class FlowsPoller(threading.Thread):
    """For each real stall: poll the flows API (no kernel counters, as fast
    polling tools do) from just before its n-th packet until the real flow
    shows ``state: stall``; notes when the answer arrived."""

    def __init__(self, sock: Path, label: str, due: list[float], skip_before: float = 0.0,
                 give_up: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.sock, self.label, self.due, self.give_up = sock, label, due, give_up
        self.skip_before = skip_before
        self.seen: dict[int, float] = {}
        self.rtts: list[float] = []
        self.sizes: list[int] = []
        self.errors = 0

    def run(self) -> None:
        from iqn_ctl.live.api import ApiError, request

        for i, t in enumerate(self.due):
            if t < self.skip_before:
                continue
            d = t - 0.05 - time.time()
            if d > 0:
                time.sleep(d)
            while time.time() < t + self.give_up:
                t0 = time.time()
                try:
                    rows = request(self.sock, "flows", kernel=False, timeout=10.0)
                except ApiError:
                    self.errors += 1
                    continue
                now = time.time()
                self.rtts.append(now - t0)
                self.sizes.append(len(rows))
                if any(r["flow"] == self.label and r["state"] == "stall" for r in rows):
                    self.seen[i] = now
                    break
                time.sleep(0.005)


def clock_injection() -> bool:
    """Whether the agent takes an injected wall clock (``serve(..., wall=)``).
    The real system clock is never stepped: this machine is shared."""
    from iqn_ctl.live.agent import serve

    return "wall" in inspect.signature(serve).parameters


#: the injected clock's offset from the real one after each step, in turn: an hour
#: ahead, back, a day behind, half a second off that, back, a quarter second ahead,
#: 30 s behind, back
OFFSETS = (3600.0, 0.0, -86400.0, -86399.5, 0.0, 0.25, -30.0, 0.0)


def clock_steps(real: list[RealStall], t0: float, duration: float, every: float) -> list[tuple[float, float]]:
    """(real time, offset from then on): a step about every ``every`` s, every
    other one in the middle of a real stall (the inference must not notice)."""
    steps: list[tuple[float, float]] = []
    t, k = t0 + every / 2, 0
    while t < t0 + duration - 5.0:
        when = t
        if k % 2 == 0:
            st = next((x for x in real if x.start > t), None)
            if st is None:
                break
            when = (st.start + st.end) / 2
        steps.append((when, OFFSETS[k % len(OFFSETS)]))
        k += 1
        t = when + every
    return steps


def offset_at(steps: list[tuple[float, float]], t: float) -> float:
    i = bisect.bisect_right([w for w, _ in steps], t)
    return steps[i - 1][1] if i else 0.0


def agent_main(conf: str) -> None:
    """The agent as ``iqn-ctl attach IFACE`` runs it (serve() with the CLI's
    defaults and log format), except for its wall clock: real time plus the
    offset of the step schedule in the file ``steps`` once that file exists."""
    import logging

    from iqn_ctl.live.agent import AgentConfig, serve

    c = json.loads(conf)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    path = Path(c["steps"])
    steps: list[tuple[float, float]] | None = None

    def wall() -> float:
        nonlocal steps
        now = time.time()
        if steps is None:
            if not path.exists():
                return now
            steps = [(float(a), float(b)) for a, b in json.loads(path.read_text())]
        return now + offset_at(steps, now)

    cfg = AgentConfig(iface=c["iface"], xdp_mode=c["xdp_mode"], state_dir=Path(c["state_dir"]),
                      run_dir=Path(c["run_dir"]))
    serve(cfg, wall=wall)


# -- the run -----------------------------------------------------------------------------------


def spawn_worker(lab: Any, kind: str, conf: dict[str, Any]) -> subprocess.Popen[str]:
    from iqn_lab.testbed import PY

    p = subprocess.Popen(["ip", "netns", "exec", lab.srv_ns, PY, str(Path(__file__).resolve()), "--worker",
                          kind, json.dumps(conf)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{kind} worker did not start: {p.stderr.read() if p.stderr else ''}")
    return p


def collect(p: subprocess.Popen[str], kind: str, timeout: float) -> dict[str, Any]:
    out, err = p.communicate(timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{kind} worker failed ({p.returncode}): {err[-2000:]}")
    return dict(json.loads(out.strip().splitlines()[-1]))


def code_fingerprint() -> str:
    """A digest of the agent's code as this run found it (the tree may be a work in progress)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((ROOT / "iqn_ctl").rglob("*")):
        if f.suffix in (".py", ".c") and f.is_file():
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from iqn_ctl.live.api import ApiError, request, sock_path
    from iqn_ctl.live.history import History
    from iqn_lab.testbed import Testbed as Lab

    params = SignalParams()
    p, n = params.p, params.n
    rng = random.Random(args.seed)
    res: dict[str, Any] = {"code": code_fingerprint(), "duration": args.duration,
                           "flood_rate": args.flood_rate,
                           "malformed_rate": args.malformed_rate, "forged_every": args.forged_every}
    with tempfile.TemporaryDirectory(prefix="iqn-soak-") as td, Lab() as lab:
        tmp = Path(td)
        state = tmp / "state"
        env = dict(os.environ, IQN_RUN_DIR=str(tmp / "run"))
        steps_file = tmp / "clock-steps.json"
        res["clock_steps"] = clock = not args.no_clock_steps and clock_injection()
        if clock:  # the agent's own serve() with a stepping wall clock (see agent_main)
            from iqn_lab.testbed import PY

            conf = {"iface": lab.cli_if, "xdp_mode": args.xdp_mode, "state_dir": str(state),
                    "run_dir": str(tmp / "run"), "steps": str(steps_file)}
            cmd = ["ip", "netns", "exec", lab.cli_ns, PY, str(Path(__file__).resolve()), "--agent",
                   json.dumps(conf)]
        else:
            cmd = lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(state), "--xdp-mode", args.xdp_mode)
        agent = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        alog = AgentLog()
        assert agent.stderr is not None
        reader = threading.Thread(target=alog.follow, args=(agent.stderr,), daemon=True)
        reader.start()
        sock = sock_path(tmp / "run", lab.cli_if)
        try:
            for _ in range(1200):
                try:
                    st0 = dict(request(sock, "status"))
                    break
                except ApiError:
                    if agent.poll() is not None:
                        why = "\n".join(alog.warnings[-5:])
                        raise RuntimeError(f"the agent did not start: {why}") from None
                    time.sleep(0.1)
            else:
                raise RuntimeError("the agent did not answer within 120 s")
            res["xdp_mode"], pid = st0["xdp_mode"], int(st0["pid"])
            res["lag_key"] = lag_key(st0)
            sampler = Sampler(sock, pid, args.sample)
            time.sleep(1.0)
            first = sampler.sample()
            sampler.rows.append(first)
            sampler.start()
            # the plan: absolute epoch times, far enough ahead for every process to start
            t0 = time.time() + 10.0
            end = t0 + args.duration
            real = real_schedule(t0, args.duration, rng, p)
            times = [b + k * 0.002 for st in real for b in st.bursts for k in range(n)]
            label = flow_label(lab.srv4, 443, lab.cli4, REAL_DPORT)
            steps = clock_steps(real, t0, args.duration, args.step_every) if clock else []
            steps_file.with_suffix(".tmp").write_text(json.dumps(steps))
            steps_file.with_suffix(".tmp").rename(steps_file)
            spec = {"flows": [
                {"name": "sig", "src": lab.srv4, "dst": lab.cli4, "dport": REAL_DPORT, "frame": 1250,
                 "times": times},
                {"name": "bg", "src": lab.srv4, "dst": lab.cli4, "dport": REAL_DPORT, "frame": 120,
                 "bulk_pps": 2.0, "from": t0, "to": end},
            ]}
            sender = lab.send(spec)
            common = {"dev": lab.srv_if, "src_mac": lab.srv_mac, "dst_mac": lab.cli_mac, "cli4": lab.cli4,
                      "cli6": lab.cli6, "srv4": lab.srv4, "start": t0, "end": end, "p": p, "n": n,
                      "real_dport": REAL_DPORT}
            workers = {
                "flood": spawn_worker(lab, "flood", {**common, "seed": args.seed + 1,
                                                     "rate": args.flood_rate}),
                "forged": spawn_worker(lab, "forged", {**common, "seed": args.seed + 2,
                                                       "every": args.forged_every}),
                "malformed": spawn_worker(lab, "malformed", {**common, "seed": args.seed + 3,
                                                             "rate": args.malformed_rate}),
            }
            poller = None
            if not args.no_flows_poll:
                # second half only: the first half shows the event loop without API load
                half = t0 + args.duration / 2
                poller = FlowsPoller(sock, label, [st.bursts[0] + (n - 1) * 0.002 for st in real],
                                     skip_before=half)
                poller.start()
            print(f"soak: {len(real)} real stalls over {args.duration:.0f} s, flood {args.flood_rate:g} "
                  f"flows/s, agent pid {pid} (XDP {res['xdp_mode']}); traffic starts at "
                  f"{time.strftime('%H:%M:%S', time.gmtime(t0))} UTC", flush=True)
            while time.time() < end:
                time.sleep(min(30.0, max(0.1, end - time.time())))
                if sampler.rows and time.time() < end:
                    row = sampler.rows[-1]
                    st = row.get("status", {})
                    print(f"  t+{row['t'] - t0:5.0f}s rss {row['rss'] / 2**20:6.1f} MiB "
                          f"flows {st.get('flows', '?')} events {st.get('events', '?')} "
                          f"lost {st.get('lost', '?')} evicted {st.get('evicted', '?')} "
                          f"stalls {st.get('stalls_ended', '?')}", flush=True)
                if agent.poll() is not None:
                    raise RuntimeError(f"the agent died (status {agent.returncode}): "
                                       + "\n".join(alog.warnings[-10:]))
            got = {k: collect(w, k, 120.0) for k, w in workers.items()}
            out, err = sender.communicate(timeout=120.0)
            if sender.returncode:
                raise RuntimeError(f"the real sender failed: {err[-2000:]}")
            sent = json.loads(out)["sent"]["sig"]
            # the last stall has ended (w_end after its last burst) and been recorded
            deadline = time.time() + 30.0
            while time.time() < deadline:
                try:
                    st = dict(request(sock, "status"))
                except ApiError:
                    continue
                # candidates the forgery guard kept back never reach the ring
                kept = st.get("unpaired", 0) + st.get("capped", 0)
                drained = st["events"] + st["lost"] + kept >= st["candidates"]
                if drained and time.time() > real[-1].end + 2 * params.w_end:
                    break
                time.sleep(0.2)
            if poller is not None:
                poller.join(timeout=30.0)
            sampler.stop.set()
            sampler.join(timeout=30.0)
            last = sampler.sample()
            sampler.rows.append(last)
        finally:
            agent.terminate()
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(10)
            reader.join(timeout=10)
        res["agent_exit"] = agent.returncode
        with History(state, create=False) as h:
            recs = h.query()
            res["records"] = h.count()
    # -- score ---------------------------------------------------------------------------------
    truth, nth = [], []
    i = 0
    for st in real:
        late_first = sent[i] - st.bursts[0]
        late_last = sent[i + (len(st.bursts) - 1) * n] - st.bursts[-1]
        truth.append(Stall(st.start + late_first, st.end + late_last, label, lab.cli4))
        nth.append(sent[i + n - 1])
        i += len(st.bursts) * n
    # a record's times moved with the agent's wall clock as it was when the stall's
    # end was written (logged): undo that offset; durations never see it
    on_real, unmapped = [], 0
    for r in recs:
        if r.flow != label:
            continue
        logged = alog.ends.get((r.flow, iso(r.start)))
        if logged is None:
            unmapped += 1
        off = offset_at(steps, logged) if logged is not None else 0.0
        on_real.append(Stall(r.start - off, r.end - off, r.flow, r.client))
    sc = score(truth, on_real)
    res["real"] = {"stalls": len(truth), "recorded": len(on_real), "matched": sc.matched,
                   "missed": len(sc.missed), "false_or_double": sc.false_positives,
                   "truncated": sum(1 for r in recs if r.flow == label and r.truncated),
                   "states": sorted({getattr(r, "state", "ended") for r in recs if r.flow == label}),
                   "unmapped": unmapped if steps else 0,
                   "clock_steps": len(steps),
                   "steps_in_stall": sum(1 for w, _ in steps if any(x.start <= w <= x.end for x in truth)),
                   "mae_ms": sc.mae * 1e3 if sc.pairs else None,
                   "sender_late_ms_p99": pct([(s - t) * 1e3 for s, t in zip(sent, times, strict=True)], 99),
                   "missed_stalls": [(s.start, s.end) for s in sc.missed],
                   "false_stalls": [(s.start, s.end) for s in sc.false_positive_stalls]}
    # event-loop lag from the log's stall starts; the flows API as polled
    starts = sorted(t for t, _, f in alog.starts if f == label)
    res["log_starts_real"] = len(starts)
    loop_lag, api_lag = [], []
    for j, t in enumerate(nth):
        nxt = nth[j + 1] if j + 1 < len(nth) else float("inf")
        hit = [s for s in starts if t - 0.005 <= s < nxt]
        if hit:
            loop_lag.append((hit[0] - t) * 1e3)
        if poller is not None and j in poller.seen:
            api_lag.append((poller.seen[j] - t) * 1e3)
    res["loop_lag_ms"] = loop_lag
    res["api_lag_ms"] = api_lag
    # every forged stall-sized signal is a lag sample too (same log line, its own flow)
    first_start: dict[str, float] = {}
    for t, _, f in alog.starts:
        first_start.setdefault(f, t)
    half = t0 + args.duration / 2
    all_lag: dict[str, list[float]] = {"first": [], "second": []}
    for j, t in enumerate(nth):
        hit = [s for s in starts if t - 0.005 <= s < (nth[j + 1] if j + 1 < len(nth) else float("inf"))]
        if hit:
            all_lag["first" if t < half else "second"].append((hit[0] - t) * 1e3)
    for g in got["forged"]["groups"]:
        if not g["sub"] and len(g["sent"]) >= n and g["flow"] in first_start:
            t = g["sent"][n - 1]
            all_lag["first" if t < half else "second"].append((first_start[g["flow"]] - t) * 1e3)
    res["all_lag_ms"] = all_lag
    if poller is not None:
        res["api"] = {"polls": len(poller.rtts), "rtt_ms": [x * 1e3 for x in poller.rtts],
                      "rows_max": max(poller.sizes, default=0), "errors": poller.errors,
                      "not_seen": len(nth) - len(poller.seen)}
    # forged traffic
    forged = got["forged"]["groups"]
    fl = {g["flow"]: g for g in forged}
    others = [r for r in recs if r.flow != label]
    res["forged"] = {
        "groups": len(forged), "stall_groups": sum(1 for g in forged if not g["sub"]),
        "sub_groups": sum(1 for g in forged if g["sub"]),
        "same_client_groups": sum(1 for g in forged if g["same_client"] and not g["sub"]),
        "recorded_same_client": sum(1 for r in others if r.client in (lab.cli4, lab.cli6)),
        "recorded_other_clients": sum(1 for r in others if r.client not in (lab.cli4, lab.cli6)),
        "recorded_from_sub": sum(1 for r in others if r.flow in fl and fl[r.flow]["sub"]),
        "recorded_unplanned": sum(1 for r in others if r.flow not in fl),
        "stall_groups_recorded": len({r.flow for r in others if r.flow in fl and not fl[r.flow]["sub"]}),
    }
    res["flood"] = got["flood"]
    res["malformed"] = got["malformed"]
    rows = sampler.rows
    final = last.get("status", {})
    res["final_status"] = final
    res["status_errors"] = sampler.errors
    res["status_last_error"] = sampler.last_error
    rss = [r["rss"] for r in rows]
    res["rss"] = {"start": rss[0], "end": rss[-1], "max": max(rss),
                  "half": min(rows, key=lambda r: abs(r["t"] - (t0 + args.duration / 2)))["rss"],
                  "timeline": [(round(r["t"] - t0), r["rss"]) for r in rows]}
    full = [r["t"] - t0 for r in rows if r.get("status", {}).get("evicted", 0) > 0]
    res["table_full_s"] = round(full[0]) if full else None
    res["cpu_share"] = (last["cpu"] - first["cpu"]) / max(1e-9, last["t"] - first["t"])
    if res["lag_key"]:
        res["agent_lag"] = [r["status"][res["lag_key"]] for r in rows if "status" in r]
    res["warnings"] = alog.warnings
    return res


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def quarter_max(res: dict[str, Any], q: int) -> int:
    """Highest RSS sampled in quarter ``q`` (1-4) of the traffic."""
    d = res["duration"]
    return max((b for t, b in res["rss"]["timeline"] if (q - 1) * d / 4 <= t <= q * d / 4), default=0)


def report(res: dict[str, Any], cmd: str) -> str:
    r, fo, fl, mf = res["real"], res["forged"], res["flood"], res["malformed"]
    fs, rss = res["final_status"], res["rss"]
    ll, al, lag = res["loop_lag_ms"], res["api_lag_ms"], res["all_lag_ms"]
    exact = r["matched"] == r["stalls"] and r["false_or_double"] == 0 and r["recorded"] == r["stalls"]
    q3, q4 = quarter_max(res, 3), quarter_max(res, 4)
    growth = (q4 - q3) / q3 if q3 else 0.0
    mal_sent = sum(mf["sent"].values())
    mal_ref = sum(mf["refused"].values())
    if res.get("clock_steps"):
        clock = (f"{r['clock_steps']} steps of the agent's injected wall clock (`serve(wall=)`; offsets "
                 f"{', '.join(f'{o:+g}' for o in OFFSETS)} s in turn, {r['steps_in_stall']} of them in the "
                 "middle of a real stall); the agent then runs through bench/soak_agent.py --agent (serve() "
                 "with the CLI's defaults) instead of `iqn-ctl attach`; recorded times are compared after "
                 "undoing the offset in force when each stall's end was logged")
    else:
        clock = ("not run (`--no-clock-steps`, or the agent has no injectable wall clock); the real system "
                 "clock is never stepped on this shared machine")

    def ms(xs: list[float]) -> str:
        return f"{pct(xs, 50):.1f} / {pct(xs, 99):.1f} / {max(xs, default=float('nan')):.1f} ms ({len(xs)})"

    lines = [SECTION, "",
             f"`{cmd}` — {res.get('when', '?')}"
             + (f" (iqn_ctl code digest {res['code']})" if "code" in res else "")
             + f", kernel {platform.release()}, "
             f"{os.cpu_count()} CPUs (shared with other work), XDP {res['xdp_mode']}, the agent with default "
             f"flags (5-tuple keys, max flows 65,536). {res['duration']:.0f} s of, at once: one real signal "
             "(a 1-4 s stall about every 10 s, n=4 every p=0.2 s, plus a 120-byte packet every 0.5 s); "
             f"a flood of {res['flood_rate']:g} one-packet flows/s (fresh spoofed 5-tuples, IPv4 and IPv6); "
             f"a forged signal about every {res['forged_every']:g} s (1-6 bursts from a spoofed server; a "
             f"fifth of them one burst of n-1 packets); {res['malformed_rate']:g} malformed frames/s "
             f"({len(MALFORMED)} kinds). Clock steps: {clock}.", "",
             "| figure | value |", "|---|---:|",
             f"| real stalls sent | {r['stalls']} |",
             f"| recorded on the real flow (record states) | {r['recorded']} ({', '.join(r['states'])}) |",
             f"| matched (the project's scoring) | {r['matched']} |",
             f"| missed / false or doubled on the real flow | {r['missed']} / {r['false_or_double']} |",
             f"| duration MAE of matched | {r['mae_ms']:.0f} ms |" if r["mae_ms"] is not None
             else "| duration MAE of matched | - |",
             f"| **every real stall recorded exactly once** | **{'yes' if exact else 'NO'}** |",
             f"| flows flooded (one packet each) | {fl['flows']:,} "
             f"({fl['flows'] / res['duration'] * 60:,.0f}/min; {fl['from_443_in_band']:,} candidate-sized "
             "from 443) |",
             f"| forged signals sent (stall-sized / sub-threshold) | {fo['stall_groups']} / "
             f"{fo['sub_groups']} |",
             f"| forged stalls recorded: at the real client (other flows) / at other clients | "
             f"{fo['recorded_same_client']} / {fo['recorded_other_clients']} |",
             f"| forged stall-sized signals recorded / records from sub-threshold ones | "
             f"{fo['stall_groups_recorded']} / {fo['recorded_from_sub']} |",
             f"| malformed frames sent (refused by the kernel) | {mal_sent:,} ({mal_ref:,}) |",
             f"| kernel parse errors counted | {fs.get('parse_errors', '?'):,} |",
             f"| records written (history rows) | {res['records']:,} |",
             f"| candidate events / **lost** | {fs.get('events', 0):,} / **{fs.get('lost', '?')}** |",
             f"| flows evicted / expired (engine) | {fs.get('evicted', 0):,} / {fs.get('expired', 0):,} |",
             ]
    if "refused" in fs:
        lines.append(f"| new flows refused by the per-source limit (events) | {fs['refused']:,} "
                     f"({fs.get('refused_events', 0):,}) |")
    lines += [
        f"| RSS start / half-way / end / max | {fmt_mib(rss['start'])} / {fmt_mib(rss['half'])} / "
        f"{fmt_mib(rss['end'])} / {fmt_mib(rss['max'])} |",
        f"| RSS high-water, 3rd quarter -> 4th quarter (flat = no leak) | {fmt_mib(q3)} -> {fmt_mib(q4)} "
        f"({growth * 100:+.1f} %) |",
        f"| agent CPU | {res['cpu_share'] * 100:.0f} % of a core |",
        *([f"| engine table full (first eviction seen) at | t+{res['table_full_s']} s |"]
          if res.get("table_full_s") is not None else []),
        f"| lag, n-th packet -> stall start logged by the event loop, real flow: p50 / p99 / max (n) | "
        f"{ms(ll)} |",
        f"| same, every signal (real + forged), first half (no API polling): p50 / p99 / max (n) | "
        f"{ms(lag['first'])} |",
        f"| same, second half{' (flows API polled)' if 'api' in res else ''} | {ms(lag['second'])} |",
    ]
    if res.get("agent_lag"):
        lines.append(f"| agent's own lag figure (`{res['lag_key']}`), last | {res['agent_lag'][-1]} |")
    if "api" in res:
        a = res["api"]
        lines.append(f"| lag, n-th packet -> real stall shown by the flows API (polled, second half): p50 / "
                     f"p99 / max (n) | {ms(al)} |")
        lines.append(f"| flows API round trip p50 / p99 (rows up to {a['rows_max']:,}) | "
                     f"{pct(a['rtt_ms'], 50):.0f} / {pct(a['rtt_ms'], 99):.0f} ms |")
    errs = [w for w in res["warnings"] if LOG_RE.match(w)]
    lines.append(f"| agent warning/error log records (+ traceback lines) | {len(errs)} "
                 f"(+{len(res['warnings']) - len(errs)}) |")
    lines.append(f"| status requests answered with an error (sampler, retried) | {res['status_errors']} |")
    lines.append(f"| agent exit status after SIGTERM | {res['agent_exit']} |")
    tl = res["rss"]["timeline"]
    step = max(1, len(tl) // 12)
    lines += ["", "RSS over time (s since traffic start: MiB): "
              + ", ".join(f"{t}: {b / 2**20:.1f}" for t, b in tl[::step] + [tl[-1]]) + ".", ""]
    if r["missed_stalls"] or r["false_stalls"]:
        lines += [f"Missed real stalls: {r['missed_stalls']}; false/doubled on the real flow: "
                  f"{r['false_stalls']}.", ""]
    if errs:
        kinds: dict[str, int] = {}
        for w in errs:
            m = LOG_RE.match(w)
            key = re.sub(r"\d+", "N", m.group(3))[:120] if m else w
            kinds[key] = kinds.get(key, 0) + 1
        lines += ["Agent warnings/errors: " + "; ".join(f"`{k}` x{v}" for k, v in kinds.items()), ""]
    if res.get("status_last_error"):
        lines += [f"Last status error: `{res['status_last_error'][:200]}`", ""]
    return "\n".join(lines) + "\n"


def summary(res: dict[str, Any]) -> str:
    """Another run's headline figures, for the same section."""
    r, fs, lag = res["real"], res["final_status"], res["all_lag_ms"]
    every = lag["first"] + lag["second"]
    exact = r["matched"] == r["stalls"] and r["false_or_double"] == 0 and r["recorded"] == r["stalls"]
    return (f"Also `{res.get('cmd', CMD)}` ({res.get('when', '?')}): real stalls "
            f"{r['matched']}/{r['stalls']} "
            f"matched, missed {r['missed']}, false/doubled {r['false_or_double']} (exactly once: "
            f"{'yes' if exact else 'NO'}); lost {fs.get('lost', '?')}; RSS {fmt_mib(res['rss']['start'])} -> "
            f"{fmt_mib(res['rss']['end'])} (max {fmt_mib(res['rss']['max'])}; high-water 3rd -> 4th quarter "
            f"{fmt_mib(quarter_max(res, 3))} -> {fmt_mib(quarter_max(res, 4))}); event-loop lag, every "
            f"signal: p50 {pct(every, 50):.1f} / p99 {pct(every, 99):.1f} / max {max(every):.1f} ms "
            f"({len(every)})." + (f" {res['note']}" if res.get("note") else "") + "\n\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of hostile traffic")
    ap.add_argument("--flood-rate", type=float, default=1500.0, help="new one-packet flows per second")
    ap.add_argument("--forged-every", type=float, default=1.0, help="seconds between forged signals (mean)")
    ap.add_argument("--malformed-rate", type=float, default=100.0, help="malformed frames per second")
    ap.add_argument("--sample", type=float, default=2.0, help="seconds between RSS/status samples")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--xdp-mode", default="auto", choices=("auto", "native", "skb"))
    ap.add_argument("--no-flows-poll", action="store_true", help="do not poll the flows API")
    ap.add_argument("--no-clock-steps", action="store_true",
                    help="run plain `iqn-ctl attach`, no clock steps")
    ap.add_argument("--step-every", type=float, default=30.0, help="seconds between clock steps")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", type=Path, help="also dump the raw results here")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    ap.add_argument("--agent", metavar="CONFIG", help=argparse.SUPPRESS)
    ap.add_argument("--from-json", type=Path, nargs="+",
                    help="re-render the section from --json dumps (the first; the others as short rows)")
    args = ap.parse_args()
    if args.worker:
        worker_main(*args.worker)
        return
    if args.agent:
        agent_main(args.agent)
        return
    more: list[dict[str, Any]] = []
    if args.from_json:
        res, *more = (json.loads(f.read_text()) for f in args.from_json)
    else:
        if os.geteuid() != 0:
            sys.exit(f"soak_agent: needs root (XDP, namespaces): {CMD}")
        res = run(args)
        shown = [a for a in sys.argv[1:] if a != "--no-write"]
        if "--json" in shown:  # a scratch file is not part of the re-run command
            i = shown.index("--json")
            del shown[i:i + 2]
        res["cmd"] = " ".join([CMD, *shown])
        res["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = report(res, res.get("cmd", CMD)) + "".join(summary(m) for m in more)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    if not args.no_write:
        _results.write_section(SECTION, text, args.out)


if __name__ == "__main__":
    main()
