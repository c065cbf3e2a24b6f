"""The kernel program's structs, described once for user space.

``iqn_xdp.c`` defines ``struct flow_key``, ``struct flow_stats`` and
``struct cand_event``; these ctypes twins are what user space decodes with
(no hand-written offsets). When the program loads, :func:`check` compares
them field by field with the types bcc derives from the C source of the
``flows`` map, so a change on one side that the other misses fails at attach
with a clear message instead of decoding garbage.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket

import numpy as np

from iqn_ctl.engine.flowkey import FlowKey


class FlowKeyC(ctypes.Structure):
    """struct flow_key: addresses and ports in network order; an IPv4 address
    fills the first 4 bytes of its 16."""

    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),  # server (source of candidates)
        ("daddr", ctypes.c_uint8 * 16),  # client
        ("sport", ctypes.c_uint16),  # __be16
        ("dport", ctypes.c_uint16),  # __be16
        ("family", ctypes.c_uint8),  # 4 or 6
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class FlowStatsC(ctypes.Structure):
    """struct flow_stats: the kernel's per-flow counters."""

    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("candidates", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("last_seen_ns", ctypes.c_uint64),
    ]


class CandEventC(ctypes.Structure):
    """struct cand_event: one candidate record on the ring buffer, key first."""

    _fields_ = [
        ("key", FlowKeyC),
        ("ts_ns", ctypes.c_uint64),  # CLOCK_MONOTONIC
        ("len", ctypes.c_uint32),  # Ethernet frame length
        ("pad", ctypes.c_uint32),
    ]


KEY_SIZE = ctypes.sizeof(FlowKeyC)
EVENT_TS_OFFSET = CandEventC.ts_ns.offset  # type: ignore[attr-defined]
EVENT_LEN_OFFSET = CandEventC.len.offset  # type: ignore[attr-defined]
EVENT_SIZE = ctypes.sizeof(CandEventC)
#: numpy twin of struct cand_event, for reading the ring buffer in batches
EVENT_DTYPE = np.dtype({"names": ["key", "ts_ns", "len"],
                        "formats": [f"V{KEY_SIZE}", "<u8", "<u4"],
                        "offsets": [0, EVENT_TS_OFFSET, EVENT_LEN_OFFSET], "itemsize": EVENT_SIZE})
#: enum iqn_counter order; "unpaired"/"capped": candidates the forgery guard kept back,
#: "client_packets": client-to-server datagrams its egress program saw
COUNTERS = ("packets", "candidates", "parse_errors", "lost", "unpaired", "capped", "client_packets")


def _shape(cls: type[ctypes.Structure]) -> list[tuple[str, int, int]]:
    return [(name, getattr(cls, name).offset, getattr(cls, name).size) for name, *_ in cls._fields_]


def check(bcc_type: type[ctypes.Structure], ours: type[ctypes.Structure]) -> str | None:
    """Why bcc's type (derived from the C) and ours differ, or None."""
    theirs, mine = _shape(bcc_type), _shape(ours)
    if theirs == mine and ctypes.sizeof(bcc_type) == ctypes.sizeof(ours):
        return None
    return (
        f"struct layout of {ours.__name__} differs from the kernel program's: "
        f"C {theirs} ({ctypes.sizeof(bcc_type)} bytes), Python {mine} ({ctypes.sizeof(ours)} bytes)"
    )


def decode_key(raw: bytes) -> FlowKey:
    """Decode struct flow_key bytes (map key or event prefix)."""
    if len(raw) < KEY_SIZE:
        raise ValueError(f"flow key must be {KEY_SIZE} bytes, got {len(raw)}")
    k = FlowKeyC.from_buffer_copy(raw[:KEY_SIZE])
    sport, dport = socket.ntohs(k.sport), socket.ntohs(k.dport)
    if k.family == 6:
        server = str(ipaddress.IPv6Address(bytes(k.saddr)))
        client = str(ipaddress.IPv6Address(bytes(k.daddr)))
    else:
        server = str(ipaddress.IPv4Address(bytes(k.saddr)[:4]))
        client = str(ipaddress.IPv4Address(bytes(k.daddr)[:4]))
    return FlowKey(server=server, sport=sport, client=client, dport=dport, family=k.family)
