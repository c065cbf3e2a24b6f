"""Protocol ``edges``: the end-user agent's encoder and the ISP's count decoder.

The agent looks every p/5, times the stall itself and sends the toggle count
that the count estimator decodes to that duration (docs/user-agent.md). These
tests round-trip any stall duration and look phase through the encoder and
the real engine, check that no burst is odd, that both sides define the
shared constants alike, that the paper's estimator still sees new-protocol
stalls, and that the user-action filters still keep the agent silent.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iqn_ctl.engine import params as P
from iqn_ctl.engine.synth import SignalModel, edges_bursts, edges_toggles
from iqn_ctl.engine.tracker import StallEnded, StallTracker
from user_agent import protocol as UA
from user_agent.detector import DetectorConfig, Kind, StallDetector
from user_agent.grid import grid_from_gray

T0 = 1.7e9


def encode(
    start: float, duration: float, phase: float, p: float, n: int
) -> tuple[list[float], list[int], float]:
    """Looks every p/LOOKS_PER_P from ``phase``; a look says STALL when it and
    the grab p before it both lie inside the stall (the agent's phase
    detectors). Returns burst times, burst sizes, and the look interval."""
    look = p / UA.LOOKS_PER_P
    # this simulated detector is the ideal one (its verdict comes exactly p after
    # the start): the encoder is told so; DETECT_LAG_P is calibrated for a real player
    enc = UA.EdgeEncoder(p, n, look, lag_p=UA.IDEAL_LAG_P, lead=0.0)
    times: list[float] = []
    sizes: list[int] = []
    end = start + duration
    t = start - 2 * p + phase
    while t < end + 3 * p:
        k = enc.step(t, t - p > start and t < end)
        if k:
            times.append(t)
            sizes.append(k)
        t += look
    return times, sizes, look


def arrivals(times: list[float], sizes: list[int]) -> np.ndarray:
    return np.sort(np.concatenate([t + 0.001 * np.arange(k) for t, k in zip(times, sizes, strict=True)]))


def stalls_of(arr: np.ndarray, prm: P.SignalParams, est: str) -> list[StallEnded]:
    tr = StallTracker(prm, est)
    return [e for e in tr.feed(arr) + tr.close() if isinstance(e, StallEnded)]


@settings(max_examples=300, deadline=None)
@given(
    duration=st.floats(0.05, 120.0),
    phase=st.floats(0.0, 1.0, exclude_max=True),
    p=st.sampled_from([0.1, 0.2, 0.5]),
    n=st.sampled_from([2, 4, 6, 8]),
)
def test_any_stall_round_trips_through_the_engine_within_the_resolution(
    duration: float, phase: float, p: float, n: int
) -> None:
    """Encoding (+-p/n) plus detection (+-one look) is the stated resolution;
    the ISP's count estimator, fed the arrivals, recovers the duration within it."""
    look = p / UA.LOOKS_PER_P
    times, sizes, _ = encode(T0, duration, phase * look, p, n)
    assert all(k > 0 and k % 2 == 0 for k in sizes), sizes  # the switch ends as the user left it
    total = sum(sizes)
    if duration + look < (1 + P.COUNT_OFFSET - 1 / n) * p - 1e-9:
        # too short to owe a first burst: nothing at all, never a lone partial burst
        assert total == 0
    if total == 0:
        return
    assert sizes[0] == n  # the first burst is a whole one: the ISP's start window needs n
    # at most n toggles per p of stall (the paper protocol's cost), rounding included
    assert total <= n * duration / p + 1
    prm = P.SignalParams(p, n)
    got = stalls_of(arrivals(times, sizes), prm, "count")
    assert len(got) == 1
    assert abs(got[0].duration - duration) <= p / n + look + 1e-6
    assert abs(UA.decode(total, p, n) - got[0].duration) < 1e-6  # epoch floats: ulp 2e-7


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 0.2), st.booleans(), st.booleans()), max_size=300))
def test_no_burst_is_ever_odd_whatever_the_verdicts(steps: list[tuple[float, bool, bool]]) -> None:
    """Any sequence of verdicts (stalls, still looks, gaps in time): every
    burst is even, and over the run no more than n per p of open stall plus
    one burst's rounding per stall."""
    enc = UA.EdgeEncoder(0.2, 4, 0.04)
    t = T0
    for dt, stall, hold in steps:
        t += dt
        k = enc.step(t, stall, hold)
        assert k >= 0 and k % 2 == 0


@settings(max_examples=150, deadline=None)
@given(
    verdicts=st.lists(st.booleans(), max_size=200),
    p=st.sampled_from([0.2, 0.5]),
    n=st.sampled_from([2, 4, 8]),
)
def test_the_isps_model_of_the_agent_is_the_agents_encoder(verdicts: list[bool], p: float, n: int) -> None:
    """engine.synth's edges model (used by the research sweep and the engine's
    equivalence tests) sends what the user agent's encoder sends."""
    look = p / UA.LOOKS_PER_P
    looks = T0 + look * np.arange(len(verdicts) + 1)
    flags = np.array([*verdicts, False])
    times, sizes = edges_bursts(looks, flags, SignalModel(P.SignalParams(p, n), protocol="edges"))
    enc = UA.EdgeEncoder(p, n, look, lag_p=UA.IDEAL_LAG_P, lead=0.0)  # engine.synth models the ideal player
    pairs = zip(looks.tolist(), flags.tolist(), strict=True)
    want = [(float(t), k) for t, v in pairs if (k := enc.step(t, v))]
    assert list(zip(times.tolist(), sizes.tolist(), strict=True)) == want


@pytest.mark.parametrize("duration", [0.3, 0.45, 1.0, 2.37, 10.0])
def test_both_sides_encode_alike(duration: float) -> None:
    assert edges_toggles(duration, P.SignalParams(0.2, 4)) == UA.toggles_for(duration, 0.2, 4)


def test_shared_protocol_constants_agree() -> None:
    """Each side keeps its own definition (user_agent imports nothing of ours)."""
    assert UA.COUNT_OFFSET == P.COUNT_OFFSET
    assert UA.LOOKS_PER_P == P.EDGES_LOOKS_PER_P
    assert (UA.DEFAULT_P, UA.DEFAULT_N) == (P.DEFAULT_P, P.DEFAULT_N)


@pytest.mark.parametrize("duration", [0.6, 1.3, 3.0, 7.9])
def test_the_papers_estimator_still_sees_new_protocol_stalls(duration: float) -> None:
    """An ISP running the paper's estimator finds each stall once, shorter by
    about the first burst's delay (less precisely, but found)."""
    times, sizes, _ = encode(T0, duration, 0.013, 0.2, 4)
    # a later candidate (other traffic) is the packet that closes it in the paper's loop
    arr = np.append(arrivals(times, sizes), T0 + 60)
    got = stalls_of(arr, P.SignalParams(), "paper")
    assert len(got) == 1
    assert got[0].start < T0 + duration and got[0].end > T0
    assert abs(got[0].duration - duration) < 0.5


def test_old_protocol_signals_decode_as_before() -> None:
    """The paper's protocol (one burst of n per p-look in the stall) through the
    count estimator: (bursts + COUNT_OFFSET) p, the published decoder."""
    shots = T0 + 0.2 * np.arange(12)
    arr = np.sort((shots[:, None] + 0.001 * np.arange(4)[None, :]).ravel())
    (got,) = stalls_of(arr, P.SignalParams(), "count")
    assert math.isclose(got.duration, (12 + 0.5) * 0.2)


# -- the user-action filter still silences the agent ---------------------------

W, H = 320, 180


def scene(seed: int, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    x = x - shift
    img = np.full((H, W), 90.0, dtype=np.float32)
    for _ in range(10):
        cx, cy, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(10, 45)
        img += rng.uniform(-80, 80) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    img += 70.0 * ((np.floor(x / 13) + np.floor(y / 11)) % 2)
    return np.clip(img, 0, 255)


def spinner(img: np.ndarray, angle: float) -> np.ndarray:
    out = img.copy()
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    dx, dy = x - W / 2, y - H / 2
    r = np.hypot(dx, dy)
    ring = (r <= 20) & (r >= 14)
    a = (np.arctan2(dy, dx) - angle) % (2 * math.pi)
    out[ring] = out[ring] * 0.75 + 64
    out[ring & (a < math.pi / 2)] = 255
    return out


def agent_toggles(
    frames: list[np.ndarray], inputs: tuple[float, ...] = (), p: float = 0.2
) -> tuple[int, list[str]]:
    """The agent's protocol-edges path without a screen: one detector per look
    phase, the encoder, as run_agent wires them. Frame i is the look at i*look."""
    look = p / UA.LOOKS_PER_P
    phases = [StallDetector(DetectorConfig()) for _ in range(UA.LOOKS_PER_P)]
    enc = UA.EdgeEncoder(p, 4, look)
    total, reasons = 0, []
    for i, f in enumerate(frames):
        t = 100.0 + i * look
        for t_in in inputs:
            if t_in <= t:
                for d in phases:
                    d.note_input(t_in)
        v = phases[i % len(phases)].frame(t, grid_from_gray(f))
        reasons.append(v.reason if v.kind is Kind.FILTERED else v.kind.value)
        total += enc.step(t, v.stall, v.kind in (Kind.STILL, Kind.NONE))
    return total + enc.close(100.0 + len(frames) * look), reasons


def stall_frames(img: np.ndarray, k: int) -> list[np.ndarray]:
    return [spinner(img, i * 2 * math.pi / 25 + 0.3) for i in range(k)]


def test_a_real_stall_is_signalled_by_the_phase_detectors() -> None:
    total, reasons = agent_toggles(stall_frames(scene(3), 40))  # 1.6 s frozen with a turning spinner
    assert "stall" in reasons
    assert total >= 4 and total % 2 == 0


def test_no_signal_while_the_user_clicked_over_the_player() -> None:
    """A click (pause, a menu) animates the centre over a frozen picture: for
    input_quiet after it, no look may signal, in any phase."""
    frames = stall_frames(scene(4), 24)  # 0.96 s, all within input_quiet of the click
    total, reasons = agent_toggles(frames, inputs=(100.0,))
    assert total == 0
    assert "input" in reasons and "stall" not in reasons


def test_no_signal_for_rebuffering_right_after_a_seek() -> None:
    """A seek jumps the whole picture, then the player rebuffers: held back for
    seek_holdoff in every phase detector, so nothing goes out."""
    before = [scene(5, shift=2 * i) for i in range(10)]
    after = stall_frames(scene(6), 20)  # 0.8 s < seek_holdoff after the jump
    total, reasons = agent_toggles(before + after)
    assert total == 0
    assert "seek" in reasons and "stall" not in reasons


# -- the research sweep compares the protocols on the same stalls ---------------


def test_sweep_compares_protocols_on_the_same_stalls() -> None:
    """Counting keeps its edge under the paper's ~1 s jitter: on the same
    stalls, protocol edges through the count estimator is no worse than the
    paper protocol, clean or jittered."""
    from iqn_ctl.evaluate.research import SynthSpec, sweep

    grid = {"p": [0.2], "n": [4], "jitter": [0.0, 1.0], "loss": [0.0]}
    rows = sweep(grid, SynthSpec(stalls=80, seed=3), estimators=("count",), protocols=("tick", "edges"))
    mae = {(r["protocol"], r["jitter"]): float(r["mae_ms"]) for r in rows}  # type: ignore[arg-type]
    assert set(mae) == {("tick", 0.0), ("tick", 1.0), ("edges", 0.0), ("edges", 1.0)}
    assert all(int(r["matched"]) >= 76 for r in rows)  # type: ignore[call-overload]
    assert mae[("edges", 0.0)] < 0.5 * mae[("tick", 0.0)]
    assert mae[("edges", 1.0)] <= mae[("tick", 1.0)]


def test_sweep_refuses_an_unknown_protocol() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "iqn_ctl", "sweep", "--protocol", "morse", "--stalls", "2"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.startswith("iqn-ctl: error: --protocol") and r.stderr.count("\n") == 1, r.stderr


def test_edges_times_the_edges_from_the_looks_actually_taken() -> None:
    """A loaded box skips looks. The stall's start lies between the previous
    look's reference grab and this look's, its end between the last look that
    saw it and the first that did not: the encoder takes the midpoints of the
    actual gaps, not half a nominal look (which made durations long when the
    looks around the end were skipped)."""
    p, n, look = 0.2, 4, 0.04
    enc = UA.EdgeEncoder(p, n, look, lag_p=UA.IDEAL_LAG_P, lead=0.0)
    t = T0
    enc.step(t, False, ref=t - p)
    t2 = t + 3 * look  # two looks skipped: the freeze came after t - p, by t2 - p
    enc.step(t2, True, ref=t2 - p)
    assert enc.began == pytest.approx((t - p + t2 - p) / 2, abs=1e-6)
    last = t2 + 40 * look
    for k in range(1, 41):
        enc.step(t2 + k * look, True, ref=t2 + k * look - p)
    end_look = last + 4 * look  # three looks skipped before playback was seen
    enc.step(end_look, False, ref=end_look - p)
    assert enc.ended == pytest.approx((last + end_look) / 2, abs=1e-6)


def test_a_real_players_stall_begins_one_frame_after_its_picture_froze() -> None:
    """The detector sees when the screen stopped changing: when the last frame
    appeared. The player stalls (and shows its spinner) only once the next frame
    is due and missing, so the encoder puts the start FREEZE_LEAD after that;
    an ideal player (lead 0) stalls the moment its picture freezes. The end
    (the first new frame) is the same for both, so the duration is FREEZE_LEAD shorter."""
    p, n, look = 0.2, 4, 0.04
    got = {}
    for lead in (0.0, UA.FREEZE_LEAD):
        enc = UA.EdgeEncoder(p, n, look, lead=lead)
        t = T0
        enc.step(t, False, ref=t - p)
        enc.step(t + look, True, ref=t + look - p)
        began = enc.began
        for k in range(2, 60):
            enc.step(t + k * look, True, ref=t + k * look - p)
        enc.step(t + 60 * look, False, ref=t + 60 * look - p)
        assert began is not None
        got[lead] = (began, enc.ended)
    assert UA.FREEZE_LEAD > 0
    (b0, e0), (b1, e1) = got[0.0], got[UA.FREEZE_LEAD]
    assert b0 == pytest.approx(T0 + look / 2 - p, abs=1e-6)  # midway between the reference grabs
    assert b1 == pytest.approx(b0 + UA.FREEZE_LEAD, abs=1e-6)
    assert e1 == pytest.approx(e0, abs=1e-9)
