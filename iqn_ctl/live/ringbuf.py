"""Read a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) of fixed-size records in
batches, straight from its memory map.

Why not bcc's ``open_ring_buffer``: it calls a Python function per record
(about a microsecond each), which caps the agent far below the data plane's
rate. The ring is plain shared memory (kernel's ``bpf_ringbuf`` layout:
a consumer page we write, a producer page and the data area mapped twice in
a row, so a record that wraps is still contiguous), so one poll can take
every committed record at once as a numpy view and hand back a few arrays.

Records are 8-byte headers (length with a BUSY and a DISCARD bit, page
offset) followed by the data, padded to 8 bytes. All of ours have the same
size, so the batch is one strided array; reading stops at the first record
still being written (BUSY), which the next poll picks up.

Memory ordering: the kernel publishes a record by clearing its BUSY bit with
a release store after writing it; we read the headers before the data. That
is sufficient on x86 (loads are not reordered with loads), where IQN runs.
"""

from __future__ import annotations

import contextlib
import mmap
import select

import numpy as np
import numpy.typing as npt

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8


class RingReader:
    """Consumer of one BPF ring buffer map whose records all carry ``size``
    bytes of data (``dtype`` describes them)."""

    def __init__(self, map_fd: int, data_bytes: int, dtype: np.dtype) -> None:
        if data_bytes <= 0 or data_bytes & (data_bytes - 1) or data_bytes % mmap.PAGESIZE:
            raise ValueError(f"ring size must be a power-of-two number of pages, got {data_bytes}")
        page = mmap.PAGESIZE
        self.data_bytes = data_bytes
        self._mask = data_bytes - 1
        self._rec = (_HDR + dtype.itemsize + 7) & ~7
        if data_bytes % self._rec:
            raise ValueError(f"record size {self._rec} does not divide the ring size {data_bytes}")
        self._want = dtype.itemsize  # a committed record's header: its data length, no BUSY/DISCARD bit
        pad = self._rec - _HDR - dtype.itemsize
        self._dtype = np.dtype([("hdr", "<u4"), ("pgoff", "<u4"), ("rec", dtype)]
                               + ([("tail", f"V{pad}")] if pad else []))
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, page + 2 * data_bytes, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=page)
        self._data = memoryview(self._prod)[page:]
        # the positions, read and written as whole aligned 8-byte words: struct's
        # byte-wise packing could let the kernel see a torn, too large consumer
        # position (and fail reservations), or us a torn producer position
        self._cons_pos = np.frombuffer(self._cons, np.uint64, count=1)
        self._prod_pos = np.frombuffer(self._prod, np.uint64, count=1)
        self._ep = select.epoll()
        self._ep.register(map_fd, select.EPOLLIN)
        self._closed = False

    def wait(self, timeout_ms: int) -> None:
        """Sleep until the kernel wakes us (enough data, see iqn_xdp.c) or
        ``timeout_ms`` passes; returns at once if data waits since the last read."""
        if timeout_ms > 0 and self.pending() == 0:
            self._ep.poll(timeout_ms / 1000)

    def pending(self) -> int:
        """Bytes written by the kernel and not yet consumed."""
        return int(self._prod_pos[0]) - int(self._cons_pos[0])

    def read(self) -> npt.NDArray[np.void]:
        """Every committed record since the last read, in ring order, as a
        copy (the space is handed back to the kernel at once)."""
        cons = int(self._cons_pos[0])
        prod = int(self._prod_pos[0])
        n = (prod - cons) // self._rec
        if n <= 0:
            return np.empty(0, self._dtype["rec"])
        start = cons & self._mask
        view = np.frombuffer(self._data, self._dtype, count=n, offset=start)
        ok = view["hdr"] == self._want
        if not ok.all():
            bad = int(np.argmin(ok))
            hdr = int(view["hdr"][bad])  # read again: it may have been committed meanwhile
            if not hdr & _BUSY and hdr != self._want:
                raise RuntimeError(f"unexpected ring record header {hdr:#x} (size or discard)")
            n = bad  # still being written when we looked: it and the rest wait for the next read
        # one memcpy of the records, headers and all, and a field view of it: numpy's
        # copy of the structured field alone goes field by field (~27 ns a record
        # against ~2.5 measured)
        out = np.frombuffer(bytearray(self._data[start:start + n * self._rec]), self._dtype)["rec"]
        self._cons_pos[0] = cons + n * self._rec
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ep.close()
        # an array still viewing the map (say, in a traceback) keeps it open; the GC unmaps it later
        del self._cons_pos, self._prod_pos
        with contextlib.suppress(BufferError):
            self._data.release()
            self._prod.close()
            self._cons.close()
