"""The kernel's burst grouping (``burst_add`` in iqn_xdp.c) equals its Python
twin (``engine.bursts.group_slots``) on random candidate sequences.

Frames go in one by one through BPF_PROG_TEST_RUN, from one pinned CPU, with
random pauses longer than the burst gap between some of them; the kernel
stamps them with bpf_ktime_get_ns(), which runs in real time, so the twin is
fed the times the kernel's records carry (every record holds every
candidate's time) and the slots the kernel's hash picks. A tiny table (4
slots per CPU) makes flows collide, so closing a burst because another flow
took its slot is exercised too. Records still open at the end are read from
the mapped table, as the agent's sweep does.
"""

from __future__ import annotations

import os
import random
import struct
import time

import numpy as np
import pytest
from test_agent_live import need_xdp

from iqn_ctl.capture.frames import udp_frame
from iqn_ctl.engine.bursts import GAP_NS, group_slots
from iqn_ctl.engine.params import CandidateFilter
from iqn_ctl.live import bpf_testrun
from iqn_ctl.live.layout import flow_hashes

FILT = CandidateFilter()
SLOTS = 4


Burst = tuple[bytes, int, tuple[int, ...]]


def _kernel_bursts(dp) -> tuple[list[Burst], list[Burst]]:  # type: ignore[no-untyped-def]
    """(records in the ring, bursts still open in the table)."""
    ring, still = [], []
    batch = dp.poll_bursts(0, sweep=False)
    for i, key in enumerate(batch.keys):
        c = int(batch.count[i])
        ring.append((key, int(batch.first[i]), tuple(batch.off[i, :c].tolist())))
    tab = dp._taker.table
    for r in tab[tab["count"] > 0]:
        c = int(r["count"])
        still.append((bytes(r["key"]), int(r["first_ns"]), tuple(r["off"][:c].tolist())))
    return ring, still


@pytest.mark.parametrize("n,seed", [(4, 1), (3, 2), (1, 3), (12, 4)])
def test_kernel_grouping_equals_the_python_twin(n: int, seed: int) -> None:
    need_xdp()
    from iqn_ctl.live.datapath import Datapath

    rnd = random.Random(seed)
    ports = [40000 + i for i in range(6)]
    cands = {p: udp_frame("198.18.0.1", "198.18.0.2", FILT.port, p, frame_len=1200) for p in ports}
    other = udp_frame("198.18.0.1", "198.18.0.2", FILT.port, ports[0], frame_len=1400)
    old = os.sched_getaffinity(0)
    cpu = min(old)
    os.sched_setaffinity(0, {cpu})
    try:
        with Datapath("lo", FILT, n=n, burst_slots=SLOTS) as dp:
            runner = bpf_testrun.TestRunner(dp.prog_fd)
            sent: list[int] = []  # the client port of each candidate, in sending order
            port = ports[0]
            for _ in range(160):
                if rnd.random() < 0.3:
                    port = rnd.choice(ports)
                runner.run(cands[port])
                sent.append(port)
                r = rnd.random()
                if r < 0.1:
                    runner.run(other)  # volume only: never part of a burst
                elif r < 0.35:
                    time.sleep((GAP_NS + 2_000_000) / 1e9)
            assert dp.counters()["candidates"] == len(sent) and dp.counters()["lost"] == 0
            ring, still = _kernel_bursts(dp)
    finally:
        os.sched_setaffinity(0, old)
    assert all(len(o) < n for _, _, o in still), "a burst of n goes to the ring at once"
    kernel = ring + still
    assert sum(len(o) for _, _, o in kernel) == len(sent)
    # the twin, fed the kernel's own stamps in arrival order (one CPU, one frame at a
    # time: the i-th stamp is the i-th frame sent), each with the flow it was sent on
    keys = sorted({k for k, _, _ in kernel})
    assert {struct.unpack("!H", k[34:36])[0] for k in keys} == set(sent)
    keys = sorted(keys, key=lambda k: struct.unpack("!H", k[34:36])[0])
    fid = {struct.unpack("!H", k[34:36])[0]: i for i, k in enumerate(keys)}
    times = sorted(first + o for _, first, offs in kernel for o in offs)
    assert len(set(times)) == len(times), "bpf_ktime_get_ns() stamps are distinct on one CPU"
    flows = [fid[p] for p in sent]
    hashes = flow_hashes(keys)
    slot_of = (cpu * SLOTS + (hashes & np.uint64(SLOTS - 1)).astype(np.int64)).tolist()
    twin, _ = group_slots(flows, times, [slot_of[f] for f in flows], n)
    want = sorted(
        (keys[int(twin.flow[i])], int(twin.first[i]), tuple(twin.off[i, : int(twin.count[i])].tolist()))
        for i in range(len(twin)))
    assert sorted(kernel) == want
    assert len(keys) > SLOTS or n == 1, "flows must collide in the small table"
