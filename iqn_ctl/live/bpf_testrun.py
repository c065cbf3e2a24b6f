"""The bpf() syscall through ctypes: BPF_PROG_TEST_RUN, the few object
look-ups the data plane needs, and one program load under a name of our choosing.

BPF_PROG_TEST_RUN runs a loaded program on a frame we hand it, in the kernel,
with the real verifier-checked code and real maps: it is how the tests check
candidate decisions and how the benchmark times the program, without any
traffic or interface. bcc exposes none of this, and bpftool would cost a
process per frame, hence ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

# bpf(2) commands (include/uapi/linux/bpf.h)
BPF_MAP_LOOKUP_ELEM = 1
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}
_ATTR_SIZE = 128  # larger than every attr variant used here; the rest stays zero
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf() call failed; errno and the command are in the message."""


def _nr() -> int:
    try:
        return _SYS_BPF[platform.machine()]
    except KeyError:  # pragma: no cover - other architectures
        raise BpfError(errno.ENOSYS, f"bpf() syscall number unknown on {platform.machine()}") from None


_NR_BPF = _nr()


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    """One bpf(2) call; returns its non-negative result or raises BpfError."""
    res = _libc.syscall(_NR_BPF, ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if res < 0:
        e = ctypes.get_errno()
        raise BpfError(e, f"bpf(cmd={cmd}) failed: {os.strerror(e)}")
    return int(res)


def _put(attr: ctypes.Array[ctypes.c_char], off: int, ctype: type, value: int) -> None:
    ctype.from_buffer(attr, off).value = value  # type: ignore[attr-defined]


def _get(attr: ctypes.Array[ctypes.c_char], off: int, ctype: type) -> int:
    return int(ctype.from_buffer(attr, off).value)  # type: ignore[attr-defined]


class TestRunner:
    """Repeated BPF_PROG_TEST_RUN on one program with one reusable attr buffer,
    so a fuzz loop of 100 k frames costs one syscall per frame and little else."""

    __test__ = False  # not a pytest class

    def __init__(self, prog_fd: int) -> None:
        self.prog_fd = prog_fd
        self._attr = ctypes.create_string_buffer(_ATTR_SIZE)

    def run(self, frame: bytes, repeat: int = 1) -> tuple[int, int]:
        """Run the program on ``frame`` ``repeat`` times; returns (its verdict,
        mean duration per run in ns as the kernel measured it).

        XDP programs get the frame as ``data``. SCHED_CLS (TC) programs get an
        skb the kernel builds from it on loopback: ``skb->data`` is the frame's
        first byte whatever it is (so a raw IP packet tests an L3 classifier
        too), ``skb->len`` its length, linear, no VLAN tag offloaded. The
        kernel refuses frames shorter than an Ethernet header (EINVAL) for
        both: XDP never sees those, and no IP packet is that short."""
        attr = self._attr
        ctypes.memset(attr, 0, _ATTR_SIZE)
        buf = ctypes.create_string_buffer(frame, len(frame)) if frame else None
        _put(attr, 0, ctypes.c_uint32, self.prog_fd)
        _put(attr, 8, ctypes.c_uint32, len(frame))
        _put(attr, 16, ctypes.c_uint64, ctypes.addressof(buf) if buf is not None else 0)
        _put(attr, 32, ctypes.c_uint32, repeat)
        bpf(BPF_PROG_TEST_RUN, attr)
        return _get(attr, 4, ctypes.c_uint32), _get(attr, 36, ctypes.c_uint32)


def run(prog_fd: int, frame: bytes, repeat: int = 1) -> tuple[int, int]:
    """(retval, duration_ns) of BPF_PROG_TEST_RUN of ``prog_fd`` on ``frame``."""
    return TestRunner(prog_fd).run(frame, repeat)


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes:
    """Raw value bytes for ``key`` (for per-CPU maps, value_size covers all
    possible CPUs, each slot rounded up to 8 bytes)."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    _put(attr, 0, ctypes.c_uint32, map_fd)
    _put(attr, 8, ctypes.c_uint64, ctypes.addressof(kbuf))
    _put(attr, 16, ctypes.c_uint64, ctypes.addressof(vbuf))
    bpf(BPF_MAP_LOOKUP_ELEM, attr)
    return vbuf.raw


def prog_name_by_id(prog_id: int) -> str:
    """Name of the loaded program ``prog_id`` (kernel keeps 15 characters)."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _put(attr, 0, ctypes.c_uint32, prog_id)
    fd = bpf(BPF_PROG_GET_FD_BY_ID, attr)
    try:
        # struct bpf_prog_info: name[16] sits at offset 64 (after type, id, tag[8],
        # jited/xlated lens and insn pointers, load_time, created_by_uid, nr_map_ids, map_ids)
        info = ctypes.create_string_buffer(256)
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        _put(attr, 0, ctypes.c_uint32, fd)
        _put(attr, 4, ctypes.c_uint32, len(info))
        _put(attr, 8, ctypes.c_uint64, ctypes.addressof(info))
        bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
        return info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)


#: bpf_prog_type of an XDP program (include/uapi/linux/bpf.h)
BPF_PROG_TYPE_XDP = 6
#: room for the verifier's log when a load is refused (its last line goes into the error)
_LOG_SIZE = 1 << 16


def load_prog(prog_type: int, insns: bytes, name: str, license: bytes = b"GPL") -> int:
    """Load ``insns`` (BPF instructions with their map fds already in place, as
    bcc's ``BPF.dump_func`` gives them) as a program named ``name`` (15
    characters kept); returns its fd, which the caller closes.

    Why not bcc's ``load_func``: it names the program after its C function, and
    the data plane's second XDP entry (``iqn_xdp_move``, attached only while the
    agent moves from TC back to XDP) must carry the name ``iqn_xdp`` too, which
    every tool and clean-up looks for. No BTF goes with it (bpftool shows no
    source lines for it), which the kernel does not need for this program. A
    refused load is retried once with the verifier's log, whose last line goes
    into the BpfError."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    try:
        return _prog_load(prog_type, code, lic, name, None)
    except BpfError as e:
        if e.errno == errno.EPERM:
            raise
    log = ctypes.create_string_buffer(_LOG_SIZE)
    try:
        return _prog_load(prog_type, code, lic, name, log)
    except BpfError as e:
        lines = log.value.decode(errors="replace").strip().splitlines()
        raise BpfError(e.errno, f"loading {name}: {os.strerror(e.errno or 0)}"
                                + (f" (verifier: {lines[-1]})" if lines else "")) from None


def _prog_load(prog_type: int, code: ctypes.Array[ctypes.c_char], lic: ctypes.Array[ctypes.c_char],
               name: str, log: ctypes.Array[ctypes.c_char] | None) -> int:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    # union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license,
    # log_level, log_size, log_buf, kern_version, prog_flags, prog_name[16] at 48
    _put(attr, 0, ctypes.c_uint32, prog_type)
    _put(attr, 4, ctypes.c_uint32, len(code) // 8)
    _put(attr, 8, ctypes.c_uint64, ctypes.addressof(code))
    _put(attr, 16, ctypes.c_uint64, ctypes.addressof(lic))
    if log is not None:
        _put(attr, 24, ctypes.c_uint32, 1)
        _put(attr, 28, ctypes.c_uint32, len(log))
        _put(attr, 32, ctypes.c_uint64, ctypes.addressof(log))
    raw = name.encode()[:15]
    ctypes.memmove(ctypes.addressof(attr) + 48, raw, len(raw))
    return bpf(BPF_PROG_LOAD, attr)


def possible_cpus() -> int:
    """Number of possible CPUs, the slot count of per-CPU map values."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


def prog_id_by_fd(prog_fd: int) -> int:
    """Kernel id of the program behind ``prog_fd`` (how `ip link` names attached programs)."""
    info = ctypes.create_string_buffer(256)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _put(attr, 0, ctypes.c_uint32, prog_fd)
    _put(attr, 4, ctypes.c_uint32, len(info))
    _put(attr, 8, ctypes.c_uint64, ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return int(ctypes.c_uint32.from_buffer(info, 4).value)
