"""Candidate packets from a pcap or pcapng capture, fast.

A replay of a router's capture has to keep up with the router: millions of
packets, almost none of them candidates. Building a Python object per packet
would cost microseconds each, so nothing here is per packet in Python. The one
inherently sequential part - hopping from record header to record header - is
done for many stretches of the file at once (:func:`_lockstep`, verified to
equal the sequential chain; a one-``unpack_from``-per-record loop is the
fallback that also words the errors). Then the first bytes of every record are
copied into one compact matrix in a single pass over the mmapped file, and
lengths, timestamps, Ethernet/VLAN/IP/UDP headers, the candidate filter and
flow keys are numpy operations on it. Only candidate *flows* (a handful) ever
become Python strings.

Which frames are candidates is decided by :mod:`iqn_ctl.capture.classify`, the
Python twin of the XDP program, which also knows the link types read here
(Ethernet, Linux cooked v1/v2, raw IP, NULL/LOOP; pcapng interfaces may mix them).

A gzip-compressed capture (magic 1f 8b, what ``tcpdump -w - | gzip`` or a log
rotation leaves) is decompressed as a stream into an unlinked temporary file and
read from there: memory stays bounded, and byte offsets in errors are offsets in
the decompressed capture.

Damaged files fail with :class:`CaptureError`, one line naming file and byte
offset. The magic and the first record are checked on a few bytes read before
the file is mapped, and every record header is checked as the walk reaches it,
so a file of garbage (gigabytes of zeros) fails at its first bad record instead
of costing memory in proportion to its size. Oddities that still leave a
readable capture (a timestamp fraction of a whole second or more, an absurdly
fine ``if_tsresol``) are reported through the caller's ``warn``.

A capture cut mid-record (a crashed or still-running tcpdump) is an error by
default too - the tail may be exactly the stall being asked about - unless the
caller passes ``truncated_ok=True``, which drops the partial record.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import tempfile
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from iqn_ctl.capture.classify import (
    F64,
    HDR,
    I64,
    LINK_TYPES,
    LINKTYPE_ETHERNET,
    Candidates,
    classify,
)
from iqn_ctl.engine.params import CandidateFilter
from iqn_ctl.errors import IqnError

#: the largest record Wireshark accepts for Ethernet; anything above is a garbled length
MAX_RECORD = 262144
#: frame bytes copied per packet: two VLAN tags, IPv4 with the longest options and UDP
_HDR = HDR

_LINKTYPE_NAMES = {
    0: "NULL (BSD loopback)",
    1: "Ethernet",
    12: "RAW (raw IP)",
    14: "RAW (raw IP)",
    101: "RAW (raw IP)",
    105: "IEEE802_11 (Wi-Fi)",
    108: "LOOP (OpenBSD loopback)",
    113: "LINUX_SLL (Linux cooked)",
    127: "IEEE802_11_RADIOTAP (Wi-Fi radiotap)",
    228: "IPV4 (raw IPv4)",
    229: "IPV6 (raw IPv6)",
    276: "LINUX_SLL2 (Linux cooked v2)",
}

#: classic pcap magic (as bytes at offset 0) -> (byte order, seconds per fraction unit)
_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_BOM = 0x1A2B3C4D
_BT_IDB, _BT_PB, _BT_SPB, _BT_EPB = 1, 2, 3, 6


class CaptureError(IqnError, ValueError):
    """A capture that cannot be read; the message names the file and byte offset."""


@dataclass(slots=True)
class _Packets:
    """Where each packet's frame lies in the file, and its lengths and time."""

    data: I64
    caplen: I64
    origlen: I64
    times: F64
    linktypes: list[int]
    #: each packet's link type, or one for all
    lt: I64 | int = LINKTYPE_ETHERNET
    #: frame headers already copied out: a byte matrix, each packet's row in it
    #: (None: row i is packet i) and the column where its frame begins
    hdr: tuple[npt.NDArray[np.uint8], I64 | None, I64 | int] | None = None
    #: readable but suspicious: one line each for the user
    notes: list[str] = field(default_factory=list)


def linktype_name(lt: int) -> str:
    return f"{lt} {_LINKTYPE_NAMES[lt]}" if lt in _LINKTYPE_NAMES else str(lt)


SUPPORTED = "Ethernet (1), LINUX_SLL (113), LINUX_SLL2 (276), RAW (101, 12, 14, 228, 229), NULL/LOOP (0, 108)"


def _unsupported(name: str, lt: int, where: str = "") -> CaptureError:
    return CaptureError(
        f"{name}: link type {linktype_name(lt)} is not supported{where}; supported: {SUPPORTED}"
    )


#: bytes read (not mapped) to check the magic and the first record header
_SNIFF = 64
#: if_tsresol finer than this many ticks per second (a picosecond) is reported
MAX_PLAUSIBLE_RES = 10**12


def read_candidates(
    path: str | Path,
    filt: CandidateFilter | None = None,
    truncated_ok: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Candidates:
    """Candidates of a pcap/pcapng capture (format detected from the magic).

    ``warn`` gets one line per oddity that still leaves a readable capture."""
    filt = filt or CandidateFilter()
    name = str(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise CaptureError(f"{name}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        # a FIFO or a device would block or never end: only files have a structure to check
        raise CaptureError(f"{name}: not a regular file, expected a pcap or pcapng capture")
    try:
        f: IO[bytes] = open(path, "rb")
    except OSError as e:
        raise CaptureError(f"{name}: cannot read: {e.strerror or e}") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_SNIFF)
        except OSError as e:
            raise CaptureError(f"{name}: cannot read: {e.strerror or e}") from None
        if head[:2] == b"\x1f\x8b":
            with _gunzip(f, name, truncated_ok) as g:
                try:
                    size = os.fstat(g.fileno()).st_size
                    head = g.read(_SNIFF)
                except OSError as e:
                    raise CaptureError(f"{name}: cannot read: {e.strerror or e}") from None
                c, notes = _map_and_read(g, size, head, name, filt, truncated_ok)
        else:
            c, notes = _map_and_read(f, size, head, name, filt, truncated_ok)
    if warn is not None:
        for note in notes:
            warn(note)
    return c


def _map_and_read(
    f: IO[bytes], size: int, head: bytes, name: str, filt: CandidateFilter, truncated_ok: bool
) -> tuple[Candidates, list[str]]:
    """Check the first bytes, then map the whole (regular, uncompressed) file and read it."""
    if size == 0:
        raise CaptureError(f"{name}: empty file, expected a pcap or pcapng capture")
    _sniff(head, name)  # before mapping: a 2 GB non-capture costs nothing
    try:
        # Populate the page tables up front: faulting in a 1 GB capture page by
        # page as the walk touches it costs several times the walk itself.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    except (OSError, ValueError) as e:
        raise CaptureError(f"{name}: cannot map: {e}") from None
    try:
        return _read(mm, name, filt, truncated_ok)
    finally:
        try:
            mm.close()
        except BufferError:  # pragma: no cover - a view escaped; GC closes it
            pass


#: compressed bytes read, and decompressed bytes produced, per step of :func:`_gunzip`
_GZ_STEP = 1 << 20


def _gunzip(f: IO[bytes], name: str, truncated_ok: bool) -> IO[bytes]:
    """The decompressed capture of gzip file ``f``, in an unlinked temporary file.

    Streamed in steps of at most :data:`_GZ_STEP` bytes either side, so memory is
    bounded whatever the compression ratio; the first bytes are checked before the
    rest is decompressed, so a compressed non-capture costs nothing. Members follow
    each other (``cat a.gz b.gz``). A cut stream (a still-running ``tcpdump | gzip``)
    is an error unless ``truncated_ok``, which keeps everything before the cut."""
    tmp = tempfile.TemporaryFile(prefix="iqn-replay-")
    try:
        f.seek(0)  # the caller read the magic
        d = zlib.decompressobj(wbits=31)
        started = False  # d has taken bytes of a member it has not finished
        head = b""
        while data := f.read(_GZ_STEP):
            while True:
                started = True
                out = d.decompress(data, _GZ_STEP)
                data = d.unconsumed_tail
                tmp.write(out)
                if len(head) < _SNIFF:
                    head += out[:_SNIFF]
                    if len(head) >= _SNIFF:
                        _sniff(head, name)
                if d.eof:  # a member ended: what follows is the next one, or padding
                    data = d.unused_data + data
                    d, started = zlib.decompressobj(wbits=31), False
                    if not data.strip(b"\0"):
                        break
                elif not data and len(out) < _GZ_STEP:
                    break  # all input taken and no output held back
        if started and not truncated_ok:
            raise CaptureError(f"{name}: truncated gzip stream (the compressed file is cut short)")
        if started:
            tmp.write(d.flush())
    except zlib.error as e:
        tmp.close()
        raise CaptureError(f"{name}: garbled gzip stream: {e}") from None
    except OSError as e:
        tmp.close()
        raise CaptureError(f"{name}: cannot decompress: {e.strerror or e}") from None
    except BaseException:
        tmp.close()
        raise
    tmp.flush()
    tmp.seek(0)
    return tmp


def _sniff(head: bytes, name: str) -> None:
    """Fail on a file that is no capture, or whose first record header is
    garbage, from its first bytes alone."""
    magic = head[:4]
    if magic in _PCAP_MAGIC:
        if len(head) >= 40:
            endian = _PCAP_MAGIC[magic][0]
            incl, orig = struct.unpack_from(endian + "II", head, 32)
            _check_record(name, 24, 1, incl, orig)
        return
    if len(magic) == 4 and struct.unpack("<I", magic)[0] == _PCAPNG_SHB:
        return
    if len(magic) < 4 and any(m.startswith(magic) for m in [*_PCAP_MAGIC, b"\x0a\x0d\x0d\x0a"]):
        raise CaptureError(f"{name}: truncated file header at byte 0 ({len(magic)} bytes)")
    raise CaptureError(f"{name}: not a pcap or pcapng capture (magic 0x{magic.hex()} at byte 0)")


def _check_record(name: str, off: int, index: int, incl: int, orig: int) -> None:
    """A pcap record header no capture can hold: a captured length past any
    snaplen, or nothing on the wire (an all-zero header, i.e. no record at all)."""
    if incl > MAX_RECORD:
        raise CaptureError(
            f"{name}: garbled record header at byte {off} (record {index}): "
            f"captured length {incl} exceeds {MAX_RECORD}"
        )
    if orig == 0:
        raise CaptureError(
            f"{name}: garbled record header at byte {off} (record {index}): original length 0"
        )


def _read(
    mm: mmap.mmap, name: str, filt: CandidateFilter, truncated_ok: bool
) -> tuple[Candidates, list[str]]:
    if mm[:4] in _PCAP_MAGIC:
        pk = _read_pcap(mm, name, truncated_ok)
    else:  # _sniff let only the two magics through
        pk = _read_pcapng(mm, name, truncated_ok)
    u8 = np.frombuffer(mm, dtype=np.uint8)
    try:
        return _classify(u8, pk, filt, name), pk.notes
    finally:
        del u8


# classic pcap -----------------------------------------------------------------


def _read_pcap(mm: mmap.mmap, name: str, truncated_ok: bool) -> _Packets:
    n = len(mm)
    endian, unit = _PCAP_MAGIC[mm[:4]]
    if n < 24:
        raise CaptureError(f"{name}: truncated pcap file header ({n} of 24 bytes)")
    vmaj, _vmin, _zone, _sigfigs, _snaplen, network = struct.unpack_from(endian + "HHiIII", mm, 4)
    if vmaj != 2:
        raise CaptureError(f"{name}: garbled pcap file header at byte 4 (version {vmaj}, expected 2)")
    linktype = network & 0x0FFFFFFF
    if linktype not in LINK_TYPES:
        raise _unsupported(name, linktype)

    offs = array("q")  # 8 bytes a record, not a Python int and a list slot
    fast = _lockstep(mm, endian, 24, _pcap_sync(mm, endian, unit), 8, 16)
    if fast is not None:
        o, off = fast, n
    else:
        # The only sequential part: each record's length says where the next begins.
        # Each header is checked as it is reached, so garbage ends the walk at once.
        get = struct.Struct(endian + "8xII").unpack_from
        app = offs.append
        off = 24
        last = n - 16
        while off <= last:
            incl_, orig_ = get(mm, off)
            if incl_ > MAX_RECORD or not orig_:
                _check_record(name, off, len(offs) + 1, incl_, orig_)
            app(off)
            off += 16 + incl_
        o = np.frombuffer(offs, dtype=np.int64) if len(offs) else np.empty(0, np.int64)
    u8 = np.frombuffer(mm, dtype=np.uint8)
    try:
        rows = _rows(u8, o, 16 + _HDR)  # record header and frame headers in one pass
    finally:
        del u8
    rec = np.ascontiguousarray(rows[:, :16]).view(endian + "u4")
    incl = rec[:, 2].astype(np.int64)
    orig = rec[:, 3].astype(np.int64)
    sec = rec[:, 0].astype(np.float64)
    frac = rec[:, 1].astype(np.float64)
    bad = np.flatnonzero((incl > MAX_RECORD) | (orig == 0))
    if bad.size:
        i = int(bad[0])
        _check_record(name, int(o[i]), i + 1, int(incl[i]), int(orig[i]))
    if off != n:
        if off < n:  # fewer than 16 bytes left: a cut record header
            if not truncated_ok:
                raise CaptureError(
                    f"{name}: truncated record header at byte {off} (record {len(offs) + 1})"
                )
        else:  # the last record's data runs past the end of the file
            if not truncated_ok:
                raise CaptureError(
                    f"{name}: truncated record at byte {offs[-1]} (record {len(offs)}): "
                    f"{int(incl[-1])} bytes of data, {n - offs[-1] - 16} in the file"
                )
            incl, orig, sec, frac, o = incl[:-1], orig[:-1], sec[:-1], frac[:-1], o[:-1]
            rows = rows[:-1]
    pk = _Packets(
        o + 16, incl, orig, sec + frac * unit, [linktype] if o.size else [], linktype, (rows, None, 16)
    )
    whole = 1_000_000 if unit == 1e-6 else 1_000_000_000
    over = np.flatnonzero(frac >= whole)
    if over.size:
        i = int(over[0])
        pk.notes.append(
            f"{name}: {over.size} record(s) have a timestamp fraction of a whole second or more "
            f"({int(frac[i])} {'us' if unit == 1e-6 else 'ns'} in record {i + 1} at byte {int(o[i])}); "
            "read as carrying into the seconds"
        )
    return pk


def _rows(u8: npt.NDArray[np.uint8], starts: I64, width: int) -> npt.NDArray[np.uint8]:
    """``width`` bytes from each of ``starts`` (ascending) as a compact matrix.

    One pass over the file: a capture is far bigger than the CPU caches, so
    every separate gather of a field would miss once per packet; copying each
    header's bytes once and picking fields from the small matrix misses once.
    Rows running past the end of the file are zero-padded.
    """
    n = u8.size
    out = np.empty((starts.size, width), np.uint8)
    m = int(np.searchsorted(starts, n - width, side="right")) if n >= width else 0
    if m:
        win = np.lib.stride_tricks.as_strided(u8, shape=(n - width + 1, width), strides=(1, 1))
        out[:m] = win[starts[:m]]
    if m < starts.size:
        base = max(0, n - width)
        tail = np.zeros(2 * width, np.uint8)
        tail[: n - base] = u8[base:]
        out[m:] = tail[(starts[m:] - base)[:, None] + np.arange(width)]
    return out


# the vectorised walk ---------------------------------------------------------

#: captures smaller than this are walked one record at a time (fast enough)
LOCKSTEP_MIN = 8 << 20
#: bytes of file per lane of the lockstep walk
LANE = 1 << 20


def _lockstep(
    mm: mmap.mmap, endian: str, first: int, starts: list[int], len_at: int, add: int
) -> I64 | None:
    """Offsets of every record, walking many stretches of the file at once.

    Records form a chain (each one's length gives the next one's offset), which
    a Python loop would follow at ~0.2 us a record. Instead, ``starts`` holds a
    guessed record start in each ``LANE`` bytes of the file (found by
    :func:`_pcap_sync` / :func:`_pcapng_fast`); every lane follows its chain with
    one numpy step for all lanes, until it reaches the next lane's start. The
    guesses need not be right: the result is used only if every lane lands
    *exactly* on the next one's start and the last on the end of the file, which
    by induction from the true first record means every lane walked the true
    chain. Anything else (a wrong guess, a damaged or truncated file) returns
    None and the caller walks sequentially, which also words the errors.

    ``len_at`` is where a record's length field lies, ``add`` what to add to it.
    """
    n = len(mm)
    if n < max(LOCKSTEP_MIN, 64):
        return None
    lanes = np.array(sorted({first, *starts}), dtype=np.int64)
    stops = np.append(lanes[1:], n)
    if int((stops - lanes).max()) > 8 * max(LANE, MAX_RECORD + 4096):
        # Too few lanes synchronised (garbage, or a capture whose guesses all failed):
        # one numpy step per record would crawl; the sequential walk is faster and checks.
        return None
    u32 = np.ndarray(shape=(n - 3,), dtype=endian + "u4", buffer=mm, strides=(1,))
    try:
        off = lanes.copy()
        act = np.arange(lanes.size)
        chunks: list[I64] = []
        owners: list[I64] = []
        limit = n - max(len_at + 4, add)
        while act.size:
            o = off[act]
            if int(o.max()) > limit:
                return None
            chunks.append(o)
            owners.append(act)
            step = u32[o + len_at].astype(np.int64)
            if add == 0 and int(step.min()) < 12:  # pcapng block shorter than its header
                return None
            if int(step.max()) > MAX_RECORD + 4096:
                return None
            o = o + step + add
            off[act] = o
            act = act[o < stops[act]]
    finally:
        del u32
    if not np.array_equal(off, stops):
        return None
    offs = np.concatenate(chunks)
    lane = np.concatenate(owners)
    order = np.argsort(lane.astype(np.uint16) if lanes.size < 65536 else lane, kind="stable")
    return offs[order]


def _pcap_sync(mm: mmap.mmap, endian: str, unit: float) -> list[int]:
    """A likely record start in each lane: the first place where four records
    in a row have timestamps sharing the top 16 bits of the first record's
    seconds, sane fractions and lengths. Only a guess; :func:`_lockstep` checks."""
    n = len(mm)
    if n < max(LOCKSTEP_MIN, 64):
        return []
    rec = struct.Struct(endian + "IIII")
    sec0 = rec.unpack_from(mm, 24)[0]
    top = struct.pack(endian + "I", sec0)
    pat, shift = (top[2:], 2) if endian == "<" else (top[:2], 0)
    frac_max = 1_000_000 if unit == 1e-6 else 1_000_000_000

    def plausible(s: int) -> bool:
        for _ in range(4):
            if s + 16 > n:
                return s == n
            sec, frac, incl, orig = rec.unpack_from(mm, s)
            if sec >> 16 != sec0 >> 16 or frac >= frac_max or incl > orig or not 0 < orig <= MAX_RECORD:
                return False
            s += 16 + incl
        return True

    out = []
    # Never search up to the very end: CPython 3.11's mmap.find reads one byte past
    # its range, a segfault when the file ends on a page boundary (no record starts
    # in the last 16 bytes anyway).
    for c in range(LANE, n - 16, LANE):
        stop = min(c + LANE, n - 16)
        h = mm.find(pat, c + shift, stop)
        while h != -1:
            if plausible(h - shift):
                out.append(h - shift)
                break
            h = mm.find(pat, h + 1, stop)
    return out


def _pcapng_fast(mm: mmap.mmap) -> tuple[I64, str] | None:
    """Offsets of all blocks of a single-section pcapng, by the lockstep walk
    (lanes synchronised on enhanced packet blocks whose trailing length matches);
    None for small, multi-section or damaged files."""
    n = len(mm)
    if n < max(LOCKSTEP_MIN, 64):
        return None
    bom = struct.unpack_from("<I", mm, 8)[0]
    endian = "<" if bom == _PCAPNG_BOM else ">" if bom == 0x4D3C2B1A else None
    if endian is None:
        return None
    blk = struct.Struct(endian + "II")
    word = struct.Struct(endian + "I")
    pat = word.pack(_BT_EPB)

    def plausible(s: int) -> bool:
        for _ in range(3):
            if s + 12 > n:
                return s == n
            btype, blen = blk.unpack_from(mm, s)
            if blen < 12 or blen & 3 or blen > MAX_RECORD + 4096 or s + blen > n:
                return False
            if btype == _PCAPNG_SHB or word.unpack_from(mm, s + blen - 4)[0] != blen:
                return False
            s += blen
        return True

    starts = []
    for c in range(LANE, n - 12, LANE):
        stop = min(c + LANE, n - 12)  # not to the end: see _pcap_sync
        h = mm.find(pat, c, stop)
        while h != -1:
            if not h & 3 and plausible(h):
                starts.append(h)
                break
            h = mm.find(pat, h + 1, stop)
    offs = _lockstep(mm, endian, 0, starts, 4, 0)
    if offs is None:
        return None
    u32 = np.frombuffer(mm, dtype=endian + "u4", count=n // 4)
    try:
        if (offs & 3).any() or (u32[offs[1:] >> 2] == _PCAPNG_SHB).any():
            return None  # several sections (maybe of both byte orders): walk them in turn
    finally:
        del u32
    return offs, endian


# pcapng -----------------------------------------------------------------------


@dataclass(slots=True)
class _Iface:
    linktype: int
    snaplen: int
    #: ticks per second (if_tsresol) and seconds added to every timestamp (if_tsoffset)
    res: int = 1_000_000
    offset: int = 0


def _read_pcapng(mm: mmap.mmap, name: str, truncated_ok: bool) -> _Packets:
    n = len(mm)
    fast = _pcapng_fast(mm)
    if fast is not None:
        return _pcapng_sections(mm, name, fast[0], [(0, fast[1])])
    # Walk block headers. Only a section header can change the byte order; its
    # type reads the same either way round, so the loop tests for it cheaply.
    offs = array("q")
    app = offs.append
    sections: list[tuple[int, str]] = []  # (index of first block, byte order)
    get = struct.Struct("<II").unpack_from
    off = 0
    last = n - 12
    while off <= last:
        btype, blen = get(mm, off)
        if btype == _PCAPNG_SHB or blen < 12:
            if btype == _PCAPNG_SHB:
                bom = struct.unpack_from("<I", mm, off + 8)[0]
                if bom == _PCAPNG_BOM:
                    endian = "<"
                elif bom == 0x4D3C2B1A:
                    endian = ">"
                else:
                    raise CaptureError(
                        f"{name}: garbled section header at byte {off} (byte-order magic 0x{bom:08x})"
                    )
                get = struct.Struct(endian + "II").unpack_from
                blen = get(mm, off)[1]
                sections.append((len(offs), endian))
            if blen < 12:
                raise CaptureError(
                    f"{name}: garbled block at byte {off} (block {len(offs) + 1}): length {blen}"
                )
        app(off)
        off += blen
    if off != n and not truncated_ok:
        if off < n:
            raise CaptureError(f"{name}: truncated block header at byte {off} (block {len(offs) + 1})")
        raise CaptureError(f"{name}: truncated block at byte {offs[-1]} (block {len(offs)})")
    if off > n:
        offs.pop()
    sections = [(s, e) for s, e in sections if s < len(offs)]
    if not sections:  # the magic matched but not even one whole block follows
        if truncated_ok:
            z = np.empty(0, np.int64)
            return _Packets(z, z, z, np.empty(0), [])
        raise CaptureError(f"{name}: truncated section header at byte 0 ({n} bytes)")

    return _pcapng_sections(mm, name, np.frombuffer(offs, dtype=np.int64).copy(), sections)


def _pcapng_sections(
    mm: mmap.mmap, name: str, all_offs: I64, sections: list[tuple[int, str]]
) -> _Packets:
    """Packets of every section, from the offsets of all blocks."""
    parts: list[tuple[I64, I64, I64, F64, I64, I64]] = []
    hdrs: list[tuple[npt.NDArray[np.uint8], I64 | None, I64 | int]] = []
    linktypes: set[int] = set()
    notes: list[str] = []
    bad = np.flatnonzero(all_offs & 3)
    if bad.size:  # the block before it had a length that is not a multiple of 4
        i = max(int(bad[0]) - 1, 0)
        raise CaptureError(
            f"{name}: garbled block at byte {int(all_offs[i])} (block {i + 1}): "
            "length is not a multiple of 4"
        )
    bounds = [s for s, _ in sections] + [all_offs.size]
    for (start, endian), stop in zip(sections, bounds[1:], strict=True):
        res = _pcapng_section(mm, name, endian, all_offs[start:stop], start, notes)
        if res is not None:
            parts.append(res[0])
            linktypes.update(res[1])
            hdrs.append(res[2])
    if not parts:
        z = np.empty(0, np.int64)
        return _Packets(z, z, z, np.empty(0), [], notes=notes)
    data, cap, orig, times, _blk, lt = (np.concatenate(a) for a in zip(*parts, strict=True))
    # one section (the usual case): its copied headers serve the classifier too
    hdr = hdrs[0] if len(hdrs) == 1 else None
    return _Packets(data, cap, orig, _forward_fill(times), sorted(linktypes), lt, hdr, notes)


def _forward_fill(times: F64) -> F64:
    """Simple packet blocks carry no timestamp: they inherit the last timestamp
    before them (blocks are in capture order); NaN if there is none."""
    nan = np.isnan(times)
    if not nan.any():
        return times
    idx = np.where(nan, 0, np.arange(times.size))
    np.maximum.accumulate(idx, out=idx)
    return times[idx]  # a leading run of NaN maps to index 0, itself NaN


#: bytes copied per pcapng block: the previous block's trailing length, the
#: enhanced packet block header, the frame headers
_NG_ROW = 4 + 28 + _HDR


def _pcapng_section(
    mm: mmap.mmap, name: str, endian: str, o: I64, first_block: int, notes: list[str]
) -> tuple[
    tuple[I64, I64, I64, F64, I64, I64], set[int], tuple[npt.NDArray[np.uint8], I64 | None, I64 | int]
] | None:
    n = len(mm)
    # One pass: each row starts 4 bytes before its block, so it holds the trailing
    # length of the block before (blocks of a section are contiguous), then type,
    # length, EPB's interface, ts high, ts low, captured and original length, frame.
    u8 = np.frombuffer(mm, dtype=np.uint8)
    try:
        rows = _rows(u8, np.maximum(o - 4, 0), _NG_ROW)
        if int(o[0]) < 4:  # the file's first block: nothing before it
            rows[0, :4] = 0
            rows[0, 4:] = _rows(u8, o[:1], _NG_ROW - 4)[0]
    finally:
        del u8
    hdr = np.ascontiguousarray(rows[:, 4:32]).view(endian + "u4")
    btype = hdr[:, 0]
    blen = hdr[:, 1].astype(np.int64)
    trail = np.empty(o.size, np.int64)
    trail[:-1] = np.ascontiguousarray(rows[1:, :4]).view(endian + "u4")[:, 0]
    end = int(o[-1] + blen[-1])
    trail[-1] = struct.unpack_from(endian + "I", mm, end - 4)[0] if 4 <= end <= n else -1
    bad = np.flatnonzero(trail != blen)
    if bad.size:
        i = int(bad[0])
        raise CaptureError(
            f"{name}: garbled block at byte {int(o[i])} (block {first_block + i + 1}): "
            f"length {int(blen[i])} at its start, {int(trail[i])} at its end"
        )
    shb = int(o[0])
    if int(blen[0]) < 28:
        raise CaptureError(f"{name}: garbled section header at byte {shb}: length {int(blen[0])}")
    vmaj = struct.unpack_from(endian + "H", mm, shb + 12)[0]
    if vmaj != 1:
        raise CaptureError(f"{name}: garbled section header at byte {shb} (version {vmaj}, expected 1)")

    ifaces: list[_Iface] = []
    for j in np.flatnonzero(btype == _BT_IDB).tolist():
        desc = _parse_idb(mm, name, endian, int(o[j]), int(blen[j]))
        if desc.res > MAX_PLAUSIBLE_RES:
            notes.append(
                f"{name}: interface description at byte {int(o[j])}: if_tsresol of {desc.res:.3g} "
                "ticks a second is finer than a picosecond; its timestamps are probably garbled"
            )
        ifaces.append(desc)

    pkt = np.flatnonzero((btype == _BT_EPB) | (btype == _BT_PB) | (btype == _BT_SPB))
    if pkt.size == 0:
        return None
    po, ph, pt, pl = o[pkt], hdr[pkt], btype[pkt], blen[pkt]
    spb = pt == _BT_SPB
    short = pl < np.where(spb, 16, 32)
    if short.any():
        i = int(np.flatnonzero(short)[0])
        raise CaptureError(
            f"{name}: garbled packet block at byte {int(po[i])} (block {first_block + int(pkt[i]) + 1}): "
            f"length {int(pl[i])}"
        )
    # EPB: interface u32 at +8; obsolete PB: interface u16 at +8, then a drop count
    word = ph[:, 2]
    pb_iface = (word >> 16) if endian == ">" else (word & 0xFFFF)
    iface = np.where(spb, 0, np.where(pt == _BT_PB, pb_iface, word)).astype(np.int64)
    if not ifaces or iface.max() >= len(ifaces):
        i = int(np.flatnonzero(iface >= len(ifaces))[0])
        raise CaptureError(
            f"{name}: garbled packet block at byte {int(po[i])} (block {first_block + int(pkt[i]) + 1}): "
            f"interface {int(iface[i])} but the section describes {len(ifaces)}"
        )

    def pick(values: list[int], dtype: type) -> npt.NDArray[Any]:
        """A per-interface value for each packet (a scalar when there is one interface)."""
        arr: npt.NDArray[Any] = np.array(values, dtype=dtype)
        return arr[:1] if arr.size == 1 else arr[iface]

    lt = np.broadcast_to(pick([f.linktype for f in ifaces], np.int64), iface.shape)
    badlt = np.flatnonzero(~np.isin(lt, list(LINK_TYPES)))
    if badlt.size:
        i = int(badlt[0])
        raise _unsupported(name, int(lt[i]), f" (packet block at byte {int(po[i])})")
    if spb.any():
        orig = np.where(spb, ph[:, 2], ph[:, 6]).astype(np.int64)
        snap = pick([f.snaplen or MAX_RECORD for f in ifaces], np.int64)
        cap = np.where(spb, np.minimum(np.minimum(orig, snap), pl - 16), ph[:, 5].astype(np.int64))
        data = po + np.where(spb, 12, 28)
        room = pl - np.where(spb, 16, 32)
    else:  # the usual case: enhanced packet blocks only
        orig, cap = ph[:, 6].astype(np.int64), ph[:, 5].astype(np.int64)
        data, room = po + 28, pl - 32
    over = np.flatnonzero(cap > room)
    if over.size:
        i = int(over[0])
        raise CaptureError(
            f"{name}: garbled packet block at byte {int(po[i])} (block {first_block + int(pkt[i]) + 1}): "
            f"captured length {int(cap[i])} does not fit its block"
        )
    ticks = (ph[:, 3].astype(np.uint64) << np.uint64(32)) | ph[:, 4].astype(np.uint64)
    res = pick([f.res for f in ifaces], np.uint64)
    toff = pick([f.offset for f in ifaces], np.float64)
    whole = (ticks // res).astype(np.float64)
    times = whole + (ticks % res).astype(np.float64) / res.astype(np.float64) + toff
    times[spb] = np.nan
    col0: I64 | int = np.where(spb, 4 + 12, 4 + 28) if spb.any() else 4 + 28
    return (
        (data, cap, orig, times, pkt + first_block, np.ascontiguousarray(lt)),
        {f.linktype for f in ifaces},
        (rows, pkt, col0),
    )


def _parse_idb(mm: mmap.mmap, name: str, endian: str, off: int, blen: int) -> _Iface:
    if blen < 20:
        raise CaptureError(f"{name}: garbled interface description at byte {off}: length {blen}")
    linktype, _res, snaplen = struct.unpack_from(endian + "HHI", mm, off + 8)
    iface = _Iface(linktype, snaplen)
    pos, end = off + 16, off + blen - 4
    while pos + 4 <= end:
        code, olen = struct.unpack_from(endian + "HH", mm, pos)
        if code == 0:
            break
        if pos + 4 + olen > end:
            raise CaptureError(
                f"{name}: garbled interface description at byte {off}: option {code} at byte {pos} "
                "runs past the block"
            )
        if code == 9 and olen >= 1:  # if_tsresol
            v = mm[pos + 4]
            exp = v & 0x7F
            iface.res = (2**exp) if v & 0x80 else (10**exp)
            if iface.res >= 2**64:
                raise CaptureError(
                    f"{name}: garbled interface description at byte {off}: if_tsresol 0x{v:02x}"
                )
        elif code == 14 and olen >= 8:  # if_tsoffset, seconds
            iface.offset = struct.unpack_from(endian + "q", mm, pos + 4)[0]
        pos += 4 + ((olen + 3) & ~3)
    return iface


# frames -----------------------------------------------------------------------


def _classify(u8: npt.NDArray[np.uint8], pk: _Packets, filt: CandidateFilter, name: str) -> Candidates:
    """Copy out every frame's first bytes (unless the reader already did) and
    hand them to the one classifier."""
    hdr, rowidx, col0 = pk.hdr if pk.hdr is not None else (_rows(u8, pk.data, _HDR), None, 0)
    c = classify(hdr, pk.caplen, pk.origlen, pk.times, filt, rowidx, col0, pk.lt)
    if c.untimed and not c.candidates:
        raise CaptureError(
            f"{name}: all {c.untimed} candidate packets are in simple packet blocks, "
            "which carry no timestamps"
        )
    c.linktypes = pk.linktypes
    return c
