"""Act on a stall: give a stalling viewer's traffic priority at the router's egress (``--mitigate``).

The agent knows within milliseconds which viewer is stalling. With
``--mitigate EGRESS`` it becomes the shaper of EGRESS (the router's link
toward the viewers, where the queue builds under congestion) and, while a
viewer's stall is open, puts every packet to that viewer into a priority class
with a guaranteed rate, so its player refills sooner. Bulk traffic keeps the
rest: while the rest wants the link, the boosted clients together get no more
than ``--boost-share`` of it.

The kernel side, all of it on EGRESS and all of it IQN's own:

* an HTB root qdisc with handle :data:`MAJOR` (``4951:``) shaping at
  ``--link-rate``: class ``:1`` the link; ``:10`` the boost aggregate, rate
  share x link; ``:20`` everything else (the default class), rate (1 - share)
  x link; ``:100``... one leaf per boost slot under ``:10``, guaranteed
  ``--boost-rate``. Every class may borrow up to the whole link, so the
  **share cap** is what the boost can take *from the others*: while the rest
  wants the link, HTB gives it its (1 - share) x link whatever the number of
  boosts, and the boosted clients together get share x link ahead of it; a
  boosted client may use more only what the rest leaves idle (a boost never
  makes a viewer slower than no boost on an idle link);
* ``iqn_boost`` (bpf/iqn_boost.c), a clsact egress classifier that sets
  ``skb->priority`` to a boosted client's slot class from a map.

Decisions come from :class:`~iqn_ctl.engine.boost.BoostPlanner` (sans-I/O);
this module applies them (one map write per boost start or end: nothing here
runs per packet in Python). What it added is written to a state file in the
run dir first, so ``iqn-ctl detach`` after a SIGKILL, or the next agent on the
interface, finds and removes exactly that: the qdisc with IQN's handle and
the ``iqn_boost`` filter on the named interface, nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iqn_ctl.engine.boost import (
    DEFAULT_BOOST_GAP,
    DEFAULT_BOOST_MAX,
    DEFAULT_BOOST_RATE,
    DEFAULT_BOOST_SHARE,
    Action,
    BoostOff,
    BoostOn,
    BoostPlanner,
    policy_problem,
    slots_for,
)
from iqn_ctl.errors import IqnError
from iqn_ctl.live import tc
from iqn_ctl.live.bpfsrc import BPF_DIR, parser_cflags
from iqn_ctl.live.devtype import DeviceTypeError, device_type

log = logging.getLogger("iqn.mitigate")

#: the HTB handle's major number ("IQ"): what detach recognises as IQN's qdisc
MAJOR = 0x4951
HANDLE = f"{MAJOR:x}:"
#: minor numbers of the link, the boost aggregate, the default class and the first slot
LINK, AGGREGATE, DEFAULT, FIRST_SLOT = 0x1, 0x10, 0x20, 0x100
PROG_NAME = "iqn_boost"
SRC = BPF_DIR / "iqn_boost.c"
#: one MTU: HTB's quantum for every class (no r2q warnings, equal turns within a priority)
QUANTUM = 1514

_UNITS = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)?\s*$", re.IGNORECASE)


class MitigateError(IqnError):
    """A one-line reason the boost cannot be set up or removed."""


def parse_rate(text: str, flag: str) -> int:
    """Bit/s from ``2mbit``, ``300kbit``, ``64000``; ``flag`` names the option in the error."""
    m = _RATE.match(text)
    if not m:
        raise MitigateError(f"{flag}: bad rate {text!r}: use e.g. 2mbit, 300kbit or 64000 (bit/s)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "bit").lower()])


def link_speed(iface: str) -> int | None:
    """The interface's speed from sysfs in bit/s, None when it reports none."""
    try:
        mbit = int(Path(f"/sys/class/net/{iface}/speed").read_text().strip())
    except (OSError, ValueError):
        return None
    return mbit * 1_000_000 if mbit > 0 else None


@dataclass(frozen=True, slots=True)
class MitigateConfig:
    """``--mitigate EGRESS`` and its knobs (docs/contracts.md)."""

    egress: str
    #: --link-rate: the egress link's rate (None: the interface's reported speed)
    link_bps: int | None = None
    rate_bps: int = DEFAULT_BOOST_RATE
    share: float = DEFAULT_BOOST_SHARE
    max_s: float = DEFAULT_BOOST_MAX
    gap: float = DEFAULT_BOOST_GAP

    def problem(self) -> str | None:
        """Why these knobs cannot work (a line naming the flag), or None (the link
        rate is checked once the interface is known: :meth:`link`)."""
        return policy_problem(self.max_s, self.gap, self.share, self.rate_bps,
                              self.link_bps if self.link_bps is not None else 8000)

    def link(self) -> int:
        bps = self.link_bps if self.link_bps is not None else link_speed(self.egress)
        if bps is None:
            raise MitigateError(f"{self.egress} reports no link speed: give --link-rate")
        return bps

    @property
    def slots(self) -> int:
        return slots_for(self.link(), self.share, self.rate_bps)


# -- what is ours on the egress interface -----------------------------------------------------


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(["tc", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise MitigateError("the `tc` command (iproute2) is missing: "
                            "run `sudo bash scripts/setup.sh`") from None
    if check and r.returncode:
        raise MitigateError(f"tc {' '.join(args)}: {r.stderr.strip() or 'failed'}")
    return r


def root_qdisc(iface: str) -> tuple[str, str] | None:
    """(kind, handle) of ``iface``'s root qdisc, None when the interface is gone."""
    r = _tc("-j", "qdisc", "show", "dev", iface, "root", check=False)
    if r.returncode:
        return None
    rows = json.loads(r.stdout or "[]")
    return (str(rows[0]["kind"]), str(rows[0]["handle"])) if rows else ("noqueue", "0:")


def state_path(run_dir: Path, iface: str) -> Path:
    """Where an agent on ``iface`` notes the egress interface it shapes."""
    return run_dir / f"{iface}.boost"


def remove(egress: str) -> list[str]:
    """Remove IQN's boost from ``egress``: the ``iqn_boost`` classifier and the
    root qdisc if (and only if) it carries IQN's handle. Returns what was removed."""
    done: list[str] = []
    try:
        socket.if_nametoindex(egress)
    except OSError:
        return done  # the interface is gone, and all on it
    with contextlib.suppress(tc.TcError):
        if tc.detach(egress, ("egress",), names=(PROG_NAME,)):
            done.append(f"the boost classifier on {egress}")
    q = root_qdisc(egress)
    if q is not None and q[1] == HANDLE:
        _tc("qdisc", "del", "dev", egress, "root", "handle", HANDLE, check=False)
        done.append(f"the boost qdisc on {egress}")
    return done


def cleanup(run_dir: Path, iface: str) -> list[str]:
    """After an agent on ``iface`` is gone (stopped, or killed with SIGKILL):
    remove what its state file says it added, then the file."""
    path = state_path(run_dir, iface)
    try:
        st = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        st = {}
    done = remove(str(st["egress"])) if isinstance(st.get("egress"), str) else []
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return done


# -- the running boost -----------------------------------------------------------------------


class _Key(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint8 * 16), ("family", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class _Val(ctypes.Structure):
    _fields_ = [("classid", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("bytes", ctypes.c_uint64),
                ("packets", ctypes.c_uint64)]


def _key(client: str) -> _Key:
    fam = socket.AF_INET6 if ":" in client else socket.AF_INET
    raw = socket.inet_pton(fam, client)
    k = _Key()
    ctypes.memmove(k.addr, raw, len(raw))
    k.family = 6 if fam == socket.AF_INET6 else 4
    return k


def _rate(bps: int) -> str:
    return f"{bps}bit"


class Booster:
    """One agent's boost on one egress interface: set up, apply the planner's
    actions, count, and remove everything again."""

    def __init__(self, cfg: MitigateConfig, run_dir: Path, iface: str,
                 shown: Callable[[str], str] | None = None) -> None:
        """``shown``: how log lines name a client (the agent's --redact hash); as is by default."""
        problem = cfg.problem()
        if problem:
            raise MitigateError(problem)
        self.cfg = cfg
        self.iface = iface
        self.link_bps = cfg.link()
        self.slots = cfg.slots
        self.planner = BoostPlanner(self.slots, cfg.max_s, cfg.gap)
        self._state = state_path(run_dir, iface)
        self._bpf: Any = None
        self._map: Any = None
        self.bytes_done = 0
        self.packets_done = 0
        self._installed = False
        self._shown = shown or (lambda c: c)

    # -- set-up and removal --

    def start(self) -> None:
        """Install the qdisc, classes and classifier; on failure remove what was added."""
        eg = self.cfg.egress
        try:
            socket.if_nametoindex(eg)
        except OSError:
            raise MitigateError(f"--mitigate: no such interface: {eg}") from None
        if eg == self.iface:
            raise MitigateError("--mitigate must name the egress toward the viewers, not the "
                                "interface the agent listens on")
        q = root_qdisc(eg)
        if q is not None and q[1] == HANDLE:
            raise MitigateError(f"{eg} already carries IQN's boost qdisc (another agent's, or one "
                                f"left by a crash: 'iqn-ctl detach' of that agent's interface removes it)")
        if q is not None and q[1] != "0:":
            raise MitigateError(f"{eg} already has a root qdisc ({q[0]} {q[1]}) that IQN did not add; "
                                "the boost needs the root to shape the link: remove it first")
        # noted before anything is added: a crash at any point leaves a file that finds it
        self._state.write_text(json.dumps({"egress": eg, "pid": os.getpid(), "handle": HANDLE}))
        self._installed = True
        try:
            self._qdisc()
            self._classifier()
        except BaseException:
            self.close()
            raise
        log.info("%s: mitigation on %s: link %s, boost share %g (%s), %d slot(s) of %s, "
                 "at most %g s per episode (gap %g s)", self.iface, eg, _rate(self.link_bps),
                 self.cfg.share, _rate(self._aggregate()), self.slots, _rate(self._slot_rate()),
                 self.cfg.max_s, self.cfg.gap)

    def _aggregate(self) -> int:
        return max(8000, int(self.cfg.share * self.link_bps))

    def _slot_rate(self) -> int:
        return min(self.cfg.rate_bps, self._aggregate())

    def _qdisc(self) -> None:
        eg, L, S = self.cfg.egress, self.link_bps, self._aggregate()
        q = ("quantum", str(QUANTUM))
        _tc("qdisc", "add", "dev", eg, "root", "handle", HANDLE, "htb", "default", f"{DEFAULT:x}")
        _tc("class", "add", "dev", eg, "parent", HANDLE, "classid", f"{HANDLE}{LINK:x}", "htb",
            "rate", _rate(L), "ceil", _rate(L), *q)
        _tc("class", "add", "dev", eg, "parent", f"{HANDLE}{LINK:x}", "classid", f"{HANDLE}{AGGREGATE:x}",
            "htb", "rate", _rate(S), "ceil", _rate(L), "prio", "0", *q)
        _tc("class", "add", "dev", eg, "parent", f"{HANDLE}{LINK:x}", "classid", f"{HANDLE}{DEFAULT:x}",
            "htb", "rate", _rate(max(8000, L - S)), "ceil", _rate(L), "prio", "1", *q)
        for i in range(self.slots):
            _tc("class", "add", "dev", eg, "parent", f"{HANDLE}{AGGREGATE:x}",
                "classid", f"{HANDLE}{FIRST_SLOT + i:x}", "htb", "rate", _rate(self._slot_rate()),
                "ceil", _rate(L), "prio", "0", *q)

    def _classifier(self) -> None:
        try:
            from bcc import BPF
        except ImportError:
            raise MitigateError("bcc is missing (Debian's python3-bpfcc): "
                                "run `sudo bash scripts/setup.sh`") from None
        eg = self.cfg.egress
        try:
            l3 = device_type(eg).l3
        except DeviceTypeError as e:
            raise MitigateError(f"{eg}: {e}") from None
        cflags = [f"-DIQN_BOOST_MAJOR={MAJOR:#x}", f"-DIQN_BOOST_SLOTS={self.slots}",
                  *parser_cflags(l3), "-w"]
        try:
            self._bpf = BPF(src_file=str(SRC).encode(), cflags=cflags)
            fn = self._bpf.load_func(PROG_NAME.encode(), BPF.SCHED_CLS)
        except Exception as e:  # bcc raises bare Exception
            raise MitigateError(f"compiling {SRC.name} failed: {e}") from None
        self._map = self._bpf[b"boosts"]
        try:
            tc.attach(eg, int(fn.fd), PROG_NAME, "egress", prio=1)
        except tc.TcError as e:
            raise MitigateError(str(e)) from None

    def close(self, t: float | None = None) -> None:
        """End every boost and remove everything added; idempotent."""
        if self._map is not None:
            self.apply(self.planner.close(time.monotonic() if t is None else t))
        if self._installed:
            for what in remove(self.cfg.egress):
                log.info("%s: removed %s", self.iface, what)
            with contextlib.suppress(FileNotFoundError):
                self._state.unlink()
            self._installed = False
        if self._bpf is not None:
            with contextlib.suppress(Exception):
                self._bpf.cleanup()
            self._bpf = self._map = None

    # -- the agent's calls --

    def stall_started(self, flow: object, client: str, t: float) -> None:
        self.apply(self.planner.stall_started(flow, client, t))

    def stall_ended(self, flow: object, t: float) -> None:
        self.apply(self.planner.stall_ended(flow, t))

    def tick(self, t: float) -> None:
        due = self.planner.next_deadline()
        if due is not None and due <= t:
            self.apply(self.planner.advance(t))

    def apply(self, actions: list[Action]) -> None:
        """Write the planner's decisions into the classifier's map."""
        if self._map is None:
            return
        for a in actions:
            try:
                k = _key(a.client)
            except OSError:
                continue  # not an address (cannot happen for a flow's client): nothing to boost
            if isinstance(a, BoostOn):
                self._map[k] = _Val(classid=(MAJOR << 16) | (FIRST_SLOT + a.slot))
                log.info("%s: boost on client=%s slot=%d", self.iface, self._shown(a.client), a.slot)
            elif isinstance(a, BoostOff):
                v = self._map.get(k)
                if v is not None:
                    self.bytes_done += int(v.bytes)
                    self.packets_done += int(v.packets)
                with contextlib.suppress(KeyError):
                    del self._map[k]
                log.info("%s: boost off client=%s (%s) after %s bytes", self.iface, self._shown(a.client),
                         a.reason, int(v.bytes) if v is not None else 0)

    # -- what it shows --

    def stats(self, t: float) -> dict[str, Any]:
        """``status``' ``boost`` object and the metrics' source (docs/contracts.md)."""
        live = 0
        if self._map is not None:
            with contextlib.suppress(Exception):
                live = sum(int(v.bytes) for v in self._map.values())
        p = self.planner
        return {
            "egress": self.cfg.egress, "link_bps": self.link_bps, "share": self.cfg.share,
            "rate_bps": self._slot_rate(), "max_s": self.cfg.max_s, "gap": self.cfg.gap,
            "slots": self.slots, "active": p.active, "total": p.started,
            "seconds": round(p.boosted_s(t), 3), "bytes": self.bytes_done + live,
            "timeouts": p.timeouts, "denied_full": p.denied_full, "denied_rate": p.denied_rate,
            "clients": sorted(p.boosted()),
        }
