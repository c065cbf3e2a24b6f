"""The attach watchdog: is our classifier still where the agent put it?

Why: the agent reads what its program writes to the ring; if another tool
replaces the XDP program (``ip link set dev X xdp obj ...``, bpftool, a
firewall's loader), removes it or deletes the clsact qdisc, or the interface
itself goes away (PPPoE redial, a bond rebuilt, a veth re-created), the agent
keeps running and its counters flat-line: nothing says why. So every
``--watchdog`` seconds the supervisor asks the kernel, per interface, and
acts on the answer:

==========  ===========================================  ================================
state       what the kernel shows                        what the watchdog does
==========  ===========================================  ================================
attached    our program (by id) on the hook, and the     nothing
            pairing classifier if pairing is on
replaced    another XDP program where ours was           ``--force``: replace it again;
                                                         ``--hook auto``: TC beside it;
                                                         ``--hook xdp``: wait, retry
removed     nothing of ours (or only part of it)         attach again
gone        no interface of that name                    wait; attach again when an
                                                         interface of that name is back
==========  ===========================================  ================================

With ``--hook auto``, an agent that went to TC because a foreign XDP program
held the interface moves back to XDP once the watchdog finds the XDP hook
empty (:meth:`Datapath.move_to_xdp`: XDP first, then the TC classifier goes;
the kernel's handover flag keeps the overlap from counting a frame twice).
One info line, ``moves_to_xdp`` in ``status``, ``iqn_moves_to_xdp_total``;
``--hook tc`` never moves.

Re-attaching reuses the loaded program (:meth:`Datapath.reattach`): its maps
and ring stay, so the event loop never notices. An interface that comes back
as another device type (Ethernet vs layer 3) needs the program compiled for
it: that is logged as an error and the state stays ``gone`` until the agent
is restarted. Every change of state is one log line and shows in ``status``
(``attach_state``, ``attach_note``, ``reattaches``) and in the metric
``iqn_attach_state{iface, state}``.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from iqn_ctl.errors import IqnError

if TYPE_CHECKING:
    from iqn_ctl.live.datapath import Datapath

log = logging.getLogger("iqn.watchdog")

#: default --watchdog period (s): a replaced program is noticed within this
DEFAULT_PERIOD = 1.0

ATTACHED, REPLACED, REMOVED, GONE = "attached", "replaced", "removed", "gone"


def ifindex(iface: str) -> int | None:
    """The interface's index now, None when no interface has that name."""
    try:
        return socket.if_nametoindex(iface)
    except OSError:
        return None


#: rtnetlink numbers (linux/rtnetlink.h, linux/if_link.h)
RTM_NEWLINK, RTM_GETLINK, NLMSG_ERROR, IFLA_XDP = 16, 18, 2, 43
#: IFLA_XDP_PROG_ID and the per-mode DRV/SKB/HW ids
XDP_PROG_ATTRS = (4, 5, 6, 7)


def _attrs(buf: bytes, off: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of the netlink attributes in ``buf[off:end]``."""
    while off + 4 <= end:
        length, kind = struct.unpack_from("=HH", buf, off)
        if length < 4:
            return
        yield kind & 0x3FFF, buf[off + 4:off + length]  # without NLA_F_NESTED / NET_BYTEORDER
        off += (length + 3) & ~3


def xdp_prog_ids(index: int) -> list[int]:
    """Ids of the XDP programs on interface ``index`` (any mode): one RTM_GETLINK
    over a netlink socket. OSError if the kernel refuses (ENODEV: it just went away).

    Why not ``ip -j link`` (:func:`~iqn_ctl.live.datapath.xdp_program_on`): a fork
    of the agent every period holds the interpreter while the kernel copies the
    page tables of a process with a large flow table, and the event loop and API
    wait that long; nor pyroute2, whose set-up costs a millisecond of the
    interpreter per look. This is one datagram each way (~20 us)."""
    req = struct.pack("=IHHII", 32, RTM_GETLINK, 1, 1, 0) + struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0,
                                                                       index, 0, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as nl:  # NETLINK_ROUTE
        nl.settimeout(2.0)
        nl.send(req)
        buf = nl.recv(1 << 16)
    off, ids = 0, set()
    while off + 16 <= len(buf):
        length, kind = struct.unpack_from("=IH", buf, off)
        if length < 16:
            break
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", buf, off + 16)[0]
            if code:
                raise OSError(code, os.strerror(code))
        elif kind == RTM_NEWLINK:  # the answer
            for a, payload in _attrs(buf, off + 32, off + length):
                if a == IFLA_XDP:
                    for x, v in _attrs(payload, 0, len(payload)):
                        if x in XDP_PROG_ATTRS and len(v) >= 4:
                            ids.add(struct.unpack_from("=I", v)[0])
        off += (length + 3) & ~3
    ids.discard(0)
    return sorted(ids)


def prog_name(prog_id: int) -> str:
    from iqn_ctl.live.bpf_testrun import prog_name_by_id

    try:
        return prog_name_by_id(prog_id)
    except OSError:
        return "?"


@dataclass
class Finding:
    """What the kernel shows for one interface: a state and, for people, why."""

    state: str
    note: str = ""


def inspect(dp: Datapath, index: int) -> Finding:
    """Look at the interface ``dp`` was attached to (``index``: its ifindex then)."""
    from iqn_ctl.live import tc
    from iqn_ctl.live.datapath import EGRESS_PROG, TC_PROG_NAME, DatapathError

    iface = dp.iface
    now = ifindex(iface)
    if now is None:
        return Finding(GONE, f"{iface} no longer exists")
    if now != index:
        return Finding(GONE, f"{iface} was deleted and created again (ifindex {index} -> {now})")
    try:
        if dp.hook == "xdp":
            ids = xdp_prog_ids(now)
            if not ids:
                return Finding(REMOVED, f"IQN's XDP program (id {dp.prog_id}) was removed from {iface}")
            if dp.prog_id not in ids:
                return Finding(REPLACED, f"IQN's XDP program (id {dp.prog_id}) on {iface} was replaced by "
                                         f"{prog_name(ids[0])!r} (id {ids[0]})")
        elif dp.hook == "tc":
            if not any(f.name == TC_PROG_NAME for f in tc.filters(iface, dp.direction)):  # type: ignore[arg-type]
                return Finding(REMOVED, f"IQN's TC classifier was removed from {iface} {dp.direction}")
        else:
            return Finding(REMOVED, f"IQN's classifier is not attached to {iface}")
        if dp.egress_fd is not None and not any(
            f.name == EGRESS_PROG for f in tc.filters(iface, dp.pair_direction)  # type: ignore[arg-type]
        ):
            return Finding(REMOVED, f"IQN's pairing classifier was removed from {iface} {dp.pair_direction}")
    except (DatapathError, tc.TcError, OSError) as e:
        if ifindex(iface) is None:  # it went away while we looked
            return Finding(GONE, f"{iface} no longer exists")
        return Finding(REMOVED, f"cannot inspect {iface}: {e}")
    return Finding(ATTACHED)


@dataclass
class Watch:
    """The watchdog's memory of one interface: its state, the ifindex the
    program was attached to, how often it was put back, and the last note."""

    dp: Datapath
    index: int
    state: str = ATTACHED
    note: str = ""
    reattaches: int = 0
    #: moves from TC (beside a foreign XDP program) back to XDP once it was gone
    moves_to_xdp: int = 0
    since: float = field(default_factory=time.time)
    #: the last re-attach failure logged (logged once per different reason, not every period)
    _failed: str = ""
    #: held while the fields a reader sees change together (a re-attach counted and the
    #: state back to attached): status, read from the API's thread, once showed the new
    #: count with the old state (tests/test_multi_iface.py in a fresh CI run)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def view(self) -> dict[str, Any]:
        """State, note, since, re-attaches and moves to XDP, as of one moment."""
        with self._lock:
            return {"attach_state": self.state, "attach_note": self.note, "attach_since": self.since,
                    "reattaches": self.reattaches, "moves_to_xdp": self.moves_to_xdp}

    def check(self) -> str:
        """One look and, if needed, one attempt to recover; returns the state."""
        dp = self.dp
        found = inspect(dp, self.index)
        if found.state == ATTACHED:
            self._set(ATTACHED, "")
            if dp.may_move_to_xdp:
                self._maybe_move()
            return self.state
        if found.state != self.state or found.note != self.note:
            log.warning("%s: %s", dp.iface, found.note)
        self._set(found.state, found.note)
        index = ifindex(dp.iface)
        if index is None:
            return self.state  # wait for the interface to come back
        try:
            self._same_device()
            mode = dp.reattach()
        except IqnError as e:
            reason = str(e)
            if reason != self._failed:
                log.error("%s: cannot attach again: %s (retrying every check)", dp.iface, reason)
                self._failed = reason
            return self.state
        self.index = index
        self._failed = ""
        log.warning("%s: attached again (%s%s) after: %s", dp.iface, dp.describe(),
                    "" if mode != "tc" or dp.hook_wanted == "tc" else ", beside the foreign XDP program",
                    found.note)
        with self._lock:
            self.reattaches += 1
            self._set(ATTACHED, f"attached again ({dp.describe()}) after: {found.note}")
        return self.state

    def _maybe_move(self) -> None:
        """On TC beside a foreign XDP program: back to XDP once the hook is free."""
        dp = self.dp
        try:
            if xdp_prog_ids(self.index):
                return  # still there (or another one): stay beside it
            mode = dp.move_to_xdp()
        except (IqnError, OSError) as e:
            reason = str(e)
            if reason != self._failed:
                log.error("%s: cannot move back to XDP: %s (staying on TC, retrying every check)",
                          dp.iface, reason)
                self._failed = reason
            return
        self._failed = ""
        note = f"moved from TC {dp.direction} to XDP {mode}: the foreign XDP program is gone"
        log.info("%s: %s", dp.iface, note)
        with self._lock:
            self.moves_to_xdp += 1
            self.note = note

    def _same_device(self) -> None:
        """The program was compiled for the interface's first header (Ethernet or IP)."""
        from iqn_ctl.live.devtype import DeviceTypeError, device_type

        try:
            now = device_type(self.dp.iface)
        except DeviceTypeError as e:
            raise WatchError(str(e)) from None
        if now.l3 != self.dp.device.l3:
            raise WatchError(
                f"{self.dp.iface} came back as a {now.name} device ({now.link}), it was "
                f"{self.dp.device.name} ({self.dp.device.link}): restart the agent to compile the "
                "classifier for it")

    def _set(self, state: str, note: str) -> None:
        with self._lock:
            if state != self.state:
                self.since = time.time()
            self.state = state
            if note or state == ATTACHED:
                self.note = note if note else self.note


class WatchError(IqnError):
    """The interface cannot take the program it was compiled for."""
