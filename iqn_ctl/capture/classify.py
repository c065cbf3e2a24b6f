"""The candidate classifier: which Ethernet frames are IQN candidates, and of
which flow. The Python twin of the XDP program (``iqn_ctl/live/bpf/iqn_xdp.c``),
used by pcap replay and by the lab's capture, and checked against the kernel
program through BPF_PROG_TEST_RUN (tests/test_classify.py).

Captures of other link types (``tcpdump -i any`` writes Linux cooked headers, a
tun or WireGuard device raw IP, BSD loopback a 4-byte family) are classified by
the same code once the link header is stepped over (:data:`LINK_TYPES`). The
size band is defined on the Ethernet frame, so for them the size compared is the
IP packet's length plus 14, computed in one place (:func:`_band_size`). So are
PPPoE session frames (ethertype 0x8864, PPP protocol 0x0021 IPv4 or 0x0057
IPv6, after the VLAN tags if any): their IP packet's length is the one the
PPPoE header gives, less the 2-byte PPP protocol (a frame shorter than that is
undecodable).

Ethernet, up to two VLAN tags (0x8100, 0x88a8), IPv4 (options via IHL;
fragments are never candidates, since a fragment's frame length is not the
response size) or IPv6 (fixed header, next header UDP), UDP. A candidate has
UDP source port ``filt.port`` and an *original* frame length (what was on the
wire, not what a snaplen kept) in ``[filt.min_size, filt.max_size]``. Headers
must lie within the kept bytes; a frame cut short of its headers, or not IP,
is *undecodable*.

Nothing is per packet in Python: the headers of all frames are numpy
operations on one byte matrix, and only candidate *flows* (a handful) become
Python strings.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from iqn_ctl.engine.flowkey import FlowKey
from iqn_ctl.engine.params import CandidateFilter

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
HDR = 104  # header bytes the classifier may read: >= 28 (SLL2, 2 tags) + 8 (PPPoE) + 60 (IPv4) + 8 (UDP)
#: the Ethernet header the size band counts: the band is on Ethernet frame lengths
ETH_HLEN = 14

LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
#: raw IP: 101 is the pcap number; 12 and 14 are DLT_RAW as some systems write it
#: (14 on OpenBSD); 228 and 229 are raw IPv4 and raw IPv6 only
LINKTYPES_RAW = (101, 12, 14, 228, 229)
#: a 4-byte address family before the IP packet: host byte order (NULL), network (LOOP)
LINKTYPES_NULL = (0, 108)
#: link type -> (where its ethertype lies, where the network layer starts); None
#: where the IP version (raw) or the address family (NULL/LOOP) says which IP it is
LINK_TYPES: dict[int, tuple[int, int] | tuple[None, int]] = {
    LINKTYPE_ETHERNET: (12, 14),
    LINKTYPE_LINUX_SLL: (14, 16),
    LINKTYPE_LINUX_SLL2: (0, 20),
    **{lt: (None, 0) for lt in LINKTYPES_RAW},
    **{lt: (None, 4) for lt in LINKTYPES_NULL},
}
ETH_P_PPP_SES = 0x8864
#: PPP protocol -> the ethertype of the same packet on Ethernet
PPP_PROTOCOLS = {0x0021: 0x0800, 0x0057: 0x86DD}
#: address families that mean IPv6 in a NULL/LOOP header (Linux, NetBSD/OpenBSD, FreeBSD, macOS)
_AF_INET6 = (10, 24, 28, 30)


@dataclass(slots=True)
class Candidates:
    """Candidate arrivals of a capture, in time order.

    ``flow_ids[i]`` indexes ``labels``: (flow label, client address) per flow.
    """

    flow_ids: I64
    times: F64
    labels: list[tuple[str, str]]
    #: packet records in the capture
    packets: int = 0
    #: candidate packets (== len(times))
    candidates: int = 0
    #: frames that are not IP (over a supported link), or cut short of their headers by the snaplen
    undecodable: int = 0
    #: pcapng simple-packet-block candidates with no earlier timestamp to inherit (dropped)
    untimed: int = 0
    #: link types seen (pcapng may mix interfaces)
    linktypes: list[int] = field(default_factory=list)
    #: which input frame each candidate is (index into the frames classified)
    frame_index: I64 = field(default_factory=lambda: np.empty(0, np.int64))
    #: each candidate's length as the size band measures it (the frame bytes the kernel counts)
    sizes: I64 = field(default_factory=lambda: np.empty(0, np.int64))
    #: each flow's 5-tuple, parallel to ``labels``
    keys: list[FlowKey] = field(default_factory=list)



def classify_frames(
    frames: Sequence[bytes], times: Sequence[float], filt: CandidateFilter,
    origlens: Sequence[int] | None = None, linktype: int = LINKTYPE_ETHERNET,
) -> Candidates:  # fmt: skip
    """Classify whole frames (a live capture, a test's list): the convenience
    form of :func:`classify`. ``origlens`` defaults to each frame's length;
    ``linktype`` says what the frames start with (raw IP: a layer-3 device's)."""
    n = len(frames)
    hdr = np.zeros((n, HDR), np.uint8)
    for i, f in enumerate(frames):
        head = f[:HDR]
        hdr[i, : len(head)] = np.frombuffer(head, np.uint8)
    caplen = np.fromiter((len(f) for f in frames), np.int64, n)
    org = caplen if origlens is None else np.asarray(origlens, np.int64)
    return classify(hdr, caplen, org, np.asarray(times, np.float64), filt, linktype=linktype)


def classify(
    hdr: npt.NDArray[np.uint8],
    caplen: I64,
    origlen: I64,
    times: F64,
    filt: CandidateFilter,
    rowidx: I64 | None = None,
    col0: I64 | int = 0,
    linktype: I64 | int = LINKTYPE_ETHERNET,
) -> Candidates:
    """Parse every frame's headers at once and keep the candidates.

    Frame ``i``'s first bytes are row ``rowidx[i]`` (``i`` when None) of the
    byte matrix ``hdr``, starting at column ``col0`` (per frame or one for
    all), at least :data:`HDR` bytes of it; ``caplen`` is how many bytes of the
    frame were kept (bytes past it are junk and never read), ``origlen`` its
    length on the wire, ``times`` its arrival (NaN: unknown, dropped and
    counted as ``untimed``). ``linktype`` (per frame or one for all, a key of
    :data:`LINK_TYPES`) says which link header precedes the IP packet."""
    total = int(caplen.size)
    if total == 0:
        return Candidates(np.empty(0, np.int64), np.empty(0), [])
    cap = caplen
    flat = hdr.ravel()
    rowbase = (np.arange(total, dtype=np.int64) if rowidx is None else rowidx) * hdr.shape[1] + col0

    def b8(rows: I64, col: I64) -> I64:
        return flat[rowbase[rows] + col].astype(np.int64)

    def be16(rows: I64, col: I64) -> I64:
        i = rowbase[rows] + col
        return (flat[i].astype(np.int64) << 8) | flat[i + 1]

    lt = np.broadcast_to(np.asarray(linktype, np.int64), (total,))
    valid, et, l3, inner = _link(flat, rowbase, cap, lt, be16)
    valid &= (inner < 0) | (l3 + inner <= origlen)  # a PPPoE frame shorter than its header says
    avail = cap - l3

    # IPv4: IHL for options; any fragment (MF set or offset > 0) is not a candidate.
    i4 = np.flatnonzero(valid & (et == 0x0800))
    c3, a4 = l3[i4], avail[i4]
    vi = b8(i4, c3)
    ihl = (vi & 15) * 4
    ok4 = (a4 >= 20) & ((vi >> 4) == 4) & (ihl >= 20)
    udp4 = ok4 & (b8(i4, c3 + 9) == 17) & ((be16(i4, c3 + 6) & 0x3FFF) == 0)
    bad4 = ~ok4 | (udp4 & (a4 < ihl + 8))
    udp4 &= ~bad4
    c4 = udp4 & (be16(i4, c3 + np.minimum(ihl, 60)) == filt.port)

    # IPv6: fixed header only; the next header must be UDP.
    i6 = np.flatnonzero(valid & (et == 0x86DD))
    c6l3, a6 = l3[i6], avail[i6]
    ok6 = (a6 >= 40) & ((b8(i6, c6l3) >> 4) == 6)
    udp6 = ok6 & (b8(i6, c6l3 + 6) == 17)
    bad6 = ~ok6 | (udp6 & (a6 < 48))
    udp6 &= ~bad6
    c6 = udp6 & (be16(i6, c6l3 + 40) == filt.port)

    undecodable = total - i4.size - i6.size + int(bad4.sum()) + int(bad6.sum())
    lo, hi = filt.min_size, filt.max_size
    org = origlen
    size = _band_size(org, lt, l3, inner)
    c4 &= (size[i4] >= lo) & (size[i4] <= hi)
    c6 &= (size[i6] >= lo) & (size[i6] <= hi)
    k4, k6 = i4[c4], i6[c6]

    # Flow keys as rows [family, src(16), dst(16), sport(2), dport(2)] -> unique flows.
    keys = np.zeros((k4.size + k6.size, 37), np.uint8)
    r4 = keys[: k4.size]
    s4 = (rowbase[k4] + c3[c4])[:, None]
    r4[:, 0] = 4
    r4[:, 1:5] = flat[s4 + np.arange(12, 16)]
    r4[:, 17:21] = flat[s4 + np.arange(16, 20)]
    r4[:, 33:37] = flat[s4 + ihl[c4][:, None] + np.arange(4)]
    r6 = keys[k4.size :]
    s6 = (rowbase[k6] + c6l3[c6])[:, None]
    r6[:, 0] = 6
    r6[:, 1:33] = flat[s6 + np.arange(8, 40)]
    r6[:, 33:37] = flat[s6 + np.arange(40, 44)]

    times = np.concatenate([times[k4], times[k6]])
    timed = ~np.isnan(times)
    untimed = int(times.size - timed.sum())
    index = np.concatenate([k4, k6])[timed]
    sizes = np.concatenate([size[i4][c4], size[i6][c6]])[timed]
    keys, times = keys[timed], times[timed]
    order = np.argsort(times, kind="stable")
    keys, times, index, sizes = keys[order], times[order], index[order], sizes[order]
    if times.size:
        void = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).ravel()
        uniq, first, inverse = np.unique(void, return_index=True, return_inverse=True)
        # number flows by first appearance, so labels read in capture order
        rank = np.empty(uniq.size, np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(uniq.size)
        flow_ids = rank[inverse.ravel()]
        labels: list[tuple[str, str]] = [("", "")] * uniq.size
        fkeys: list[FlowKey] = [FlowKey("", 0, "", 0, 4)] * uniq.size
        for u in range(uniq.size):
            fk = _flowkey(keys[int(first[u])])
            fkeys[int(rank[u])] = fk
            labels[int(rank[u])] = (fk.label, fk.client)
    else:
        flow_ids, labels, fkeys = np.empty(0, np.int64), [], []
    return Candidates(
        frame_index=index.astype(np.int64),
        flow_ids=flow_ids.astype(np.int64),
        times=times,
        labels=labels,
        keys=fkeys,
        sizes=np.asarray(sizes, np.int64),
        packets=total,
        candidates=int(times.size),
        undecodable=int(undecodable),
        untimed=untimed,
    )


def _band_size(origlen: I64, lt: npt.NDArray[np.int64], l3: I64, inner: I64) -> I64:
    """The length the size band is compared with: the Ethernet frame's on the
    wire, or for any other link the IP packet's (what was on the wire past the
    link header) plus :data:`ETH_HLEN`, as if it had crossed an Ethernet. A
    PPPoE session frame's IP packet is as long as its PPPoE header says
    (``inner``, -1 where there is none), plus :data:`ETH_HLEN` too: as the
    kernel's iqn_band_len, whichever device or capture the session is seen on."""
    plain = np.where(lt == LINKTYPE_ETHERNET, origlen, origlen - l3 + ETH_HLEN)
    return np.where(inner >= 0, inner + ETH_HLEN, plain)


def _link(
    flat: npt.NDArray[np.uint8], rowbase: I64, cap: I64, lt: npt.NDArray[np.int64],
    be16: Callable[[I64, I64], I64],
) -> tuple[npt.NDArray[np.bool_], I64, I64, I64]:  # fmt: skip
    """Step over each frame's link header: whether it is intact, the ethertype
    of what follows (0 when unknown), the column where the IP packet starts
    and, for a PPPoE session frame, the IP packet's length its header gives
    (else -1).

    Ethernet and Linux cooked headers carry an ethertype, maybe VLAN tags and
    then a PPPoE session header after it; raw IP says its version in its first
    nibble; NULL/LOOP carry an address family in either byte order (the
    writer's host order for NULL)."""
    total = lt.size
    every = np.arange(total, dtype=np.int64)
    et = np.zeros(total, np.int64)
    l3 = np.zeros(total, np.int64)
    valid = np.zeros(total, np.bool_)
    uniform = int(lt[0]) if total and bool((lt == lt[0]).all()) else None
    for code, (et_at, start) in LINK_TYPES.items():
        if uniform is not None:  # the usual case: one link type for the whole capture
            rows = every if code == uniform else every[:0]
        else:
            rows = every[lt == code]
        if not rows.size:
            continue
        l3[rows] = start
        valid[rows] = cap[rows] >= start + (1 if et_at is None else 0)
        if et_at is not None:
            et[rows] = be16(rows, np.full(rows.size, et_at, np.int64))
        elif code in LINKTYPES_RAW:
            ver = flat[rowbase[rows]].astype(np.int64) >> 4
            et[rows] = np.select([ver == 4, ver == 6], [0x0800, 0x86DD], 0)
        else:
            hi, lo_ = be16(rows, np.zeros(rows.size, np.int64)), be16(rows, np.full(rows.size, 2))
            # the family fits 16 bits: whichever half is non-zero holds it
            af = np.where(hi == 0, lo_, ((hi & 0xFF) << 8) | (hi >> 8))
            et[rows] = np.select([af == 2, np.isin(af, _AF_INET6)], [0x0800, 0x86DD], 0)
    # up to two VLAN tags (0x8100, 0x88a8) after an ethertype
    for _ in range(2):
        tag = valid & ((et == 0x8100) | (et == 0x88A8))
        if not tag.any():
            break
        ti = np.flatnonzero(tag)
        valid[ti] = cap[ti] >= l3[ti] + 4
        et[ti] = be16(ti, l3[ti] + 2)
        l3[ti] += 4
    inner = np.full(total, -1, np.int64)
    # PPPoE session: version/type 0x11, code 0, session, length, PPP protocol
    si = np.flatnonzero(valid & (et == ETH_P_PPP_SES))
    if si.size:
        valid[si] = cap[si] >= l3[si] + 8
        ok = valid[si]
        at = l3[si]
        head = (be16(si, at) == 0x1100) & (be16(si, at + 4) >= 2) & ok
        ppp = be16(si, at + 6)
        known = np.select([ppp == k for k in PPP_PROTOCOLS], list(PPP_PROTOCOLS.values()), 0)
        et[si] = np.where(head, known, 0)
        inner[si] = np.where(head, be16(si, at + 4) - 2, -1)
        l3[si] += 8
    return valid, et, l3, inner


def _flowkey(row: npt.NDArray[np.uint8]) -> FlowKey:
    """The 5-tuple of a key row (server to client)."""
    raw = row.tobytes()
    sport, dport = struct.unpack("!HH", raw[33:37])
    if raw[0] == 4:
        src, dst = str(ipaddress.IPv4Address(raw[1:5])), str(ipaddress.IPv4Address(raw[17:21]))
    else:
        src, dst = str(ipaddress.IPv6Address(raw[1:17])), str(ipaddress.IPv6Address(raw[17:33]))
    return FlowKey(src, sport, dst, dport, int(raw[0]))
