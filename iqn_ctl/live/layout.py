"""The kernel program's structs, described once for user space.

``iqn_xdp.c`` defines ``struct flow_key``, ``struct vol`` and ``struct
burst``; these ctypes twins are what user space decodes with (no
hand-written offsets). When the program loads, :func:`check` compares them
field by field with the types bcc derives from the C source of the
``bursts`` and ``vol_flow`` maps, so a change on one side that the other
misses fails at attach with a clear message instead of decoding garbage.

The kernel places a flow (and a client) in its arrays by a hash of the
flow key; :func:`flow_hash` and :func:`client_hash` are its twins, so user
space finds a flow's counters from its raw key.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from iqn_ctl.engine.flowkey import FlowKey
from iqn_ctl.engine.params import BURST_MAX


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


class VolC(ctypes.Structure):
    """struct vol: a flow's volume in its slot of vol_flow (``tag``: whose it is)."""

    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("candidates", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("tag", ctypes.c_uint32),
        ("claims", ctypes.c_uint32),
    ]


class ClientVolC(ctypes.Structure):
    """struct client_vol: a client's volume in its slot of vol_client, and the
    source address of its last non-candidate datagram (family as the key's)."""

    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("candidates", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("tag", ctypes.c_uint32),
        ("claims", ctypes.c_uint32),
        ("server", ctypes.c_uint8 * 16),
    ]


class BurstC(ctypes.Structure):
    """struct burst: an open burst in the table, and the ring record it becomes."""

    _fields_ = [
        ("key", FlowKeyC),
        ("first_ns", ctypes.c_uint64),  # CLOCK_MONOTONIC
        ("last_ns", ctypes.c_uint64),
        ("count", ctypes.c_uint32),  # 0: no open burst in the slot
        ("slot", ctypes.c_uint32),
        ("gen", ctypes.c_uint32),  # bursts of this slot so far
        ("lock", ctypes.c_uint32),  # odd while the kernel writes the slot
        ("off", ctypes.c_uint32 * BURST_MAX),  # candidate i at first_ns + off[i]
    ]


KEY_SIZE = ctypes.sizeof(FlowKeyC)
BURST_SIZE = ctypes.sizeof(BurstC)


def _dtype(cls: type[ctypes.Structure], key_as_bytes: bool = False) -> np.dtype:
    names: list[str] = []
    formats: list[Any] = []
    offsets: list[int] = []
    for name, ctype, *_ in cls._fields_:
        f = getattr(cls, name)
        names.append(name)
        offsets.append(f.offset)
        if name == "key" and key_as_bytes:
            formats.append(f"V{KEY_SIZE}")
        elif issubclass(ctype, ctypes.Array):
            formats.append((np.dtype(ctype._type_), ctype._length_))  # type: ignore[attr-defined,call-overload]
        else:
            formats.append(np.dtype(ctype))
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": ctypes.sizeof(cls)})


#: numpy twins, for reading the ring buffer and the mapped arrays in batches
BURST_DTYPE = _dtype(BurstC, key_as_bytes=True)
VOL_DTYPE = _dtype(VolC)
CLIENT_VOL_DTYPE = _dtype(ClientVolC)
#: enum iqn_counter order; "unpaired"/"capped": candidates the forgery guard kept back,
#: "client_packets": client-to-server datagrams its egress program saw, "bursts": records written
COUNTERS = ("packets", "candidates", "parse_errors", "lost", "unpaired", "capped", "client_packets", "bursts")


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


#: struct flow_key's leading fields as ``struct`` reads them (checked against FlowKeyC
#: below): one ``unpack_from`` instead of a ctypes copy, ~1.4 µs less per new flow, which
#: an outage pays 50,000 times within one p. The ports in network order (``!``: no
#: ntohs calls) and the addresses' first 4 bytes (IPv4, the usual case); an IPv6 key
#: reads its whole addresses again with ``_ADDR16``
_KEY_STRUCT = struct.Struct("!4s12x4s12xHHB")
_ADDR16 = struct.Struct("16s16s")
assert [FlowKeyC.saddr.offset, FlowKeyC.daddr.offset, FlowKeyC.sport.offset, FlowKeyC.dport.offset,
        FlowKeyC.family.offset] == [0, 16, 32, 34, 36], "struct flow_key moved: update _KEY_STRUCT"


def decode_key(raw: bytes) -> FlowKey:
    """Decode struct flow_key bytes (map key or event prefix)."""
    if len(raw) < KEY_SIZE:
        raise ValueError(f"flow key must be {KEY_SIZE} bytes, got {len(raw)}")
    saddr, daddr, sport, dport, family = _KEY_STRUCT.unpack_from(raw)
    if family == 6:
        saddr, daddr = _ADDR16.unpack_from(raw)
        server, client = str(ipaddress.IPv6Address(saddr)), str(ipaddress.IPv6Address(daddr))
        return FlowKey(server, sport, client, dport, family)
    # inet_ntoa: the same dotted quad as ipaddress, in a tenth of the time (once per new flow)
    return FlowKey(socket.inet_ntoa(saddr), sport, socket.inet_ntoa(daddr), dport, family)


_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_CLIENT_SALT = np.uint64(0x5851F42D4C957F2D)


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    x = x ^ (x >> np.uint64(29))
    x = x * _MIX
    return x ^ (x >> np.uint64(32))  # type: ignore[no-any-return]


def _words(raws: Sequence[bytes]) -> npt.NDArray[np.uint64]:
    if any(len(r) < KEY_SIZE for r in raws):
        raise ValueError(f"flow keys must be {KEY_SIZE} bytes")
    buf = b"".join(r[:KEY_SIZE] for r in raws)
    return np.frombuffer(buf, "<u8").reshape(len(raws), KEY_SIZE // 8)


def flow_hashes(raws: Sequence[bytes]) -> npt.NDArray[np.uint64]:
    """iqn_xdp.c's flow_hash of raw struct flow_key bytes, vectorised: the low
    bits pick the flow's slot (vol_flow, bursts), the high 32 bits ``| 1`` are its tag."""
    w = _words(raws)
    with np.errstate(over="ignore"):
        return _mix(((w[:, 0] ^ w[:, 1]) * _GOLDEN) ^ w[:, 2] ^ w[:, 3] ^ w[:, 4])


def client_hashes(raws: Sequence[bytes]) -> npt.NDArray[np.uint64]:
    """iqn_xdp.c's client_hash: only the key's client address counts."""
    w = _words(raws)
    with np.errstate(over="ignore"):
        return _mix(w[:, 2] ^ w[:, 3] ^ _CLIENT_SALT)


def volume_picks(seq: npt.NDArray[np.uint64], k: int) -> npt.NDArray[np.bool_]:
    """iqn_xdp.c's volume sampling: which of the CPU's packet numbers ``seq`` a
    non-candidate is counted at (1 in ``k``, by a hash of the number, not a stride)."""
    with np.errstate(over="ignore"):
        return (_mix(seq.astype(np.uint64)) >> np.uint64(40)) & np.uint64(k - 1) == 0  # type: ignore[no-any-return]


def slot_tag(h: npt.NDArray[np.uint64], slots: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint32]]:
    """(slot index, tag) of hashes in a table of ``slots`` entries, as the kernel takes them."""
    return ((h & np.uint64(slots - 1)).astype(np.int64),
            ((h >> np.uint64(32)).astype(np.uint32) | np.uint32(1)))


def client_key(addr: str) -> bytes:
    """A raw struct flow_key with only the client address set: enough for
    :func:`client_hashes` (the watched-time sampler knows clients by address)."""
    ip = ipaddress.ip_address(addr)
    packed = ip.packed.ljust(16, b"\0")
    return bytes(16) + packed + bytes(4) + bytes([ip.version, socket.IPPROTO_UDP, 0, 0])


def server_name(raw16: bytes, family: int) -> str:
    """The server address a client_vol slot holds, as text."""
    if family == 6:
        return str(ipaddress.IPv6Address(bytes(raw16)))
    return str(ipaddress.IPv4Address(bytes(raw16)[:4]))
