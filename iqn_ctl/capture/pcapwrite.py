"""Write pcap and pcapng captures, for tests and benchmarks.

The reader (:mod:`iqn_ctl.capture.pcap`) must handle every variant a router or a
laptop may hand us - either byte order, micro- or nanosecond pcap, pcapng with
several interfaces and odd timestamp resolutions, snaplen-cut frames - so the
writer can produce each of them on purpose, from frames built by
:mod:`iqn_ctl.capture.frames` and times from :mod:`iqn_ctl.engine.synth`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from iqn_ctl.capture.frames import udp_frame
from iqn_ctl.capture.pcap import LINKTYPE_ETHERNET
from iqn_ctl.engine.flowkey import flow_label
from iqn_ctl.engine.params import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, DEFAULT_PORT
from iqn_ctl.engine.synth import SignalModel, signal_times

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D


@dataclass(frozen=True, slots=True)
class Packet:
    """One frame as captured. ``orig_len`` defaults to the frame's length; a
    larger value records a frame the capture cut short (snaplen)."""

    time: float
    frame: bytes
    iface: int = 0
    orig_len: int | None = None


@dataclass(frozen=True, slots=True)
class Interface:
    """A pcapng interface: ``tsresol`` is the option byte (6 = microseconds,
    9 = nanoseconds, 0x80|k = 2^-k seconds); ``None`` omits the option (default 10^-6)."""

    linktype: int = LINKTYPE_ETHERNET
    snaplen: int = 0
    tsresol: int | None = 9
    tsoffset: int = 0


PacketLike = Packet | tuple[float, bytes]


def _packet(p: PacketLike) -> Packet:
    return p if isinstance(p, Packet) else Packet(p[0], p[1])


def _split(t: float, per_sec: int) -> tuple[int, int]:
    """Seconds and fraction ticks, exact enough for nanoseconds at epoch 1.7e9."""
    sec = math.floor(t)
    frac = round((t - sec) * per_sec)
    if frac >= per_sec:
        sec, frac = sec + 1, frac - per_sec
    return sec, frac


def write_pcap(
    path: str | Path,
    packets: Iterable[PacketLike],
    *,
    nanos: bool = False,
    big_endian: bool = False,
    snaplen: int = 262144,
    linktype: int = LINKTYPE_ETHERNET,
) -> int:
    """Classic pcap; frames longer than ``snaplen`` are cut (orig_len kept). Returns packets written."""
    e = ">" if big_endian else "<"
    per_sec = 1_000_000_000 if nanos else 1_000_000
    rec = struct.Struct(e + "IIII")
    count = 0
    with open(path, "wb") as f:
        f.write(struct.pack(e + "IHHiIII", PCAP_MAGIC_NS if nanos else PCAP_MAGIC_US, 2, 4, 0, 0,
                            snaplen, linktype))
        chunk: list[bytes] = []
        for p in map(_packet, packets):
            sec, frac = _split(p.time, per_sec)
            data = p.frame[:snaplen]
            orig = max(p.orig_len or 0, len(p.frame))
            chunk.append(rec.pack(sec, frac, len(data), orig))
            chunk.append(data)
            count += 1
            if len(chunk) >= 65536:
                f.write(b"".join(chunk))
                chunk.clear()
        f.write(b"".join(chunk))
    return count


def block(btype: int, body: bytes, big_endian: bool = False) -> bytes:
    """One pcapng block: type, total length, body padded to 4 bytes, total length."""
    e = ">" if big_endian else "<"
    body += b"\0" * (-len(body) % 4)
    total = len(body) + 12
    return struct.pack(e + "II", btype, total) + body + struct.pack(e + "I", total)


def section_header(big_endian: bool = False) -> bytes:
    e = ">" if big_endian else "<"
    return block(0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1), big_endian)


def interface_block(iface: Interface, big_endian: bool = False) -> bytes:
    e = ">" if big_endian else "<"
    opts = b""
    if iface.tsresol is not None:
        opts += struct.pack(e + "HH", 9, 1) + bytes([iface.tsresol]) + b"\0\0\0"
    if iface.tsoffset:
        opts += struct.pack(e + "HHq", 14, 8, iface.tsoffset)
    if opts:
        opts += struct.pack(e + "HH", 0, 0)
    return block(1, struct.pack(e + "HHI", iface.linktype, 0, iface.snaplen) + opts, big_endian)


def _ticks_per_sec(tsresol: int | None) -> int:
    if tsresol is None:
        return 1_000_000
    return 2 ** (tsresol & 0x7F) if tsresol & 0x80 else 10 ** (tsresol & 0x7F)


def write_pcapng(
    path: str | Path,
    packets: Iterable[PacketLike],
    *,
    big_endian: bool = False,
    interfaces: Sequence[Interface] = (Interface(),),
    simple: bool = False,
    extra: bytes = b"",
) -> int:
    """pcapng: one section, the given interfaces, then one enhanced packet block
    per packet (or simple packet blocks when ``simple``: no timestamp, interface 0).
    ``extra`` (raw blocks, e.g. from :func:`block`) goes after the interfaces."""
    with open(path, "wb") as f:
        return _write_section(f, packets, big_endian, interfaces, simple, extra)


def _write_section(
    f: BinaryIO,
    packets: Iterable[PacketLike],
    big_endian: bool,
    interfaces: Sequence[Interface],
    simple: bool,
    extra: bytes,
) -> int:
    e = ">" if big_endian else "<"
    f.write(section_header(big_endian))
    for iface in interfaces:
        f.write(interface_block(iface, big_endian))
    f.write(extra)
    count = 0
    chunk: list[bytes] = []
    for p in map(_packet, packets):
        iface = interfaces[p.iface]
        snap = iface.snaplen or len(p.frame)
        data = p.frame[:snap]
        orig = max(p.orig_len or 0, len(p.frame))
        if simple:
            chunk.append(block(3, struct.pack(e + "I", orig) + data, big_endian))
        else:
            per_sec = _ticks_per_sec(iface.tsresol)
            sec, frac = _split(p.time - iface.tsoffset, per_sec)
            ticks = sec * per_sec + frac
            head = struct.pack(e + "IIIII", p.iface, ticks >> 32, ticks & 0xFFFFFFFF, len(data), orig)
            chunk.append(block(6, head + data, big_endian))
        count += 1
        if len(chunk) >= 65536:
            f.write(b"".join(chunk))
            chunk.clear()
    f.write(b"".join(chunk))
    return count


def pcapng_section_bytes(
    packets: Iterable[PacketLike],
    *,
    big_endian: bool = False,
    interfaces: Sequence[Interface] = (Interface(),),
    simple: bool = False,
    extra: bytes = b"",
) -> bytes:
    """One whole section as bytes, to concatenate sections of different byte order."""
    import io

    buf = io.BytesIO()
    _write_section(buf, packets, big_endian, interfaces, simple, extra)
    return buf.getvalue()


# synthetic router traffic -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignalFlow:
    """A flow that carries an IQN signal: the server answers each toggle."""

    server: str
    client: str
    cport: int
    stalls: list[tuple[float, float]]
    sport: int = DEFAULT_PORT
    vlans: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return flow_label(self.server, self.sport, self.client, self.cport)


def router_traffic(
    flows: Sequence[SignalFlow],
    noise: int,
    t0: float,
    t1: float,
    rng: np.random.Generator,
    model: SignalModel | None = None,
    bulk_share: float = 0.5,
) -> list[Packet]:
    """What a router between OTT servers and clients sees: the signal flows'
    candidate bursts (from :func:`iqn_ctl.engine.synth.signal_times`, frame lengths
    drawn from the 1,180-1,288 band), plus ``noise`` packets in [t0, t1]: bulk
    video from port 443 in full 1,292- and 1,514-byte frames (just outside the
    band), and small, IPv6, VLAN-tagged, other-port, in-band-but-wrong-port and
    fragmented frames that must not count. Sorted by time."""
    mdl = model or SignalModel()
    out: list[Packet] = []
    for fl in flows:
        ts = signal_times(fl.stalls, mdl, rng)
        sizes = rng.integers(DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE + 1, ts.size)
        cache: dict[int, bytes] = {}
        for t, sz in zip(ts.tolist(), sizes.tolist(), strict=True):
            fr = cache.get(sz)
            if fr is None:
                fr = cache[sz] = udp_frame(fl.server, fl.client, fl.sport, fl.cport, sz, vlans=fl.vlans)
            out.append(Packet(t, fr))
    templates = [
        udp_frame("198.18.0.20", "198.18.1.3", 443, 50010, 1292),  # bulk, one byte over the band
        udp_frame("198.18.0.20", "198.18.1.3", 443, 50010, 1514),
        udp_frame("198.18.1.3", "198.18.0.20", 50010, 443, 74),  # client acks
        udp_frame("2001:db8::20", "2001:db8:1::3", 443, 50011, 1400),
        udp_frame("198.18.0.30", "198.18.1.4", 8443, 50012, 1200, vlans=(10,)),  # in band, other port
        udp_frame("198.18.0.31", "198.18.1.5", 53, 40000, 120, vlans=(10, 20)),
        udp_frame("198.18.0.32", "198.18.1.6", 443, 50013, 1200, more_fragments=True),  # fragment
        b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x06" + bytes(46),  # ARP: not IP
    ]
    weights = np.array([bulk_share, 0.25, 0.15, 0.05, 0.02, 0.02, 0.005, 0.005])
    weights /= weights.sum()
    kinds = rng.choice(len(templates), noise, p=weights)
    times = np.sort(rng.uniform(t0, t1, noise))
    out.extend(Packet(t, templates[k]) for t, k in zip(times.tolist(), kinds.tolist(), strict=True))
    out.sort(key=lambda p: p.time)
    return out
