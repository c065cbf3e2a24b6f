"""Replay's post-processing reads the rebuilt counters when the live agent
would read the kernel's (no root; the live comparison is tests/test_replay_live.py).

The agent, driven by its clock, judges a stall's end as soon as the end
condition holds; a batch feed of the capture learns of that end only from the
flow's next candidate, which may come much later. Video the same connection
carries in between must not count against the stall.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iqn_ctl.capture.frames import udp_frame
from iqn_ctl.capture.pcapwrite import Packet, write_pcap
from iqn_ctl.engine.params import CandidateFilter, SignalParams
from iqn_ctl.engine.synth import SignalModel, signal_times
from iqn_ctl.evaluate.replay import replay_capture_full

T0 = 1_700_000_000.0
SRV, CLI = "198.18.0.10", "198.18.1.2"


def _capture(path: Path) -> None:
    """One connection: a signalled stall, 2 s of video (1,292-byte frames, 400/s)
    after it ended, then a second signalled stall."""
    rng = np.random.default_rng(1)
    signal = signal_times([(T0, T0 + 2.0), (T0 + 8.0, T0 + 10.0)], SignalModel(), rng)
    cand = udp_frame(SRV, CLI, 443, 50000, 1250)
    video = udp_frame(SRV, CLI, 443, 50000, 1292)
    pk = [Packet(float(t), cand) for t in signal]
    pk += [Packet(T0 + 4.0 + i / 400, video) for i in range(800)]
    pk.sort(key=lambda p: p.time)
    write_pcap(path, pk)


def test_video_after_a_stall_ended_does_not_discard_it(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    _capture(path)
    got = replay_capture_full(path, SignalParams(), "count", CandidateFilter(), bulk_ratio=2.0)
    assert len(got.stalls) == 2 and got.discarded == [], got
    assert [s.bulk_check for s in got.stalls] == ["ok", "ok"]
    # the same stalls as with the rule off: it judged, and kept both
    off = replay_capture_full(path, SignalParams(), "count", CandidateFilter(), bulk_ratio=0.0)
    assert [(s.start, s.end) for s in off.stalls] == [(s.start, s.end) for s in got.stalls]
    assert [s.bulk_check for s in off.stalls] == ["off", "off"]


def test_video_during_a_stall_discards_it(tmp_path: Path) -> None:
    """The counterpart: the same video inside the stall makes it bulk."""
    rng = np.random.default_rng(2)
    signal = signal_times([(T0, T0 + 3.0)], SignalModel(), rng)
    cand = udp_frame(SRV, CLI, 443, 50000, 1250)
    video = udp_frame(SRV, CLI, 443, 50000, 1292)
    pk = [Packet(float(t), cand) for t in signal] + [Packet(T0 + 0.5 + i / 400, video) for i in range(800)]
    pk.sort(key=lambda p: p.time)
    write_pcap(tmp_path / "cap.pcap", pk)
    got = replay_capture_full(tmp_path / "cap.pcap", SignalParams(), "count", CandidateFilter(),
                              bulk_ratio=2.0)  # fmt: skip
    assert got.stalls == [] and len(got.discarded) == 1, got
