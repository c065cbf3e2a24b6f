"""Delay with jitter on a lab link, where the kernel has no netem.

The usual way without netem - a BPF program at TC egress setting each
packet's earliest departure time (``skb->tstamp``) and the ``fq`` qdisc
holding it until then - needs ``sch_fq`` (or ``sch_etf``), and this kernel
has neither (its qdiscs: htb, tbf, fifo, clsact). So the holding is done in
user space, the rest by the kernel:

1. a BPF classifier at the link's TC egress (``bpf/iqn_jitter.c``, program
   ``iqn_jitter``, attached through :mod:`iqn_ctl.live.tc`) redirects every
   IPv4/IPv6 frame to a tap device of the delay line (ARP and neighbour
   discovery pass untouched);
2. the delay line (:func:`serve`) reads each frame from the tap, draws its
   delay from the configured distribution and holds it (:class:`DelayLine`,
   sans-I/O: a heap by departure time);
3. at its departure time the frame goes out on the link through an
   ``AF_PACKET`` socket with ``PACKET_QDISC_BYPASS``, which skips the TC hook,
   so a frame is delayed once and never loops.

Each packet's delay is drawn independently and frames leave in departure
order, so packets of one flow reorder when the jitter exceeds the gap
between them: the path the paper measured (about 1 s of jitter on a signal
whose toggles are milliseconds apart), which the engine's windows have to
cope with. A jitter that kept order would be a different, gentler path.

What user space adds: the wake-up of the delay line (well under a
millisecond on an idle box, a few on a loaded one), on top of the drawn delay;
tests/test_lab_jitter.py measures the whole.

Distributions (``delay`` D and ``jitter`` J, seconds):

* ``constant``: D;
* ``uniform``: D + U(0, J) (the paper's path: J about 1 s);
* ``normal``: D + N(0, J), clipped at 0 (a departure cannot precede the send);
* ``exponential``: D + Exp(mean J).
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import json
import math
import os
import random
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import LabError

DISTS = ("constant", "uniform", "normal", "exponential")
SRC = Path(__file__).with_name("bpf") / "iqn_jitter.c"
PROG_NAME = "iqn_jitter"
#: longest delay accepted, s
MAX_DELAY = 60.0
#: frames the tap queues before the delay line reads them (the kernel drops beyond)
TAP_QUEUE = 10_000
#: longest the delay line sleeps with nothing due (s): how soon it notices a stop
IDLE = 0.1
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI = 0x0002, 0x1000
_SOL_PACKET, _PACKET_QDISC_BYPASS = 263, 20


@dataclass(frozen=True)
class Jitter:
    """A delay distribution: ``delay`` plus ``jitter`` shaped by ``dist`` (module docstring)."""

    delay: float
    jitter: float = 0.0
    dist: str = "uniform"

    def __post_init__(self) -> None:
        if self.dist not in DISTS:
            raise LabError(f"unknown jitter distribution {self.dist!r}: one of {', '.join(DISTS)}")
        for name, v in (("delay", self.delay), ("jitter", self.jitter)):
            if not (math.isfinite(v) and 0 <= v <= MAX_DELAY):
                raise LabError(f"--{name} must be in 0..{MAX_DELAY:g} s, got {v}")

    def quantile(self, u: float) -> float:
        """The delay (s) below which a fraction ``u`` (0 < u < 1) of packets stay."""
        d, j = self.delay, self.jitter
        if self.dist == "constant" or j == 0:
            return d
        if self.dist == "uniform":
            return d + j * u
        if self.dist == "exponential":
            return min(d - j * math.log1p(-u), MAX_DELAY)
        return max(0.0, d + j * statistics.NormalDist().inv_cdf(u))

    def draw(self, rng: random.Random) -> float:
        """One packet's delay (s): the quantile of a uniform draw."""
        return self.quantile(min(max(rng.random(), 1e-12), 1 - 1e-12))


@dataclass
class DelayLine:
    """Frames in, each with its drawn delay; frames out at their departure
    times, in departure order. Sans-I/O: the caller owns the clock."""

    spec: Jitter
    rng: random.Random = field(default_factory=random.Random)
    _heap: list[tuple[float, int, bytes]] = field(default_factory=list)
    _seq: int = 0

    def push(self, frame: bytes, now: float) -> float:
        """Hold ``frame``, arrived at ``now``; returns its departure time."""
        depart = now + self.spec.draw(self.rng)
        self._seq += 1
        heapq.heappush(self._heap, (depart, self._seq, frame))
        return depart

    def due(self, now: float) -> list[bytes]:
        """The frames whose departure time has come, in departure order."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def next_departure(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    @property
    def held(self) -> int:
        return len(self._heap)


def tap_name(iface: str) -> str:
    """The delay line's tap for ``iface``: unique per interface, 12 characters."""
    return f"iqnj{zlib.crc32(iface.encode()):08x}"


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise LabError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _open_tap(name: str) -> int:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    except OSError as e:
        raise LabError(f"cannot open /dev/net/tun for the delay line: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise LabError(f"cannot create the tap {name}: {e.strerror}") from None
    # the tap must not talk itself (IPv6 autoconfiguration would send through the line)
    Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1\n")
    _ip("link", "set", "dev", name, "txqueuelen", str(TAP_QUEUE), "up")
    return fd


def serve(iface: str, spec: Jitter, ready: Callable[[], None] | None = None,
          stop: Callable[[], bool] = lambda: False, seed: int | None = None) -> None:  # fmt: skip
    """Delay every IP frame leaving ``iface`` (in this namespace) until ``stop()``
    says so or SIGTERM/SIGINT arrives; then take the classifier and the tap away."""
    from iqn_ctl.live import tc

    try:
        from bcc import BPF
    except ImportError:
        raise LabError("the delay line needs bcc (Debian's python3-bpfcc): "
                       "run `bash scripts/setup.sh`") from None
    try:
        socket.if_nametoindex(iface)
    except OSError:
        raise LabError(f"no such interface: {iface}") from None
    tap = tap_name(iface)
    fd = _open_tap(tap)
    out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    stopping = False

    def _term(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, _term) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        out.setsockopt(_SOL_PACKET, _PACKET_QDISC_BYPASS, 1)
        out.bind((iface, 0))
        tap_mac = bytes.fromhex(Path(f"/sys/class/net/{tap}/address").read_text().strip().replace(":", ""))
        b = BPF(src_file=str(SRC).encode(), cflags=[f"-DIQN_TAP_IFINDEX={socket.if_nametoindex(tap)}"])
        fn = b.load_func(PROG_NAME.encode(), BPF.SCHED_CLS)
        try:
            tc.attach(iface, fn.fd, fn.name, "egress")
        except tc.TcError as e:
            raise LabError(str(e)) from None
        line = DelayLine(spec, random.Random(seed))
        if ready is not None:
            ready()
        while not (stopping or stop()):
            now = time.monotonic()
            for frame in line.due(now):
                try:
                    out.send(frame)
                except OSError as e:
                    if e.errno not in (errno.ENOBUFS, errno.EAGAIN, errno.EMSGSIZE):
                        raise
            nxt = line.next_departure()
            wait = IDLE if nxt is None else min(IDLE, max(0.0, nxt - time.monotonic()))
            try:
                readable, _, _ = select.select([fd], [], [], wait)
            except InterruptedError:
                continue
            if readable:
                now = time.monotonic()
                while True:
                    try:
                        frame = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if frame[6:12] != tap_mac:  # the tap's own frames are not the link's
                        line.push(frame, now)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        tc.detach(iface, ("egress",))
        out.close()
        os.close(fd)  # a tap that is not persistent goes with its last descriptor


def start(iface: str, spec: Jitter, netns: str, state: Path, timeout: float = 120.0) -> int:
    """Run the delay line for ``iface`` in ``netns`` in the background (pid and log
    in ``state``, as the lab's other daemons); returns once it is delaying."""
    from . import procs

    stop_bg(state)
    state.mkdir(parents=True, exist_ok=True)
    log = state / "jitter.log"
    log.write_text("")
    pid = procs.spawn(state, "jitter", [sys.executable, "-m", "iqn_lab.jitter", "run", iface,
                                        json.dumps(asdict(spec))], ns=netns)  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "ready" in text:
            return pid
        if not procs.alive(pid):
            last = text.strip().splitlines()[-1] if text.strip() else "no output"
            raise LabError(f"the delay line on {iface} did not start: {last}")
        time.sleep(0.1)
    procs.stop([pid])
    raise LabError(f"the delay line on {iface} did not start within {timeout:g} s; see {log}")


def stop_bg(state: Path) -> bool:
    """Stop the background delay line of ``state`` (by its pid); True if one ran."""
    from . import procs

    pid = procs.pid_of(state, "jitter")
    if pid is None:
        return False
    procs.stop([pid], grace=10.0)
    (state / "jitter.pid").unlink(missing_ok=True)
    return True


def _main(argv: list[str]) -> int:
    """``python -m iqn_lab.jitter run IFACE SPEC_JSON`` (inside the link's namespace):
    prints ``ready`` once frames are being delayed, runs until SIGTERM."""
    if len(argv) != 3 or argv[0] != "run":
        print("usage: python -m iqn_lab.jitter run IFACE SPEC_JSON", file=sys.stderr)
        return 2
    try:
        serve(argv[1], Jitter(**json.loads(argv[2])), ready=lambda: print("ready", flush=True))
    except (LabError, OSError, ValueError, TypeError) as e:
        print(f"iqn-lab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
