"""Frame-length capture on a lab interface (AF_PACKET, no tcpdump needed).

What the ISP agent would see on the router, for tests and experiments while
the XDP data plane is not attached: Ethernet frame length (the paper's size
measure), protocol and addresses of every IPv4 packet on the link. Which of
them are candidates is decided by :func:`candidates`, i.e. by the one
classifier the replay uses (:mod:`iqn_ctl.capture.classify`).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from iqn_ctl.capture.classify import HDR, classify_frames
from iqn_ctl.engine.params import CandidateFilter

from . import netns

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
UDP = 17
ICMP = 1


@dataclass(frozen=True)
class Frame:
    t: float
    length: int  # Ethernet frame bytes, headers included
    proto: int  # IP protocol number (17 = UDP, 1 = ICMP)
    src: str
    sport: int
    dst: str
    dport: int
    outgoing: bool
    #: the frame's first bytes, for the candidate classifier
    head: bytes = field(default=b"", compare=False, repr=False)


def parse(buf: bytes, t: float, outgoing: bool) -> Frame | None:
    """IPv4 frames only (the lab has no IPv6); ports are 0 unless UDP."""
    if len(buf) < 34 or buf[12:14] != b"\x08\x00":
        return None
    ihl = (buf[14] & 0x0F) * 4
    proto = buf[23]
    src = socket.inet_ntoa(buf[26:30])
    dst = socket.inet_ntoa(buf[30:34])
    sport = dport = 0
    if proto == UDP:
        if len(buf) < 14 + ihl + 8:
            return None
        sport, dport = struct.unpack("!HH", buf[14 + ihl : 14 + ihl + 4])
    return Frame(t, len(buf), proto, src, sport, dst, dport, outgoing, buf[:HDR])


def candidates(frames: Sequence[Frame], filt: CandidateFilter) -> list[Frame]:
    """The frames the ISP agent takes as candidates, in time order: incoming
    ones only (XDP sees a link's ingress), classified like the data plane."""
    inc = [f for f in frames if not f.outgoing]
    c = classify_frames([f.head for f in inc], [f.t for f in inc], filt, [f.length for f in inc])
    return [inc[int(i)] for i in c.frame_index]


class Capture:
    """Collect IPv4 frames on ``iface`` in namespace ``ns`` from start() to stop()."""

    def __init__(self, ns: str, iface: str) -> None:
        self.frames: list[Frame] = []
        self._sock = netns.ns_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.bind((iface, 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"capture-{iface}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                buf, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            f = parse(buf, time.time(), addr[2] == PACKET_OUTGOING)
            if f is not None:
                self.frames.append(f)

    def __enter__(self) -> Capture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
