"""Build Ethernet frames (optional VLAN tags, an optional PPPoE session
header, IPv4 with options or IPv6, UDP) of an exact on-the-wire length, for
tests, benchmarks and capture writers.

Frame length here is what the paper and the data plane call size: the Ethernet
frame without FCS, i.e. what a pcap's ``orig_len`` and XDP's
``data_end - data`` report.
"""

from __future__ import annotations

import ipaddress
import struct

ETH_HLEN = 14
VLAN_HLEN = 4
UDP_HLEN = 8
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_PPP_SES = 0x8864
#: PPPoE session header (6 bytes) + the PPP protocol field (2)
PPPOE_HLEN = 8
PPP_IP = 0x0021
PPP_IPV6 = 0x0057


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def header_len(src: str, vlans: int = 0, ip_options: bytes = b"", pppoe: bool = False) -> int:
    """Bytes of headers before the UDP payload."""
    ip = ipaddress.ip_address(src)
    l3 = 40 if ip.version == 6 else 20 + len(ip_options)
    return ETH_HLEN + VLAN_HLEN * vlans + (PPPOE_HLEN if pppoe else 0) + l3 + UDP_HLEN


def pppoe_session(l3: bytes, session: int) -> bytes:
    """A PPPoE session header and PPP protocol for the IP packet ``l3`` (RFC 2516:
    version/type 0x11, code 0, payload length = protocol field + packet)."""
    proto = PPP_IPV6 if l3[0] >> 4 == 6 else PPP_IP
    return struct.pack("!BBHHH", 0x11, 0, session & 0xFFFF, len(l3) + 2, proto) + l3


def udp_frame(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    frame_len: int | None = None,
    payload: bytes | None = None,
    vlans: tuple[int, ...] = (),
    ip_options: bytes = b"",
    src_mac: bytes = b"\x02\x00\x00\x00\x00\x01",
    dst_mac: bytes = b"\x02\x00\x00\x00\x00\x02",
    frag_offset: int = 0,
    more_fragments: bool = False,
    pppoe: int | None = None,
) -> bytes:
    """One frame; give either ``frame_len`` (payload is zero-filled to fit) or ``payload``.
    ``pppoe``: a session id, to carry the IP packet in a PPPoE session frame
    (ethertype 0x8864, behind the VLAN tags if any)."""
    if len(ip_options) % 4:
        raise ValueError("IPv4 options must be a multiple of 4 bytes")
    hl = header_len(src, len(vlans), ip_options, pppoe is not None)
    if payload is None:
        if frame_len is None or frame_len < hl:
            raise ValueError(f"frame_len must be at least {hl} for these headers")
        payload = bytes(frame_len - hl)
    s_ip, d_ip = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s_ip.version != d_ip.version:
        raise ValueError("source and destination address families differ")
    udp_len = UDP_HLEN + len(payload)
    if s_ip.version == 4:
        pseudo = s_ip.packed + d_ip.packed + struct.pack("!BBH", 0, 17, udp_len)
    else:
        pseudo = s_ip.packed + d_ip.packed + struct.pack("!IxxxB", udp_len, 17)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    csum = _csum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    if s_ip.version == 4:
        ihl = 5 + len(ip_options) // 4
        flags = (0x2000 if more_fragments else 0) | (frag_offset // 8)
        hdr = struct.pack(
            "!BBHHHBBH4s4s", (4 << 4) | ihl, 0, ihl * 4 + udp_len, 0, flags, 64, 17, 0,
            s_ip.packed, d_ip.packed,
        ) + ip_options
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        l3, ethertype = hdr + udp, ETH_P_IP
    else:
        hdr = struct.pack("!IHBB16s16s", 6 << 28, udp_len, 17, 64, s_ip.packed, d_ip.packed)
        l3, ethertype = hdr + udp, ETH_P_IPV6
    tags = b""
    for i, vid in enumerate(vlans):
        tpid = ETH_P_8021AD if (i == 0 and len(vlans) > 1) else ETH_P_8021Q
        tags += struct.pack("!HH", tpid, vid & 0x0FFF)
    if pppoe is not None:
        l3, ethertype = pppoe_session(l3, pppoe), ETH_P_PPP_SES
    # dst, src, then (TPID, TCI) per tag, outermost first, then the L3 ethertype
    return dst_mac + src_mac + tags + struct.pack("!H", ethertype) + l3
