"""Load iqn_ctl/live/bpf/iqn_xdp.c on a router interface and hand its burst records to
the agent.

The kernel program does the per-packet work; this module only compiles it
with the operator's filter and the signal's n (-D constants, so the fast path
has no map look-up for its configuration), attaches it without trampling
someone else's XDP program, and drains the program's BPF ring buffer in
batches straight from its memory map (:mod:`iqn_ctl.live.ringbuf`: no Python
call per record), plus the short bursts still open in the kernel's mapped
burst table (:mod:`iqn_ctl.live.bursttable`). Per-flow and per-client volume
is read from mapped arrays too (:meth:`Datapath.flow_counters`,
:meth:`Datapath.client_volume`). Times stay on the kernel's monotonic clock
(:meth:`Datapath.poll_bursts`) for the inference.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from iqn_ctl.engine.bursts import GAP_NS, burst_cap
from iqn_ctl.engine.discard import Counters
from iqn_ctl.engine.params import BURST_MAX, DEFAULT_MAX_FLOWS, DEFAULT_N, CandidateFilter
from iqn_ctl.errors import IqnError
from iqn_ctl.live import bpf_testrun, caps, layout, tc
from iqn_ctl.live.bpfsrc import BPF_DIR, parser_cflags
from iqn_ctl.live.bursttable import BurstBatch, BurstTaker, empty_batch
from iqn_ctl.live.devtype import DeviceType, DeviceTypeError, device_type
from iqn_ctl.live.layout import (
    BURST_DTYPE,
    CLIENT_VOL_DTYPE,
    COUNTERS,
    VOL_DTYPE,
    BurstC,
    ClientVolC,
    FlowKeyC,
    VolC,
    client_hashes,
    client_key,
    flow_hashes,
    server_name,
    slot_tag,
)
from iqn_ctl.live.ringbuf import RingReader
from iqn_ctl.live.settings import (
    DEFAULT_DIRECTION,
    DEFAULT_RING_PAGES,
    DEFAULT_VOL_SAMPLE,
    DEFAULT_XDP_MODE,
    Guard,
    dataplane_problem,
    guard_problem,
    hook_problem,
)

PROG_NAME = "iqn_xdp"
#: the C function of the XDP entry used only while moving from TC back to XDP
#: (iqn_xdp.c: iqn_xdp plus the handover step); loaded under PROG_NAME too
MOVE_FN = "iqn_xdp_move"
#: the TC entry of the same program (its name starts with tc.NAME_PREFIX, so detach finds it)
TC_PROG_NAME = "iqn_tc"
#: the forgery guard's TC classifier (pair_note), attached at the direction
#: opposite to the candidates' hook: egress for XDP/TC ingress, ingress for
#: --direction egress. Its own name, so neither classifier replaces or removes
#: the other (nor the lab's iqn_jitter); its priority comes from the same search
EGRESS_PROG = "iqn_tc_egress"
#: every TC classifier the data plane attaches (what crash clean-up removes)
TC_NAMES = (TC_PROG_NAME, EGRESS_PROG)
#: TC priorities tried for IQN's classifiers, lowest (first to run) first
TC_PRIO_TRIES = 16
SRC = BPF_DIR / "iqn_xdp.c"
#: bytes a record takes in the ring: 8-byte header + struct burst, 8-aligned
RECORD_BYTES = (8 + BURST_DTYPE.itemsize + 7) & ~7
PAGE = 4096
#: open-burst slots per CPU in the kernel's table (docs/dataplane.md): the least per CPU
BURST_SLOTS = 1024
#: open-burst slots in all (:func:`default_burst_slots`). The table is direct-mapped by a
#: flow hash: another flow's candidate landing on an open burst's slot writes that burst
#: out early, so a burst splits into several records. With 1,024 slots on the one CPU a
#: veth's traffic arrives on, 10,000 stalling flows (about 300 bursts open at once) gave
#: 2.1 records per burst and 50,000 gave 3.8 (bench_scale: 5.66 M records for 1.5 M
#: bursts), the agent's work per burst multiplied by as much (with 8,192 per CPU, this
#: default on 2 CPUs: 1.14-1.37 at 10,000). 16,384 in all: 1.9 MiB of kernel memory
#: (120-byte rows), and the user-space sweep of the mapped table every poll reads ~1.5 ns
#: per row (~26 µs; the idle loop
#: wakes ~250 times a second), whatever the CPU count: more slots would split fewer
#: bursts in an outage at the cost of every idle agent's CPU.
BURST_SLOTS_TOTAL = 16384


def default_burst_slots(ncpu: int) -> int:
    """Open-burst slots per CPU: :data:`BURST_SLOTS_TOTAL` shared out over the
    CPUs (RSS spreads flows over them), a power of two, at least :data:`BURST_SLOTS`."""
    per = BURST_SLOTS_TOTAL // max(ncpu, 1)
    per = 1 << (per.bit_length() - 1) if per > 0 else 1
    return max(BURST_SLOTS, per)

#: slots of the per-flow and per-client volume arrays
VOL_SLOTS = 65536
#: the reader is woken once this many burst records wait; fewer are read at
#: the agent's poll timeout (3 ms), which bounds the stall-visible latency
DEFAULT_WAKEUP_RECORDS = 16

# XDP attach flags (linux/if_link.h) and the modes `ip -j link` reports
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
#: replace the program given by IFLA_XDP_EXPECTED_FD, and only that one
XDP_FLAGS_REPLACE = 1 << 4
_MODE_FLAGS = {1: XDP_FLAGS_DRV_MODE, 2: XDP_FLAGS_SKB_MODE, 3: XDP_FLAGS_HW_MODE}
#: the attach flag of each XDP mode IQN attaches in (``--xdp-mode``'s names)
_ATTACH_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "skb": XDP_FLAGS_SKB_MODE}
_IP_MODE = {1: "xdpdrv", 2: "xdpgeneric", 3: "xdpoffload"}  # `ip link set dev X <mode> off`

log = logging.getLogger(__name__)
Batch = tuple[list[bytes], "npt.NDArray[np.int64]"]


def possible_cpus() -> int:
    """The kernel's possible CPUs (the per-CPU slices the program needs)."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
        return max(int(part.split("-")[-1]) for part in text.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def _map_array(fd: int, rows: int, dtype: np.dtype) -> tuple[mmap.mmap, npt.NDArray[np.void]]:
    """A BPF_F_MMAPABLE array map's values as a read-only numpy view."""
    size = (rows * dtype.itemsize + PAGE - 1) // PAGE * PAGE
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=0)
    return m, np.frombuffer(m, dtype, count=rows)


class DatapathError(IqnError):
    """A one-line, actionable reason the data plane cannot run."""


# ---------------------------------------------------------------------------
# what is attached where


class ForeignXdpError(DatapathError):
    """Another (non-IQN) XDP program holds the interface and ``force`` is off:
    ``--hook auto`` goes to TC beside it, and may move back once it is gone."""


#: the kernel's handover flag (iqn_xdp.c): off, armed by the move to XDP, XDP has run
HANDOVER_OFF, HANDOVER_ARMED, HANDOVER_XDP = 0, 1, 2


def _ifindex(iface: str) -> int:
    try:
        return socket.if_nametoindex(iface)
    except (OSError, ValueError):
        raise DatapathError(f"no such network interface: {iface!r}") from None


def _attached(iface: str) -> list[tuple[int, int, str]]:
    """(mode, prog id, prog name) of every XDP program on ``iface``;
    mode 1 native, 2 generic (skb), 3 offloaded."""
    _ifindex(iface)
    try:
        out = subprocess.run(
            ["ip", "-j", "link", "show", "dev", iface], capture_output=True, text=True, check=True
        ).stdout
    except FileNotFoundError:
        raise DatapathError(
            "the `ip` command (iproute2) is missing: run `sudo bash scripts/setup.sh`"
        ) from None
    except subprocess.CalledProcessError:
        raise DatapathError(f"no such network interface: {iface!r}") from None
    links: list[dict[str, Any]] = json.loads(out or "[]")
    xdp = links[0].get("xdp") if links else None
    if not xdp:
        return []
    entries = xdp.get("attached") or [xdp]
    found = []
    for e in entries:
        prog = e.get("prog") or {}
        if "id" not in prog:
            continue
        name = prog.get("name")
        if name is None:
            try:
                name = bpf_testrun.prog_name_by_id(int(prog["id"]))
            except OSError:
                name = "?"
        found.append((int(e.get("mode", 0)), int(prog["id"]), str(name)))
    return found


def xdp_program_on(iface: str) -> tuple[int, str] | None:
    """(prog id, prog name) of the XDP program attached to ``iface`` in any mode, or None."""
    progs = _attached(iface)
    return (progs[0][1], progs[0][2]) if progs else None


@contextlib.contextmanager
def _quiet_stderr(fds: tuple[int, ...] = (2,)) -> Iterator[list[str]]:
    """Capture what bcc/libbpf/clang print on ``fds`` (warnings, libbpf chatter;
    bcc prints "Unable to find kernel headers" on stdout); the caller gets the
    text, e.g. to summarise a compile failure."""
    captured: list[str] = []
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed or None in a daemon
            stream.flush()
    saved: dict[int, int] = {}
    for fd in fds:
        with contextlib.suppress(OSError):  # a closed fd needs no silencing
            saved[fd] = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            for fd in saved:
                os.dup2(tmp.fileno(), fd)
            yield captured
        finally:
            for fd, old in saved.items():
                os.dup2(old, fd)
                os.close(old)
            tmp.seek(0)
            captured.append(tmp.read().decode(errors="replace"))


def _detach_mode(iface: str, mode: int) -> None:
    from bcc import BPF

    with _quiet_stderr():
        try:
            BPF.remove_xdp(iface.encode(), _MODE_FLAGS.get(mode, 0))
        except Exception as e:  # bcc raises bare Exception
            raise DatapathError(f"cannot remove the XDP program from {iface}: {e}") from None


def replace_xdp(iface: str, fd: int, old_fd: int, mode: str) -> None:
    """Swap the XDP program ``old_fd`` on ``iface`` for ``fd`` in one step
    (``mode``: "native" or "skb", as attached): the kernel switches the pointer,
    so every frame runs one of the two and none runs neither. Fails (EEXIST)
    if ``old_fd``'s program is not the one there any more, so a program someone
    else attached meanwhile is never replaced. bcc's attach_xdp cannot pass the
    expected program, hence rtnetlink through pyroute2, as tc.py does."""
    flags = _ATTACH_FLAGS[mode] | XDP_FLAGS_REPLACE
    try:
        from pyroute2 import IPRoute
    except ImportError:  # pragma: no cover - a dependency of the project
        raise DatapathError("pyroute2 is missing: reinstall IQN (pip install .)") from None
    with IPRoute() as ipr:
        try:
            ipr.link("set", index=_ifindex(iface), xdp={"attrs": [
                ("IFLA_XDP_FD", fd), ("IFLA_XDP_EXPECTED_FD", old_fd), ("IFLA_XDP_FLAGS", flags)]})
        except Exception as e:  # pyroute2's NetlinkError carries the errno as .code
            raise DatapathError(f"cannot replace the XDP program on {iface}: {e}") from None


def remove_xdp(iface: str) -> bool:
    """Remove IQN's program(s) from ``iface`` in every mode; True if one was there.
    Needs no running agent: it recognises the program by name."""
    removed = False
    for mode, _pid, name in _attached(iface):
        if name == PROG_NAME:
            _detach_mode(iface, mode)
            removed = True
    return removed


def remove_egress(iface: str) -> bool:
    """Remove the forgery guard's pairing classifier(s) left on ``iface``, either
    direction (an agent killed with SIGKILL leaves its filter attached); True if
    one was there. Foreign filters stay, and so do IQN's other classifiers."""
    try:
        return bool(tc.detach(iface, names=(EGRESS_PROG,)))
    except tc.TcError as e:
        raise DatapathError(str(e)) from None


# ---------------------------------------------------------------------------


def _require_root() -> None:
    msg = caps.problem("loading an XDP program")
    if msg:
        raise DatapathError(msg)


def _compile_error(iface: str, text: str) -> DatapathError:
    release = os.uname().release
    if "Unable to find kernel headers" in text or "kernel headers" in text.lower() or (
        "file not found" in text and ("linux/" in text or "asm/" in text)
    ):
        return DatapathError(
            f"kernel headers not found at /lib/modules/{release}/build: run `sudo bash scripts/setup.sh`"
        )
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
    summary = lines[0] if lines else (text.strip().splitlines() or ["unknown error"])[-1]
    return DatapathError(f"compiling {SRC.name} for {iface} failed: {summary}")


def remove_tc(iface: str) -> bool:
    """Remove the data plane's TC classifier (``iqn_tc``) from ``iface``, both
    directions; foreign filters and other IQN ones (the lab's ``iqn_jitter``)
    stay. True if one was there. Needs no running agent."""
    try:
        return bool(tc.detach(iface, names=(TC_PROG_NAME,)))
    except tc.TcError as e:
        raise DatapathError(str(e)) from None


class Datapath:
    """IQN's classifier on one interface: compile, attach (XDP or TC), poll, detach."""

    def __init__(
        self,
        iface: str,
        filt: CandidateFilter,
        max_flows: int = DEFAULT_MAX_FLOWS,
        xdp_mode: str = DEFAULT_XDP_MODE,
        force: bool = False,
        ring_pages: int = DEFAULT_RING_PAGES,
        wakeup_events: int = DEFAULT_WAKEUP_RECORDS,
        perf_pages: int | None = None,
        hook: str = "xdp",
        direction: str = DEFAULT_DIRECTION,
        guard: Guard | None = None,
        n: int = DEFAULT_N,
        burst_slots: int | None = None,
        vol_slots: int = VOL_SLOTS,
        vol_sample: int = DEFAULT_VOL_SAMPLE,
    ) -> None:
        """``ring_pages``: the ring buffer's size in 4 KiB pages, shared by all
        CPUs (``perf_pages`` is its old name, still accepted). The reader is
        woken once ``wakeup_events`` burst records wait. ``n``: the signal's n
        (--n), the most candidates of a burst (at most BURST_MAX).
        ``burst_slots`` (per CPU; None: :func:`default_burst_slots`) and
        ``vol_slots``: table sizes, powers of two.
        ``vol_sample``: the volume arrays count 1 in this many non-candidate
        datagrams, each for this many (a power of two; 1: exact counts).
        ``max_flows`` sizes the forgery guard's pairing and cap tables (the
        engine's table is bounded by the agent).

        ``hook``: "xdp" (refuses a foreign XDP program unless ``force``), "tc"
        (a clsact classifier at ``direction``), or "auto": XDP unless another
        XDP program holds the interface or XDP cannot attach, then TC. The
        device type (Ethernet or layer 3) picks the first parser. Both hooks
        run the same classifier and write the same burst records.

        ``guard``: the forgery guard (pairing with the client's packets, the
        per-client cap), compiled in; a candidate it does not admit never
        enters a burst. None checks nothing (every candidate is grouped),
        which is what tests of the classifier alone want."""
        if perf_pages is not None:
            ring_pages = perf_pages
        problem = dataplane_problem(xdp_mode, max_flows, ring_pages, vol_sample) or hook_problem(
            hook, direction)
        if guard is not None:
            problem = problem or guard_problem(guard.window, guard.cap, guard.credits)
        if problem:
            raise DatapathError(problem)
        if wakeup_events < 1:
            raise DatapathError(f"wakeup_events must be at least 1, got {wakeup_events}")
        ncpu = possible_cpus()
        if burst_slots is None:
            burst_slots = default_burst_slots(ncpu)
        for name, v in (("burst_slots", burst_slots), ("vol_slots", vol_slots)):
            if v < 1 or v & (v - 1):
                raise DatapathError(f"{name} must be a power of two, got {v}")
        _require_root()
        _ifindex(iface)
        try:
            self.device: DeviceType = device_type(iface)
        except DeviceTypeError as e:
            raise DatapathError(f"{iface}: {e}") from None
        if not SRC.is_file():
            raise DatapathError(f"the XDP program source is missing ({SRC}): reinstall IQN (pip install .)")
        self.iface = iface
        self.filt = filt
        self.xdp_mode = xdp_mode
        self.force = force
        self.wakeup_events = wakeup_events
        self.ring_pages = ring_pages
        self.hook_wanted = hook
        self.direction = direction if hook != "xdp" else "ingress"
        self.mode: str | None = None  # "native"/"skb" (XDP) or "tc" once attached
        self.hook: str | None = None  # "xdp" or "tc" once attached
        self.tc_prio: int | None = None  # the TC filter priority used
        #: on TC only because a foreign XDP program held the interface (--hook auto):
        #: the attach watchdog moves back to XDP once it is gone (:meth:`move_to_xdp`)
        self.beside_foreign = False
        self.guard = guard if guard is not None else Guard(pairing=False, cap=0.0)
        self.pair_prio: int | None = None  # the pairing classifier's TC priority once attached
        self.burst_n = burst_cap(n)
        self.burst_slots = burst_slots
        self.vol_slots = vol_slots
        self.vol_sample = vol_sample
        self.ncpu = ncpu
        self._closed = False
        try:
            from bcc import BPF
        except ImportError:
            raise DatapathError(
                "bcc is missing (Debian's python3-bpfcc): run `sudo bash scripts/setup.sh`"
            ) from None
        self._BPF = BPF
        cflags = [
            f"-DIQN_PORT={filt.port}",
            f"-DIQN_MIN_SIZE={filt.min_size}",
            f"-DIQN_MAX_SIZE={filt.max_size}",
            f"-DIQN_RING_PAGES={ring_pages}",
            f"-DIQN_WAKEUP_BYTES={min(wakeup_events * RECORD_BYTES, ring_pages * PAGE)}",
            f"-DIQN_MAX_FLOWS={max_flows}",
            *parser_cflags(self.device.l3),
            *self.guard.cflags(n),
            f"-DIQN_BURST_N={self.burst_n}",
            f"-DIQN_BURST_GAP_NS={GAP_NS}",
            f"-DIQN_BURST_MAX={BURST_MAX}",
            f"-DIQN_BURST_SLOTS={burst_slots}",
            f"-DIQN_VOL_SLOTS={vol_slots}",
            f"-DIQN_VOL_SAMPLE={vol_sample}",
            f"-DIQN_NCPU={self.ncpu}",
            "-w",
        ]
        err = ""
        with _quiet_stderr((1, 2)) as out:
            try:
                self._bpf = BPF(src_file=str(SRC).encode(), cflags=cflags)
                self._fn = self._bpf.load_func(PROG_NAME.encode(), BPF.XDP)
                self._tc_fn = self._bpf.load_func(TC_PROG_NAME.encode(), BPF.SCHED_CLS)
                self._egress_fn = (self._bpf.load_func(EGRESS_PROG.encode(), BPF.SCHED_CLS)
                                   if self.guard.pairing else None)
            except Exception as e:  # bcc raises bare Exception for compile/load failures
                err = str(e) or type(e).__name__
        if err:
            raise _compile_error(iface, "\n".join(out) + "\n" + err)
        self._prog_id = bpf_testrun.prog_id_by_fd(self._fn.fd)
        #: the move entry (MOVE_FN) as (fd, prog id): loaded by begin_move_to_xdp,
        #: closed once iqn_xdp replaced it (finish_move_to_xdp) or at detach
        self._move: tuple[int, int] | None = None
        #: id of the XDP entry attached: iqn_xdp's, or the move entry's while a move lasts
        self._xdp_id = self._prog_id
        self._tc_prog_id = bpf_testrun.prog_id_by_fd(self._tc_fn.fd)
        self._counters = self._bpf[b"counters"]
        self._handover_map = self._bpf[b"handover"]
        maps = {name: self._bpf[name.encode()] for name in ("bursts", "vol_flow", "vol_client")}
        checks: list[tuple[Any, type[ctypes.Structure]]] = [(maps[name].Leaf, ours) for name, ours in
                  (("bursts", BurstC), ("vol_flow", VolC), ("vol_client", ClientVolC))]
        checks.append((dict(maps["bursts"].Leaf._fields_)["key"], FlowKeyC))
        for theirs, ours in checks:
            problem = layout.check(theirs, ours)
            if problem:
                self._bpf.cleanup()
                raise DatapathError(f"{SRC.name}: {problem}")
        # The kernel wakes the reader only when `wakeup_events` burst records
        # wait (iqn_xdp.c): a wake-up per record would cost the kernel far more
        # than the record. Whatever waits below the threshold is read at the
        # poll timeout, and the timestamps are the kernel's, so lateness does
        # not skew the inference.
        try:
            self._ring = RingReader(self._bpf[b"events"].map_fd, ring_pages * PAGE, BURST_DTYPE)
            self._maps = []
            m, burst_tab = _map_array(maps["bursts"].map_fd, self.ncpu * burst_slots, BURST_DTYPE)
            self._maps.append(m)
            m, self._vol = _map_array(maps["vol_flow"].map_fd, vol_slots, VOL_DTYPE)
            self._maps.append(m)
            m, self._cvol = _map_array(maps["vol_client"].map_fd, vol_slots, CLIENT_VOL_DTYPE)
            self._maps.append(m)
        except (OSError, ValueError) as e:
            self._bpf.cleanup()
            raise DatapathError(f"cannot map the ring buffer or tables of {SRC.name}: {e}") from None
        self._taker = BurstTaker(burst_tab, GAP_NS, burst_slots)

    @property
    def prog_fd(self) -> int:
        return int(self._fn.fd)

    @property
    def prog_id(self) -> int:
        """Kernel id of the XDP entry attached (what `ip link` shows): iqn_xdp's,
        the move entry's only while a move to XDP lasts (or if its swap failed)."""
        return self._xdp_id

    def _ours(self) -> set[int]:
        """Ids of every XDP entry of this data plane that may be attached."""
        return {self._prog_id} | ({self._move[1]} if self._move else set())

    @property
    def tc_prog_fd(self) -> int:
        """The TC entry (SCHED_CLS) of the same program: same maps, same classifier."""
        return int(self._tc_fn.fd)

    @property
    def tc_prog_id(self) -> int:
        return self._tc_prog_id

    def describe(self) -> str:
        """The hook in use, for people: "XDP native", "XDP skb", "TC ingress"."""
        if self.hook == "tc":
            return f"TC {self.direction}"
        return f"XDP {self.mode}" if self.mode else "not attached"

    @property
    def egress_fd(self) -> int | None:
        """The pairing classifier's program fd (None without pairing)."""
        return None if self._egress_fn is None else int(self._egress_fn.fd)

    @property
    def pair_direction(self) -> str:
        """Where the client's datagrams to the server pass: the direction
        opposite to the candidates' (egress for XDP and TC ingress)."""
        return "ingress" if self.direction == "egress" else "egress"

    def _attach_egress(self) -> None:
        """Pairing: the client's datagrams cross this interface the other way,
        so a TC classifier there sees them (clsact, via tc.py), at a priority
        found by the same search as the ingress classifier's."""
        if self._egress_fn is None:
            return
        try:
            prio = self._attach_cls(int(self._egress_fn.fd), EGRESS_PROG, self.pair_direction)
        except DatapathError as e:
            raise DatapathError(f"{e} (pairing needs it; --pairing off skips it)") from None
        self.pair_prio = prio

    def _remove_egress(self) -> None:
        if self.pair_prio is None:
            return
        with contextlib.suppress(tc.TcError):  # the interface is gone: nothing left
            tc.detach(self.iface, (self.pair_direction,), names=(EGRESS_PROG,))  # type: ignore[arg-type]
        self.pair_prio = None

    def attach(self) -> str:
        """Attach to the interface; returns "native" or "skb" (generic XDP),
        or "tc" for the TC hook, whichever was used (:attr:`hook` says which)."""
        if self._closed:
            raise DatapathError("data plane already closed")
        self.beside_foreign = False
        if self.hook_wanted == "tc" or self.direction == "egress":
            return self._attach_tc()
        try:
            return self._attach_xdp()
        except DatapathError as e:
            self.beside_foreign = isinstance(e, ForeignXdpError)
            # auto: a foreign XDP program (never replaced without force) or an
            # interface XDP cannot attach to; TC ingress runs after XDP
            if self.hook_wanted != "auto":
                raise
            log.warning("%s; attaching at TC %s instead", e, self.direction)
            return self._attach_tc()

    def _attach_tc(self) -> str:
        """Attach the TC entry first on the hook (priority 1, else the first
        free one), then the pairing classifier on the other direction."""
        self._handover(HANDOVER_OFF)  # left at HANDOVER_XDP by an earlier move, iqn_tc would skip all
        prio = self._attach_cls(self.tc_prog_fd, TC_PROG_NAME, self.direction)
        self.hook, self.mode, self.tc_prio = "tc", "tc", prio
        try:
            self._attach_egress()
        except DatapathError:
            self.detach()
            raise
        return "tc"

    def _attach_cls(self, fd: int, name: str, d: str) -> int:
        """Attach classifier ``name`` first on hook ``d`` (priority 1, else the
        first free one); returns the priority. It returns "no verdict", so
        every classifier after it runs as before, while a foreign one before
        it that returns TC_ACT_OK would end the chain and hide packets from
        IQN (warned). Other classifiers (IQN's other one, the lab's iqn_jitter)
        keep their priorities: nothing is replaced."""
        foreign = [f for f in self._tc_filters(d) if f.name != name]  # iqn_jitter too
        last = ""
        for prio in range(1, TC_PRIO_TRIES + 1):
            if any(f.prio == prio for f in foreign):
                continue
            try:
                tc.attach(self.iface, fd, name, d, prio=prio)  # type: ignore[arg-type]
            except tc.TcError as e:  # a non-BPF filter at this priority: try the next
                last = str(e)
                continue
            before = [f.name for f in foreign if f.prio < prio]
            if before:
                log.warning("%s: TC %s classifier(s) %s run before IQN's %s; one that returns "
                            "TC_ACT_OK hides packets from it", self.iface, d, ", ".join(before), name)
            return prio
        raise DatapathError(last or f"no free TC priority on {self.iface} {d} for IQN's {name}")

    def _tc_filters(self, d: str) -> list[tc.TcFilter]:
        try:
            return tc.filters(self.iface, d)  # type: ignore[arg-type]
        except tc.TcError as e:
            raise DatapathError(str(e)) from None

    def _attach_xdp(self) -> str:
        """The XDP program (:meth:`_attach_xdp_prog`), then the pairing classifier."""
        self.mode, self.hook = self._attach_xdp_prog(), "xdp"
        try:
            self._attach_egress()
        except DatapathError:
            self.detach()
            raise
        return self.mode

    def _attach_xdp_prog(self, move: bool = False) -> str:
        """Attach iqn_xdp, or with ``move`` the move entry (native, then skb with
        ``xdp_mode`` auto); returns the mode. Refuses a foreign XDP program
        (:class:`ForeignXdpError`) unless ``force``."""
        fn = self._fn
        if move:
            assert self._move is not None
            fn = self._BPF.Function(self._bpf, MOVE_FN.encode(), self._move[0])
        for mode, pid, name in _attached(self.iface):
            if pid in self._ours():
                continue
            if name != PROG_NAME and not self.force:
                raise ForeignXdpError(
                    f"{self.iface} already carries another XDP program {name!r} (id {pid}); "
                    f"remove it (ip link set dev {self.iface} {_IP_MODE.get(mode, 'xdp')} off) "
                    "or attach with --force to replace it"
                )
            if name == PROG_NAME:
                log.warning("replacing a stale IQN XDP program (id %d) on %s", pid, self.iface)
            else:
                log.warning("force: replacing XDP program %r (id %d) on %s", name, pid, self.iface)
            _detach_mode(self.iface, mode)
        tries = {"native": ["native"], "skb": ["skb"], "auto": ["native", "skb"]}[self.xdp_mode]
        last = ""
        for want in tries:
            flags = _ATTACH_FLAGS[want]
            with _quiet_stderr():
                try:
                    self._BPF.attach_xdp(self.iface.encode(), fn, flags)
                except Exception as e:  # bcc: "Failed to attach BPF to device b'x': <strerror>"
                    last = str(e).rsplit(": ", 1)[-1]
                    if want == "native" and self.xdp_mode == "auto":
                        log.warning(
                            "%s: native XDP is not available (%s); using generic (skb) mode, "
                            "which costs more per packet", self.iface, last,
                        )
                    continue
            self._xdp_id = self._move[1] if move and self._move else self._prog_id
            return want
        raise DatapathError(f"cannot attach XDP to {self.iface} in {self.xdp_mode} mode: {last}")

    def poll_bursts(self, timeout_ms: int, sweep: bool = True) -> BurstBatch:
        """Burst records since the last poll: the ring's, then (``sweep``) the
        short bursts still open in the kernel's table whose gap has passed
        (:mod:`iqn_ctl.live.bursttable`), each candidate once. Returns after
        ``timeout_ms`` at the latest, earlier once ``wakeup_events`` records
        wait. Times are CLOCK_MONOTONIC ns as the kernel stamped them. Numpy
        passes per batch, no Python work per record beyond the key's bytes."""
        if self._closed:
            return empty_batch(BURST_MAX)
        self._ring.wait(timeout_ms)
        read_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        recs = self._ring.read()
        drained = self._ring.pending() == 0
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if sweep else None
        return self._taker.take(recs, now, drained, read_ns)

    def poll_batch(self, timeout_ms: int) -> Batch:
        """:meth:`poll_bursts` as one row per candidate, sorted by time: (raw
        key bytes, CLOCK_MONOTONIC ns)."""
        return self.poll_bursts(timeout_ms).times_ns()

    def poll_monotonic(self, timeout_ms: int) -> list[tuple[bytes, float]]:
        """:meth:`poll_batch` as (raw key bytes, CLOCK_MONOTONIC seconds) tuples.

        The agent infers on this clock: the wall clock may be stepped (NTP, an
        operator), and a step inside a stall would move arrivals against each
        other and against the engine's watermark; the monotonic clock never
        jumps. Wall time is for output only."""
        keys, ts = self.poll_batch(timeout_ms)
        if not keys:
            return []
        return list(zip(keys, (ts / 1e9).tolist(), strict=True))

    def poll(self, timeout_ms: int) -> list[tuple[bytes, float]]:
        """:meth:`poll_monotonic` with wall-clock epoch seconds (one offset per
        poll): for tools that print times; the agent uses the monotonic form."""
        out = self.poll_monotonic(timeout_ms)
        if not out:
            return out
        offset = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
        return [(k, t + offset) for k, t in out]

    def _check_open(self) -> None:
        if self._closed:
            raise DatapathError(f"the data plane on {self.iface} is closed")

    def counters(self) -> dict[str, int]:
        """Global counters summed over CPUs; ``lost`` counts the candidates in
        burst records the kernel found no room for in the ring (counted where
        it happens), ``bursts`` the records written."""
        self._check_open()
        table = self._counters
        out = {name: int(sum(table.getvalue(table.Key(i)))) for i, name in enumerate(COUNTERS)}
        # The kernel also counts lost the candidates of a record that found no room
        # when the agent had already taken them from the table (a short burst swept
        # before its slot was written out): they reached the engine. Read after the
        # kernel's count (bursttable.BurstTaker.unsettled_written says why).
        unsettled = self._taker.unsettled_written()
        out["lost"] -= self._taker.overcounted + unsettled
        return out

    def flow_counters(self, raws: Iterable[bytes]) -> dict[bytes, Counters | None]:
        """Each given flow's volume counters, None when its slot is not its
        own (never claimed by one of its candidates, or claimed by another
        flow's since): the bulk rule must tell "unknown" from "zero". One
        vectorised read of the mapped array, no system call."""
        self._check_open()
        raws = list(raws)
        if not raws:
            return {}
        slot, tag = slot_tag(flow_hashes(raws), self.vol_slots)
        rows = self._vol[slot]
        out: dict[bytes, Counters | None] = {}
        want = tag.tolist()
        for i, (raw, r) in enumerate(zip(raws, rows.tolist(), strict=True)):
            packets, cands, nbytes, got_tag, claims = r
            out[raw] = Counters(packets, cands, nbytes, claims) if got_tag == want[i] else None
        return out

    def flow_stats(self, raws: Iterable[bytes] = ()) -> list[tuple[bytes, dict[str, int]]]:
        """:meth:`flow_counters` of the given flows as dicts, for the flow view
        (flows whose counters are unknown are left out)."""
        return [(raw, {"packets": c.packets, "candidates": c.candidates, "bytes": c.bytes})
                for raw, c in self.flow_counters(raws).items() if c is not None]

    def client_volume(
        self, clients: Iterable[str], claim: bool = True
    ) -> dict[str, tuple[int, int, str] | None]:
        """Each client's (bytes of UDP from the signalling port since its slot
        became its own, the slot's claim count, the server of its last
        non-candidate datagram or ""); None when the slot is not its own. With ``claim`` such a
        slot is claimed for the client (one map update: the kernel counts the
        client from then on), so a known client is counted even before its
        next candidate. For the watched-time sampler (:mod:`iqn_ctl.live.sessions`)."""
        self._check_open()
        names = list(clients)
        if not names:
            return {}
        raws = [client_key(c) for c in names]
        slot, tag = slot_tag(client_hashes(raws), self.vol_slots)
        rows = self._cvol[slot]
        out: dict[str, tuple[int, int, str] | None] = {}
        for i, (c, raw) in enumerate(zip(names, raws, strict=True)):
            r = rows[i]
            if int(r["tag"]) != int(tag[i]):
                out[c] = None
                if claim:
                    table = self._bpf[b"vol_client"]
                    leaf = table.Leaf()
                    leaf.tag = int(tag[i])
                    table[table.Key(int(slot[i]))] = leaf
                continue
            srv = bytes(r["server"])
            out[c] = (int(r["bytes"]), int(r["claims"]), server_name(srv, raw[36]) if any(srv) else "")
        return out

    def detach(self) -> None:
        """Remove our programs from the interface (only ours); idempotent. On TC
        in the middle of a move, the move entry at XDP goes too."""
        if self.mode is None:
            return
        if self.hook == "tc":
            self._remove_egress()
            try:
                tc.detach(self.iface, (self.direction,), names=(TC_PROG_NAME,))  # type: ignore[arg-type]
            except tc.TcError as e:
                raise DatapathError(str(e)) from None
            if self._move is not None:
                self._detach_ours()
            self.mode = self.hook = None
            return
        self._detach_ours()
        self._remove_egress()
        self.mode = self.hook = None

    def _detach_ours(self) -> None:
        """Remove whichever of our XDP entries is attached; close the move entry."""
        try:
            progs = _attached(self.iface)
        except DatapathError:  # interface gone: nothing left to detach
            progs = []
        for mode, pid, _name in progs:
            if pid in self._ours():
                _detach_mode(self.iface, mode)
        self._drop_move_entry()

    def _handover(self, state: int) -> None:
        self._handover_map[ctypes.c_uint32(0)] = ctypes.c_uint32(state)

    def handover_state(self) -> int:
        """The kernel's handover flag (HANDOVER_*), for tests and the move's log."""
        return int(self._handover_map[ctypes.c_uint32(0)].value)

    @property
    def may_move_to_xdp(self) -> bool:
        """On TC only because a foreign XDP program held the interface (``--hook
        auto``, ingress): the watchdog moves back once the XDP hook is free.
        Never with ``--hook tc`` or on egress, where TC is what was asked for."""
        return self.beside_foreign and self.hook == "tc" and self.hook_wanted == "auto" \
            and self.direction == "ingress"

    def begin_move_to_xdp(self) -> str:
        """First half of :meth:`move_to_xdp`: arm the kernel's handover and
        attach the move entry (iqn_xdp plus the handover step, iqn_xdp.c) beside
        the TC classifier still in place; returns the XDP mode. From the first
        frame it sees, iqn_tc skips every frame, so the overlap counts nothing
        twice. On failure (a foreign XDP program is back, XDP cannot attach, the
        entry cannot load) the agent stays on TC."""
        if self._closed:
            raise DatapathError("data plane already closed")
        self._load_move_entry()
        self._handover(HANDOVER_ARMED)
        try:
            return self._attach_xdp_prog(move=True)
        except DatapathError:
            self._handover(HANDOVER_OFF)
            self._drop_move_entry()
            raise

    def finish_move_to_xdp(self, mode: str) -> None:
        """Second half: remove the TC classifier (it skips every frame by now),
        keep the pairing classifier (the same egress hook either way), then swap
        the move entry for iqn_xdp, which reads no handover flag (the per-frame
        cost of the steady state, bench_xdp.py). The flag is set to "XDP has
        run" first: from the attach on, every frame passed the move entry, so
        that is true, and an iqn_tc left behind (its removal failed) or still
        finishing a frame skips it even when no frame came during the move."""
        try:
            tc.detach(self.iface, (self.direction,), names=(TC_PROG_NAME,))  # type: ignore[arg-type]
        except tc.TcError as e:  # it stays, idle (handover): `iqn-ctl detach` removes it
            log.warning("%s: moved to XDP but cannot remove IQN's TC classifier: %s", self.iface, e)
        if self._move is not None and self._xdp_id == self._move[1]:
            self._handover(HANDOVER_XDP)
            try:
                replace_xdp(self.iface, self.prog_fd, self._move[0], mode)
            except DatapathError as e:  # the move entry stays, counting as iqn_xdp would
                log.warning("%s: moved to XDP but %s; the move entry stays attached", self.iface, e)
            else:
                self._xdp_id = self._prog_id
                self._drop_move_entry()
        # last: the agent's status (another thread) reads the hook, and the watchdog
        # counts the move once this returns
        self.hook, self.mode, self.tc_prio, self.beside_foreign = "xdp", mode, None, False

    def _load_move_entry(self) -> None:
        """Load the move entry from the compiled module under the name iqn_xdp
        (bpf_testrun.load_prog), sharing every map with iqn_xdp."""
        if self._move is not None:
            return
        from bcc.libbcc import lib

        lic = lib.bpf_module_license(self._bpf.module) or b"GPL"
        try:
            fd = bpf_testrun.load_prog(bpf_testrun.BPF_PROG_TYPE_XDP, self._bpf.dump_func(MOVE_FN.encode()),
                                       PROG_NAME, lic)
        except OSError as e:
            raise DatapathError(f"cannot load the XDP move entry ({MOVE_FN}): {e}") from None
        self._move = (fd, bpf_testrun.prog_id_by_fd(fd))

    def _drop_move_entry(self) -> None:
        """Close the move entry once nothing of ours has it attached (the
        kernel frees it when no interface holds it either)."""
        if self._move is None:
            return
        if self._xdp_id == self._move[1]:
            self._xdp_id = self._prog_id
        os.close(self._move[0])
        self._move = None

    def move_to_xdp(self) -> str:
        """Move from TC (beside a foreign XDP program that is gone now) back to
        XDP without losing or double-counting frames: XDP first, then the TC
        classifier goes. The maps and ring stay. Returns the XDP mode."""
        mode = self.begin_move_to_xdp()
        self.finish_move_to_xdp(mode)
        return mode

    def reattach(self) -> str:
        """Attach the loaded program again, after the attach watchdog
        (:mod:`iqn_ctl.live.watchdog`) found it gone: removed, replaced by a
        foreign XDP program, or its interface deleted and created again.
        Whatever is left of ours goes first (never a foreign program); then
        :meth:`attach` decides as at start: ``force`` replaces a foreign XDP
        program, ``auto`` puts the TC classifier beside it, ``xdp`` refuses.
        The maps and the ring stay, so the reader and the flow counters carry on."""
        if self._closed:
            raise DatapathError("data plane already closed")
        with contextlib.suppress(DatapathError, tc.TcError):
            self.detach()
        self.mode = self.hook = None
        self.tc_prio = self.pair_prio = None
        return self.attach()

    def close(self) -> None:
        """Detach and release the program, maps and the ring buffer."""
        if self._closed:
            return
        try:
            self.detach()
        finally:
            self._closed = True
            self._drop_move_entry()
            self._ring.close()
            del self._vol, self._cvol, self._taker
            for m in self._maps:
                with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it later
                    m.close()
            self._bpf.cleanup()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
