"""The capture reader: every format variant, the candidate rules, and damaged files.

Captures are generated (iqn_ctl.capture.pcapwrite) so each test knows the truth; dpkt
and tshark, where installed, check that reader and writer agree with
independent implementations rather than only with each other.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import need
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iqn_ctl.capture.frames import udp_frame
from iqn_ctl.capture.pcap import CaptureError, read_candidates
from iqn_ctl.capture.pcapwrite import (
    Interface,
    Packet,
    SignalFlow,
    block,
    interface_block,
    pcapng_section_bytes,
    router_traffic,
    section_header,
    write_pcap,
    write_pcapng,
)
from iqn_ctl.engine.params import CandidateFilter
from iqn_ctl.engine.synth import random_stalls

T0 = 1_700_000_000.0
V4 = ("198.18.0.10", "198.18.1.2")
V6 = ("2001:db8::10", "2001:db8:1::2")


def _frames() -> list[tuple[bytes, str | None]]:
    """Frames of every header shape, and the flow label each should get (None: not a candidate)."""
    return [
        (udp_frame(*V4, 443, 50000, 1200), "198.18.0.10:443>198.18.1.2:50000"),
        (udp_frame(*V6, 443, 50001, 1250), "[2001:db8::10]:443>[2001:db8:1::2]:50001"),
        (udp_frame(*V4, 443, 50002, 1180, vlans=(7,)), "198.18.0.10:443>198.18.1.2:50002"),
        (udp_frame(*V6, 443, 50003, 1288, vlans=(7, 8)), "[2001:db8::10]:443>[2001:db8:1::2]:50003"),
        (udp_frame(*V4, 443, 50004, 1210, ip_options=b"\x01" * 40), "198.18.0.10:443>198.18.1.2:50004"),
        (udp_frame(*V4, 443, 50005, 1292), None),  # bulk, just over the band
        (udp_frame(*V4, 8443, 50006, 1200), None),  # wrong port
        (udp_frame(*V4, 50000, 443, 1200), None),  # client to server
    ]


def _packets(n_rounds: int = 3) -> tuple[list[Packet], dict[str, list[float]]]:
    pk: list[Packet] = []
    truth: dict[str, list[float]] = {}
    t = T0
    for _ in range(n_rounds):
        for fr, label in _frames():
            t += 0.0123456789
            pk.append(Packet(t, fr))
            if label:
                truth.setdefault(label, []).append(t)
    return pk, truth


WRITERS = {
    "pcap-us-le": (lambda p, pk: write_pcap(p, pk), 1e-6),
    "pcap-ns-le": (lambda p, pk: write_pcap(p, pk, nanos=True), 1e-8),
    "pcap-us-be": (lambda p, pk: write_pcap(p, pk, big_endian=True), 1e-6),
    "pcap-ns-be": (lambda p, pk: write_pcap(p, pk, nanos=True, big_endian=True), 1e-8),
    "pcapng-ns-le": (lambda p, pk: write_pcapng(p, pk), 1e-8),
    "pcapng-ns-be": (lambda p, pk: write_pcapng(p, pk, big_endian=True), 1e-8),
    "pcapng-default-us": (lambda p, pk: write_pcapng(p, pk, interfaces=(Interface(tsresol=None),)), 1e-6),
    "pcapng-2^-20-offset": (
        lambda p, pk: write_pcapng(p, pk, interfaces=(Interface(tsresol=0x80 | 20, tsoffset=int(T0) // 2),)),
        2e-6,
    ),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_format_gives_the_same_candidates(tmp_path: Path, fmt: str) -> None:
    write, tol = WRITERS[fmt]
    pk, truth = _packets()
    path = tmp_path / "cap"
    write(path, pk)
    c = read_candidates(path, CandidateFilter())
    assert c.packets == len(pk)
    assert c.undecodable == 0
    assert c.candidates == sum(len(v) for v in truth.values()) == c.times.size == c.flow_ids.size
    got: dict[str, list[float]] = {}
    for fid, t in zip(c.flow_ids.tolist(), c.times.tolist(), strict=True):
        got.setdefault(c.labels[fid][0], []).append(t)
    assert sorted(got) == sorted(truth)
    for label, ts in truth.items():
        np.testing.assert_allclose(got[label], ts, rtol=0, atol=tol)
    clients = {lab: cl for lab, cl in c.labels}
    assert clients["198.18.0.10:443>198.18.1.2:50000"] == "198.18.1.2"
    assert clients["[2001:db8::10]:443>[2001:db8:1::2]:50001"] == "2001:db8:1::2"
    assert np.all(np.diff(c.times) >= 0)


@pytest.mark.parametrize("port,lo,hi", [(443, 1180, 1288), (443, 1000, 1400), (8443, 1180, 1288)])
def test_size_band_edges_and_port(tmp_path: Path, port: int, lo: int, hi: int) -> None:
    sizes = [lo - 1, lo, (lo + hi) // 2, hi, hi + 1]
    pk = [Packet(T0 + i, udp_frame(*V4, port, 50000 + i, s)) for i, s in enumerate(sizes)]
    pk += [Packet(T0 + 10 + i, udp_frame(*V4, port + 1, 50000, s)) for i, s in enumerate(sizes)]
    write_pcap(tmp_path / "c.pcap", pk)
    c = read_candidates(tmp_path / "c.pcap", CandidateFilter(port, lo, hi))
    assert c.candidates == 3
    assert sorted(lab.rsplit(":", 1)[1] for lab, _ in c.labels) == ["50001", "50002", "50003"]


def _patched(frame: bytes, at: int, value: int) -> bytes:
    return frame[:at] + bytes([value]) + frame[at + 1 :]


def test_non_candidates_and_undecodable_frames(tmp_path: Path) -> None:
    good = udp_frame(*V4, 443, 50000, 1200)
    frames = {
        "first fragment": (udp_frame(*V4, 443, 50000, 1200, more_fragments=True), False),
        "later fragment": (udp_frame(*V4, 443, 50000, 1200, frag_offset=1480), False),
        "ipv4 tcp": (_patched(good, 14 + 9, 6), False),
        "ipv6 hop-by-hop": (_patched(udp_frame(*V6, 443, 50000, 1200), 14 + 6, 0), False),
    }
    undecodable = {
        "arp": b"\x02" * 12 + b"\x08\x06" + bytes(1186),
        "runt": good[:10],
        "three vlan tags": b"\x02" * 12 + b"\x81\x00\x00\x01" * 3 + good[12:],
        "ip version 5": _patched(good, 14, 0x55),
        "ihl below 5": _patched(good, 14, 0x44),
        "ipv6 version 4": _patched(udp_frame(*V6, 443, 50000, 1200), 14, 0x40),
    }
    pk = [Packet(T0, good)]
    pk += [Packet(T0 + 1, fr) for fr, _ in frames.values()]
    pk += [Packet(T0 + 2, fr) for fr in undecodable.values()]
    write_pcap(tmp_path / "c.pcap", pk)
    c = read_candidates(tmp_path / "c.pcap")
    assert c.packets == 1 + len(frames) + len(undecodable)
    assert c.candidates == 1 and c.times.tolist() == [T0]
    assert c.undecodable == len(undecodable)


def test_snaplen_cut_frames_count_by_their_wire_length(tmp_path: Path) -> None:
    pk = [
        Packet(T0, udp_frame(*V4, 443, 50000, 1200)),  # needs 42 bytes of headers
        Packet(T0 + 1, udp_frame(*V6, 443, 50001, 1200, vlans=(1, 2))),  # needs 70
        Packet(T0 + 2, udp_frame(*V4, 443, 50002, 1200, ip_options=bytes(40))),  # needs 82
    ]
    write_pcap(tmp_path / "s64.pcap", pk, snaplen=64)
    c = read_candidates(tmp_path / "s64.pcap")
    assert (c.candidates, c.undecodable) == (1, 2)
    assert c.labels[0][0] == "198.18.0.10:443>198.18.1.2:50000"
    write_pcapng(tmp_path / "s96.pcapng", pk, interfaces=(Interface(snaplen=96),))
    c = read_candidates(tmp_path / "s96.pcapng")
    assert (c.candidates, c.undecodable) == (3, 0)
    write_pcap(tmp_path / "s30.pcap", pk, snaplen=30)
    assert read_candidates(tmp_path / "s30.pcap").undecodable == 3


def test_pcapng_blocks_interfaces_and_sections(tmp_path: Path) -> None:
    fr = udp_frame(*V4, 443, 50000, 1200)
    # interface 0 in microseconds, interface 1 in nanoseconds; an NRB and a custom
    # block to skip; an obsolete packet block; simple packet blocks inherit the
    # last timestamp before them.
    ifaces = (Interface(tsresol=6), Interface(tsresol=9))
    nrb = block(4, struct.pack("<HH", 0, 0))
    custom = block(0x00000BAD, b"vendor data")
    pb = block(2, struct.pack("<HHIIII", 1, 0, 0, 0, len(fr), len(fr)) + fr)  # ts 0 on iface 1
    sec1 = pcapng_section_bytes(
        [Packet(T0, fr, 0), Packet(T0 + 1, fr, 1)], interfaces=ifaces, extra=nrb + custom + pb
    )
    sec1 += block(3, struct.pack("<I", len(fr)) + fr)  # SPB after the EPBs: inherits T0 + 1
    sec2 = pcapng_section_bytes([Packet(T0 + 2, fr)], big_endian=True)
    (tmp_path / "m.pcapng").write_bytes(sec1 + sec2)
    c = read_candidates(tmp_path / "m.pcapng")
    assert c.packets == 5 and c.candidates == 5 and c.untimed == 0
    np.testing.assert_allclose(c.times, [0.0, T0, T0 + 1, T0 + 1, T0 + 2], atol=1e-6)


def test_simple_packet_blocks_without_any_timestamp_are_an_error(tmp_path: Path) -> None:
    write_pcapng(tmp_path / "s.pcapng", [Packet(T0, udp_frame(*V4, 443, 50000, 1200))], simple=True)
    with pytest.raises(CaptureError, match="no timestamps"):
        read_candidates(tmp_path / "s.pcapng")


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_other_link_types_are_named(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"c.{fmt}"
    pk = [Packet(T0, b"\x45" + bytes(59))]
    if fmt == "pcap":
        write_pcap(path, pk, linktype=105)
        match = "link type 105 IEEE802_11"
    else:
        write_pcapng(path, pk, interfaces=(Interface(linktype=127),))
        match = "link type 127 IEEE802_11_RADIOTAP"
    with pytest.raises(CaptureError, match=match):
        read_candidates(path)


def test_empty_unknown_and_short_files(tmp_path: Path) -> None:
    cases = {
        "empty": (b"", "empty file"),
        "text": (b"hello world, not a capture", "not a pcap or pcapng capture \\(magic 0x68656c6c"),
        "two bytes": (b"\xd4\xc3", "truncated file header at byte 0"),
        "one odd byte": (b"\x00", "not a pcap or pcapng"),
        "pcap header cut": (b"\xd4\xc3\xb2\xa1\x02\x00", "truncated pcap file header"),
        "pcap version": (b"\xd4\xc3\xb2\xa1" + struct.pack("<HHiIII", 9, 4, 0, 0, 0, 1), "version 9"),
    }
    for key, (data, match) in cases.items():
        path = tmp_path / key.replace(" ", "_")
        path.write_bytes(data)
        with pytest.raises(CaptureError, match=match) as ei:
            read_candidates(path)
        assert str(ei.value).startswith(str(path) + ": ") and "\n" not in str(ei.value)
    with pytest.raises(CaptureError, match="cannot read"):
        read_candidates(tmp_path / "missing.pcap")


def _boundaries(data: bytes, fmt: str) -> set[int]:
    """Byte offsets where a record (pcap) or block (pcapng) ends."""
    out = set()
    if fmt == "pcap":
        off = 24
        while off < len(data):
            off += 16 + struct.unpack_from("<I", data, off + 8)[0]
            out.add(off)
    else:
        off = 0
        while off < len(data):
            off += struct.unpack_from("<I", data, off + 4)[0]
            out.add(off)
    return out


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_every_truncation_is_one_clear_error(tmp_path: Path, fmt: str) -> None:
    pk = [Packet(T0 + i, fr) for i, (fr, _) in enumerate(_frames()[:4])]
    pk = [Packet(p.time, p.frame[:100]) for p in pk]  # small frames keep the loop short
    full = tmp_path / f"full.{fmt}"
    (write_pcap if fmt == "pcap" else write_pcapng)(full, pk)
    data = full.read_bytes()
    ends = _boundaries(data, fmt)
    # pcapng: the section header and the interface block come before any packet
    header = 24 if fmt == "pcap" else sorted(ends)[1]
    cut_file = tmp_path / f"cut.{fmt}"
    for cut in range(1, len(data)):
        cut_file.write_bytes(data[:cut])
        if cut in ends or (fmt == "pcap" and cut == header):
            c = read_candidates(cut_file)  # a cut on a record boundary is a shorter, valid capture
            assert c.packets == sum(1 for e in ends if header < e <= cut)
            continue
        with pytest.raises(CaptureError) as ei:
            read_candidates(cut_file)
        msg = str(ei.value)
        assert msg.startswith(f"{cut_file}: ") and "truncated" in msg and "\n" not in msg, (cut, msg)
        if cut > header + 16 and fmt == "pcap":
            assert " at byte " in msg and "(record " in msg


def test_truncated_last_record_error_names_offset_and_record(tmp_path: Path) -> None:
    pk = [Packet(T0 + i, udp_frame(*V4, 443, 50000, 1200)) for i in range(3)]
    write_pcap(tmp_path / "c.pcap", pk)
    data = (tmp_path / "c.pcap").read_bytes()
    (tmp_path / "c.pcap").write_bytes(data[:-100])
    last = 24 + 2 * (16 + 1200)
    with pytest.raises(CaptureError, match=rf"truncated record at byte {last} \(record 3\)"):
        read_candidates(tmp_path / "c.pcap")
    c = read_candidates(tmp_path / "c.pcap", truncated_ok=True)
    assert (c.packets, c.candidates) == (2, 2)


def test_garbled_lengths(tmp_path: Path) -> None:
    pk = [Packet(T0 + i, udp_frame(*V4, 443, 50000, 1200)) for i in range(3)]
    write_pcap(tmp_path / "c.pcap", pk)
    data = bytearray((tmp_path / "c.pcap").read_bytes())
    second = 24 + 16 + 1200
    struct.pack_into("<I", data, second + 8, 0x7FFFFFFF)
    (tmp_path / "g.pcap").write_bytes(bytes(data))
    with pytest.raises(CaptureError, match=rf"garbled record header at byte {second} \(record 2\)"):
        read_candidates(tmp_path / "g.pcap")

    write_pcapng(tmp_path / "c.pcapng", pk)
    data = bytearray((tmp_path / "c.pcapng").read_bytes())
    data[-1] ^= 0x01  # trailing length of the last block
    (tmp_path / "g.pcapng").write_bytes(bytes(data))
    with pytest.raises(CaptureError, match="garbled block at byte .* at its end"):
        read_candidates(tmp_path / "g.pcapng")
    bad_bom = bytearray(section_header())
    bad_bom[8] ^= 0xFF
    (tmp_path / "b.pcapng").write_bytes(bytes(bad_bom) + interface_block(Interface()))
    with pytest.raises(CaptureError, match="garbled section header at byte 0"):
        read_candidates(tmp_path / "b.pcapng")


def _small_capture(fmt: str) -> bytes:
    pk = [Packet(T0 + i * 0.01, fr[:120]) for i, (fr, _) in enumerate(_frames())]
    buf = pcapng_section_bytes(pk) if fmt == "pcapng" else None
    if buf is not None:
        return buf
    import io

    out = io.BytesIO()
    out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    for p in pk:
        out.write(struct.pack("<IIII", int(p.time), 0, len(p.frame), 1200) + p.frame)
    return out.getvalue()


SMALL = {fmt: _small_capture(fmt) for fmt in ("pcap", "pcapng")}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(sorted(SMALL)),
    edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 2000),
    lockstep=st.booleans(),
)
def test_random_damage_never_escapes_as_anything_but_capture_error(
    tmp_path_factory: pytest.TempPathFactory, fmt: str, edits: list[tuple[int, int]], cut: int,
    lockstep: bool,
) -> None:
    import iqn_ctl.capture.pcap as pcap

    data = bytearray(SMALL[fmt])
    for at, val in edits:
        data[at % len(data)] = val
    data = data[: max(cut, 4)] if cut < len(data) else data
    path = tmp_path_factory.mktemp("fuzz") / f"f.{fmt}"
    path.write_bytes(bytes(data))
    saved = pcap.LOCKSTEP_MIN, pcap.LANE
    if lockstep:  # the vectorised walk, with tiny lanes, must fail over just as safely
        pcap.LOCKSTEP_MIN, pcap.LANE = 0, 64
    try:
        c = read_candidates(path)
    except CaptureError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        return
    finally:
        pcap.LOCKSTEP_MIN, pcap.LANE = saved
    assert c.candidates == c.times.size == c.flow_ids.size
    assert c.flow_ids.size == 0 or int(c.flow_ids.max()) < len(c.labels)
    assert 0 <= c.undecodable <= c.packets


def _mixed_capture(path: Path, noise: int = 3000) -> None:
    rng = np.random.default_rng(7)
    flows = [
        SignalFlow("198.18.0.10", "198.18.1.2", 50000, random_stalls(3, rng, t0=T0, max_gap=5)),
        SignalFlow("2001:db8::10", "2001:db8:1::2", 50001, random_stalls(3, rng, t0=T0, max_gap=5),
                   vlans=(5, 6)),
    ]
    write_pcap(path, router_traffic(flows, noise, T0, T0 + 40, rng))


def _dpkt_candidates(path: Path, filt: CandidateFilter) -> list[float]:
    """The same rule, one packet at a time with dpkt (an independent parser)."""
    import dpkt

    out = []
    with open(path, "rb") as f:
        for ts, buf in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if isinstance(ip, dpkt.ip.IP) and (ip.mf or ip.offset):
                continue
            udp = getattr(ip, "data", None)
            if isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) and isinstance(udp, dpkt.udp.UDP):
                if udp.sport == filt.port and filt.min_size <= len(buf) <= filt.max_size:
                    out.append(float(ts))
    return out


def test_agrees_with_dpkt_on_mixed_traffic(tmp_path: Path) -> None:
    try:
        import dpkt  # noqa: F401
    except ImportError:
        need(False, "dpkt is not installed (pip install -e '.[bench]')")
    path = tmp_path / "mixed.pcap"
    _mixed_capture(path)
    filt = CandidateFilter()
    c = read_candidates(path, filt)
    ref = _dpkt_candidates(path, filt)
    assert c.candidates == len(ref) > 50
    np.testing.assert_allclose(np.sort(c.times), np.sort(ref), atol=1e-6)


def test_tshark_reads_what_we_write(tmp_path: Path) -> None:
    need(shutil.which("tshark") is not None, "tshark is not installed (scripts/setup.sh installs it)")
    pk, truth = _packets(1)
    for name, write in (("a.pcap", write_pcap), ("a.pcapng", write_pcapng)):
        write(tmp_path / name, pk)
        res = subprocess.run(
            ["tshark", "-r", str(tmp_path / name), "-T", "fields", "-e", "frame.len", "-e", "udp.srcport"],
            capture_output=True, text=True, timeout=60,
        )
        assert res.returncode == 0, res.stderr
        rows = [ln.split("\t") for ln in res.stdout.splitlines()]
        assert [int(r[0]) for r in rows] == [len(p.frame) for p in pk]
        c = read_candidates(tmp_path / name)
        tshark_cands = sum(1 for r in rows if r[1] == "443" and 1180 <= int(r[0]) <= 1288)
        assert c.candidates == tshark_cands == sum(len(v) for v in truth.values())


@pytest.fixture
def small_lanes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the lockstep walk (normally for files of 8 MiB and up) run on small files."""
    import iqn_ctl.capture.pcap as pcap

    monkeypatch.setattr(pcap, "LOCKSTEP_MIN", 0)
    monkeypatch.setattr(pcap, "LANE", 2048)


def _all_fields(c: object) -> tuple[object, ...]:
    keys = ("flow_ids", "times", "labels", "packets", "candidates", "undecodable")
    return tuple((v.tolist() if isinstance(v, np.ndarray) else v) for v in (getattr(c, k) for k in keys))


@pytest.mark.parametrize("fmt", ["pcap-le", "pcap-be-ns", "pcapng-le", "pcapng-be"])
def test_lockstep_walk_equals_sequential_walk(tmp_path: Path, small_lanes: None, fmt: str) -> None:
    import iqn_ctl.capture.pcap as pcap

    rng = np.random.default_rng(11)
    flows = [SignalFlow("198.18.0.10", "198.18.1.2", 50000, random_stalls(3, rng, t0=T0, max_gap=5))]
    pk = router_traffic(flows, 2000, T0, T0 + 30, rng)
    path = tmp_path / "c"
    if fmt.startswith("pcapng"):
        write_pcapng(path, pk, big_endian=fmt.endswith("be"))
    else:
        write_pcap(path, pk, big_endian="be" in fmt, nanos=fmt.endswith("ns"))
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        if fmt.startswith("pcapng"):
            fast = pcap._pcapng_fast(mm)
            assert fast is not None
            assert fast[0].size == len(pk) + 2  # section header, interface, packets
        else:
            endian = ">" if "be" in fmt else "<"
            starts = pcap._pcap_sync(mm, endian, 1e-9 if fmt.endswith("ns") else 1e-6)
            assert len(starts) > 100  # the sync found record starts in most lanes
            offs = pcap._lockstep(mm, endian, 24, starts, 8, 16)
            assert offs is not None and offs.size == len(pk)
    fast_c = read_candidates(path)
    pcap.LOCKSTEP_MIN = 1 << 62  # type: ignore[misc]
    seq_c = read_candidates(path)
    assert _all_fields(fast_c) == _all_fields(seq_c)
    assert fast_c.candidates > 50


def test_lockstep_rejects_wrong_lane_guesses(tmp_path: Path, small_lanes: None) -> None:
    """A lane start that is not a record start must never change the result."""
    import mmap

    import iqn_ctl.capture.pcap as pcap

    pk = [Packet(T0 + i * 0.001, udp_frame(*V4, 443, 50000, 1200 + i % 50)) for i in range(200)]
    write_pcap(tmp_path / "c.pcap", pk)
    with open(tmp_path / "c.pcap", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        good = pcap._lockstep(mm, "<", 24, pcap._pcap_sync(mm, "<", 1e-6), 8, 16)
        assert good is not None and good.size == 200
        assert pcap._lockstep(mm, "<", 24, [int(good[50]) + 4], 8, 16) is None
        assert pcap._lockstep(mm, "<", 24, [int(good[50]), int(good[120]) - 1], 8, 16) is None


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_lockstep_path_still_reports_damage(tmp_path: Path, small_lanes: None, fmt: str) -> None:
    pk = [Packet(T0 + i * 0.001, udp_frame(*V4, 443, 50000, 1200)) for i in range(100)]
    path = tmp_path / f"c.{fmt}"
    (write_pcap if fmt == "pcap" else write_pcapng)(path, pk)
    data = path.read_bytes()
    path.write_bytes(data[:-500])
    with pytest.raises(CaptureError, match="truncated"):
        read_candidates(path)
    damaged = bytearray(data)
    rec50 = (24 if fmt == "pcap" else len(section_header()) + len(interface_block(Interface()))) + 50 * (
        16 + 1200 if fmt == "pcap" else 32 + 1200
    )
    struct.pack_into("<I", damaged, rec50 + (8 if fmt == "pcap" else 4), 0x7FFFFFF0)
    path.write_bytes(bytes(damaged))
    with pytest.raises(CaptureError, match=rf"at byte {rec50}"):
        read_candidates(path)


MEDIUM = {
    "pcap": SMALL["pcap"] + SMALL["pcap"][24:] * 9,
    "pcapng": SMALL["pcapng"] * 3,  # three sections: the fast path must step aside
    "pcapng1": pcapng_section_bytes(
        [Packet(T0 + i * 0.01, fr[:150]) for i, (fr, _) in enumerate(_frames() * 6)]
    ),
}


def _outcome(path: Path) -> object:
    try:
        return _all_fields(read_candidates(path))
    except CaptureError as e:
        return str(e)


@settings(max_examples=150, deadline=None)
@given(
    fmt=st.sampled_from(sorted(MEDIUM)),
    edits=st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 20000),
    lane=st.sampled_from([64, 256, 1024]),
)
def test_lockstep_and_sequential_walks_agree_on_damaged_files(
    tmp_path_factory: pytest.TempPathFactory, fmt: str, edits: list[tuple[int, int]], cut: int, lane: int
) -> None:
    import iqn_ctl.capture.pcap as pcap

    data = bytearray(MEDIUM[fmt])
    for at, val in edits:
        data[at % len(data)] = val
    if cut < len(data):
        data = data[: max(cut, 4)]
    path = tmp_path_factory.mktemp("diff") / "f"
    path.write_bytes(bytes(data))
    saved = pcap.LOCKSTEP_MIN, pcap.LANE
    try:
        pcap.LOCKSTEP_MIN, pcap.LANE = 0, lane
        fast = _outcome(path)
        pcap.LOCKSTEP_MIN = 1 << 62
        slow = _outcome(path)
    finally:
        pcap.LOCKSTEP_MIN, pcap.LANE = saved
    assert fast == slow


@pytest.mark.parametrize("lockstep", [False, True])
def test_a_zeroed_record_header_ends_either_walk_at_that_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lockstep: bool
) -> None:
    """An all-zero record header (nothing on the wire) is no record: both walks stop
    there, instead of reading the zeros as millions of empty records."""
    import iqn_ctl.capture.pcap as pcap

    if lockstep:
        monkeypatch.setattr(pcap, "LOCKSTEP_MIN", 0)
        monkeypatch.setattr(pcap, "LANE", 2048)
    frame = udp_frame(*V4, 443, 50000, 1200)
    write_pcap(tmp_path / "c.pcap", [Packet(T0 + i, frame) for i in range(20)])
    data = bytearray((tmp_path / "c.pcap").read_bytes())
    rec = 16 + len(frame)
    at = 24 + 7 * rec
    data[at:] = bytes(len(data) - at)  # record 8 onwards: zeros
    (tmp_path / "z.pcap").write_bytes(bytes(data))
    with pytest.raises(CaptureError, match=rf"byte {at} \(record 8\): original length 0$"):
        read_candidates(tmp_path / "z.pcap")


def test_readable_oddities_reach_the_warn_callback(tmp_path: Path) -> None:
    frame = udp_frame(*V4, 443, 50000, 1200)
    pk = [Packet(T0 + i, frame) for i in range(3)]
    for nanos, frac, unit in ((False, 1_000_000, "us"), (True, 1_000_000_000, "ns")):
        write_pcap(tmp_path / "f.pcap", pk, nanos=nanos)
        data = bytearray((tmp_path / "f.pcap").read_bytes())
        struct.pack_into("<I", data, 24 + 2 * (16 + len(frame)) + 4, frac)  # record 3
        (tmp_path / "f.pcap").write_bytes(bytes(data))
        notes: list[str] = []
        c = read_candidates(tmp_path / "f.pcap", warn=notes.append)
        assert c.candidates == 3 and c.times[-1] == pytest.approx(T0 + 3, abs=1e-6)  # carried
        assert len(notes) == 1 and f"({frac} {unit} in record 3 at byte" in notes[0], notes
    notes = []
    write_pcapng(tmp_path / "r.pcapng", [Packet(0.5 * i, frame) for i in range(3)],
                 interfaces=(Interface(tsresol=0x80 | 63),))  # fmt: skip
    read_candidates(tmp_path / "r.pcapng", warn=notes.append)
    assert len(notes) == 1 and "finer than a picosecond" in notes[0], notes
    notes = []
    write_pcapng(tmp_path / "ok.pcapng", pk, interfaces=(Interface(tsresol=0x80 | 30),))  # ~1 ns: fine
    read_candidates(tmp_path / "ok.pcapng", warn=notes.append)
    write_pcap(tmp_path / "ok.pcap", pk, nanos=True)
    read_candidates(tmp_path / "ok.pcap", warn=notes.append)
    assert notes == []
