"""One definition of a candidate on every hook and link (issue 18 part 3,
issue 12 item 5): the kernel classifier's two entries (XDP ``iqn_xdp`` and TC
``iqn_tc``), compiled for an Ethernet device and for a layer-3 device (frames
start at the IP header: tun, WireGuard, PPP), decide frame by frame like the
Python twin used by replay (:mod:`iqn_ctl.capture.classify`) with the matching
link type, through BPF_PROG_TEST_RUN; and the size band is the same "IP length
+ 14" rule on both sides."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from test_xdp_prog import FILT, _need_bpf, fuzz_frames, v4, v6

from iqn_ctl.capture.classify import ETH_HLEN, LINKTYPE_ETHERNET, classify_frames
from iqn_ctl.live import bpf_testrun, layout

FRAMES = 8_000  # per link and hook: 4 runs, a few seconds each
LINKTYPE_RAW = 101
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
#: TC_ACT_UNSPEC (-1) as the test run's u32 retval: no verdict, the next classifier runs
TC_ACT_UNSPEC, XDP_PASS = 0xFFFFFFFF, 2


@contextmanager
def tun_device() -> Iterator[str]:
    """A tun device (ARPHRD_NONE: frames start at the IP header) that lives as
    long as its file descriptor: nothing to clean up if the test dies."""
    name = f"iqhk{uuid.uuid4().hex[:8]}"
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        yield name
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def progs() -> Iterator[dict[str, Any]]:
    """The program compiled once per link: for Ethernet (on lo) and for a
    layer-3 device (on a tun device), each with both entries loaded."""
    _need_bpf()
    from iqn_ctl.live.datapath import Datapath

    with ExitStack() as stack:
        eth = stack.enter_context(Datapath("lo", FILT))
        name = stack.enter_context(tun_device())
        l3 = stack.enter_context(Datapath(name, FILT))
        assert not eth.device.l3 and l3.device.l3 and l3.device.arphrd == 65534
        yield {"ethernet": eth, "l3": l3}


def frames_for(link: str, seed: int) -> list[bytes]:
    """Fuzzed Ethernet frames; for a layer-3 device the same frames without
    their Ethernet header (VLAN-tagged ones then start with junk: not IP)."""
    eth = list(fuzz_frames(seed=seed, count=FRAMES))
    if link == "ethernet":
        return [f for f in eth if len(f) >= ETH_HLEN]
    return [f[ETH_HLEN:] for f in eth if len(f) >= 2 * ETH_HLEN]  # the kernel runs >= 14 bytes


@pytest.mark.parametrize("hook", ["xdp", "tc"])
@pytest.mark.parametrize("link", ["ethernet", "l3"])
def test_kernel_entries_decide_like_the_python_twin(progs: dict[str, Any], link: str, hook: str) -> None:
    """Every fuzzed frame is a candidate for the kernel entry iff it is one for
    the Python classifier with the link type a capture of that device has; the
    flow labels of the burst records' candidates agree in order (the band
    length itself is held to the Python side's rule at the band's edges, below)."""
    offered = frames_for(link, seed=4242)
    frames: list[bytes] = []  # what the kernel ran
    dp = progs[link]
    time.sleep(0.02)  # an open burst another test left is taken once its gap has passed
    dp.poll(0)  # nothing left from another test
    fd = dp.prog_fd if hook == "xdp" else dp.tc_prog_fd
    runner = bpf_testrun.TestRunner(fd)
    kernel: list[int] = []
    stamped: list[tuple[bytes, float]] = []
    before = dp.counters()["candidates"]
    for i, frame in enumerate(offered):
        try:
            verdict, _ = runner.run(frame)
        except bpf_testrun.BpfError as e:
            # the skb test run reads the IP header its first 14 bytes announce and
            # refuses a frame too short for it; XDP runs those (same iqn_packet)
            assert hook == "tc" and e.errno == errno.EINVAL, e
            continue
        frames.append(frame)
        assert verdict == (XDP_PASS if hook == "xdp" else TC_ACT_UNSPEC)
        now = dp.counters()["candidates"]
        if now != before:
            kernel.append(len(frames) - 1)
        before = now
        if i % 2048 == 0:
            stamped += dp.poll(0)
    time.sleep(0.02)  # short bursts still open are read once their gap has passed
    stamped += dp.poll(10)
    # a short burst is read after its gap has passed, maybe a poll after later candidates
    # of other flows: the kernel's timestamps give the order the frames were run in
    labels = [layout.decode_key(k).label for k, _ in sorted(stamped, key=lambda e: e[1])]
    assert dp.counters()["lost"] == 0
    assert len(frames) > 0.9 * len(offered) and len(kernel) > 300, "the fuzz must produce candidates"
    got = classify_frames(frames, [float(i) for i in range(len(frames))], FILT,
                          linktype=LINKTYPE_ETHERNET if link == "ethernet" else LINKTYPE_RAW)
    assert got.frame_index.tolist() == kernel
    assert [got.labels[int(f)][0] for f in got.flow_ids] == labels


@pytest.mark.parametrize("link", ["ethernet", "l3"])
def test_band_edges_on_both_entries(progs: dict[str, Any], link: str) -> None:
    """The band's edges, one byte inside and outside, IPv4 and IPv6: on a
    layer-3 device an IP packet of ``min_size - 14`` bytes is a candidate and one
    byte less is not, exactly as its Ethernet frame would be, on XDP and TC."""
    lo, hi = FILT.min_size, FILT.max_size
    cut = 0 if link == "ethernet" else ETH_HLEN
    cases = [(mk(n)[cut:], lo <= n <= hi) for mk in (v4, v6) for n in (lo - 1, lo, hi, hi + 1)]
    dp = progs[link]
    dp.poll(0)
    for fd in (dp.prog_fd, dp.tc_prog_fd):
        runner = bpf_testrun.TestRunner(fd)
        for frame, want in cases:
            before = dp.counters()["candidates"]
            runner.run(frame)
            assert (dp.counters()["candidates"] - before == 1) is want, (link, fd, len(frame))
    time.sleep(0.02)  # the last short burst is read once its gap has passed
    assert len(dp.poll(10)) == 2 * 4  # each in-band frame in a burst record, on both entries
