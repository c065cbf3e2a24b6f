"""One candidate classifier: :mod:`iqn_ctl.capture.classify` (pcap replay, the
lab's capture) decides like the XDP program, frame by frame, through
BPF_PROG_TEST_RUN; and user space reads the kernel's structs through one
layout that is checked against the C."""

from __future__ import annotations

import ctypes
import time

from test_xdp_prog import FILT, Prog, _need_bpf, fuzz_frames, v4, v6

from iqn_ctl.capture.classify import classify_frames
from iqn_ctl.capture.frames import udp_frame
from iqn_ctl.live import layout
from iqn_lab.capture import Frame, candidates, parse

FRAMES = 30_000


def test_classifier_decides_like_the_kernel() -> None:
    """Every fuzzed frame: candidate for the classifier iff the kernel counted it
    as one, and the flow labels of the candidates equal those of the kernel's
    events, in order."""
    _need_bpf()
    frames = [f for f in fuzz_frames(seed=9090, count=FRAMES) if len(f) >= 14]  # XDP never sees less
    got = classify_frames(frames, [float(i) for i in range(len(frames))], FILT)
    p = Prog()
    try:
        kernel: list[int] = []
        stamped: list[tuple[bytes, float]] = []
        before = p.counter(1)
        for i, frame in enumerate(frames):
            p.runner.run(frame)
            now = p.counter(1)
            if now != before:
                kernel.append(i)
            before = now
            if i % 4096 == 0:
                stamped += p.dp.poll(0)
        time.sleep(0.02)  # short bursts still open are read once their gap has passed
        stamped += p.dp.poll(10)
        # a short burst is read after its gap has passed, maybe a poll after later candidates
        # of other flows: the kernel's timestamps give the order the frames were sent in
        labels = [layout.decode_key(k).label for k, _ in sorted(stamped, key=lambda e: e[1])]
        assert p.dp.counters()["lost"] == 0
    finally:
        p.close()
    assert len(kernel) > 1000, "the fuzz must produce candidates"
    assert got.frame_index.tolist() == kernel
    assert [got.labels[int(f)][0] for f in got.flow_ids] == labels


def test_lab_capture_candidates_are_the_classifiers() -> None:
    """The lab's capture picks candidates with the classifier: incoming only,
    port and size band from the filter, never a fragment."""
    mk = [
        (udp_frame("198.19.0.2", "198.19.0.1", 443, 51000, frame_len=1234), False),  # candidate
        (udp_frame("198.19.0.2", "198.19.0.1", 443, 51000, frame_len=1234), True),  # outgoing
        (udp_frame("198.19.0.2", "198.19.0.1", 8443, 51000, frame_len=1234), False),  # other port
        (udp_frame("198.19.0.2", "198.19.0.1", 443, 51000, frame_len=1400), False),  # too big
        (udp_frame("198.19.0.2", "198.19.0.1", 443, 51000, frame_len=1200, more_fragments=True), False),
        (udp_frame("198.19.0.3", "198.19.0.1", 443, 51001, frame_len=FILT.min_size), False),  # candidate
    ]
    frames: list[Frame] = []
    for i, (raw, out) in enumerate(mk):
        f = parse(raw, float(i), out)
        assert f is not None
        frames.append(f)
    assert candidates(frames, FILT) == [frames[0], frames[5]]


def test_kernel_struct_layout_is_checked_against_the_c() -> None:
    _need_bpf()
    p = Prog()
    try:
        leaf_t = p.dp._bpf[b"bursts"].Leaf
        key_t = dict(leaf_t._fields_)["key"]
        assert layout.check(key_t, layout.FlowKeyC) is None
        assert layout.check(leaf_t, layout.BurstC) is None
        assert layout.check(p.dp._bpf[b"vol_flow"].Leaf, layout.VolC) is None
        assert layout.check(p.dp._bpf[b"vol_client"].Leaf, layout.ClientVolC) is None
    finally:
        p.close()

    fields = list(layout.FlowKeyC._fields_)
    fields[2], fields[3] = fields[3], fields[2]  # dport before sport: same size, other layout

    class Swapped(ctypes.Structure):
        _fields_ = fields

    assert ctypes.sizeof(Swapped) == layout.KEY_SIZE
    problem = layout.check(key_t, Swapped)
    assert problem is not None and "Swapped" in problem


def test_classifier_labels_ipv4_and_ipv6() -> None:
    """The flow label (a contract) and the client address of each flow."""
    cases = ((v4(1200), "198.18.0.1:443>198.18.0.2:51234", "198.18.0.2"),
             (v6(1200), "[2001:db8::1]:443>[2001:db8::2]:51234", "2001:db8::2"))  # fmt: skip
    for frame, label, client in cases:
        got = classify_frames([frame], [1.0], FILT)
        assert got.labels == [(label, client)] and got.frame_index.tolist() == [0]
