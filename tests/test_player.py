"""The signal player's sans-I/O parts: the playback buffer and the signal rhythm.

The buffer must stall exactly when a throttled download falls behind the play
head (and never while media is buffered), and a stalled player must send n
toggles per look, one look every p seconds: n/p toggles per stall-second, what
the ISP agent's engine expects of the end-user agent.
"""

from __future__ import annotations

import math

import pytest

from iqn_lab.player import BufferModel, Settings, Signaller, check_settings


def stream(seg_s: float, fetch_s: float, seconds: float, ahead: float = 4.0, startup: float = 2.0,
           resume: float = 2.0) -> tuple[BufferModel, list[float]]:
    """Drive the model as the player's fetch loop does: fetch the next one-second segment
    (taking ``fetch_s``) whenever less than ``ahead`` is buffered; returns the model and the
    arrival times."""
    m = BufferModel(0.0, startup, resume)
    t, arrivals = 0.0, []
    while t < seconds:
        level = m.ahead(t)
        if level >= ahead:
            t += level - ahead + 0.01
            continue
        t += fetch_s
        m.add(t, seg_s)
        arrivals.append(t)
    m.advance(seconds)
    return m, arrivals


def test_a_fast_download_stalls_only_at_startup() -> None:
    m, arrivals = stream(1.0, 0.3, 120.0)
    assert [s[2] for s in m.stalls] == [True]
    assert m.stalls[0] == (0.0, pytest.approx(0.6), True)  # two segments buffered: playback starts
    assert not m.stalled
    assert m.stalled_s(120.0) == pytest.approx(0.6)


@pytest.mark.parametrize("fetch_s", [1.1, 1.25, 1.6, 2.5])
def test_a_throttled_download_stalls_exactly_when_the_buffer_runs_dry(fetch_s: float) -> None:
    m, arrivals = stream(1.0, fetch_s, 200.0)
    stalls = [s for s in m.stalls if not s[2]]
    assert stalls, "a download slower than real time must stall"
    # Replay the arrivals independently: between two arrivals the play head moves at 1 s/s
    # while playing; a stall must start at the instant it meets the downloaded end.
    media, pos, playing, t_prev, starts = 0.0, 0.0, False, 0.0, []
    first = True
    for t in arrivals:
        if playing:
            if pos + (t - t_prev) >= media:
                starts.append(t_prev + (media - pos))
                pos, playing = media, False
            else:
                pos += t - t_prev
        media += 1.0
        if not playing and media - pos >= 2.0:
            playing = True
            first = False
        t_prev = t
    assert not first
    assert [s[0] for s in stalls] == pytest.approx(starts[: len(stalls)])
    # each stall ends at the arrival that brings the buffer back to the resume level
    for start, end, _ in stalls:
        assert end in arrivals and end > start
    # over a long run the stalled share is what the throughput lacks: 1 - 1/fetch_s
    # (plus the startup, minus at most one buffer's worth of slack)
    share = m.stalled_s(200.0) / 200.0
    assert share == pytest.approx(1 - 1 / fetch_s, abs=6.0 / 200.0)


def test_no_stall_is_reported_while_media_is_buffered() -> None:
    m = BufferModel(0.0, startup=2.0, resume=1.0)
    m.add(0.5, 1.0)
    assert m.stalled  # one second is not enough to start
    m.add(0.7, 1.0)
    assert not m.stalled and m.stalls == [(0.0, 0.7, True)]
    m.advance(2.69)
    assert not m.stalled  # 0.01 s left
    m.advance(2.71)
    assert m.stalled and m.stall_start == pytest.approx(2.7)
    m.add(2.9, 0.5)
    assert m.stalled  # 0.5 s buffered, resume needs 1
    m.add(3.5, 0.5)
    assert not m.stalled and m.stalls[-1] == (pytest.approx(2.7), 3.5, False)


@pytest.mark.parametrize(("p", "n"), [(0.2, 4), (0.5, 2), (0.1, 6)])
def test_a_stalled_player_sends_n_toggles_every_p(p: float, n: int) -> None:
    """Looks every p on a grid; n toggles per look that finds the player stalled."""
    m, _ = stream(1.0, 1.4, 120.0)
    spans = [(a, b) for a, b, _ in m.stalls] + ([(m.stall_start, 120.0)] if m.stall_start is not None else [])
    sig = Signaller(p, n, phase=0.037)
    t, looks, looks_stalled = sig.phase, 0, 0
    while t < 120.0:
        looks += 1
        looks_stalled += bool(sig.look(any(a <= t < b for a, b in spans)))
        t = sig.next_look(t)
    assert looks == pytest.approx((120.0 - 0.037) / p, abs=1)
    stalled = m.stalled_s(120.0)
    assert sig.toggles == n * looks_stalled
    # n/p toggles per stall-second, give or take one look per stall (grid phase)
    per_stall_second = sig.toggles / stalled
    slack = n * (len(m.stalls) + 1) / stalled
    assert abs(per_stall_second - n / p) <= slack
    assert math.isclose(per_stall_second, n / p, rel_tol=0.15)


def test_a_late_look_is_skipped_not_made_up() -> None:
    sig = Signaller(0.2, 4, phase=0.0)
    assert sig.next_look(0.0) == pytest.approx(0.2)
    assert sig.next_look(1.05) == pytest.approx(1.2)  # the loop woke late: 0.4..1.0 are gone
    assert sig.look(False) == 0 and sig.toggles == 0


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="even"):
        check_settings(Settings(n=3), 10)
    with pytest.raises(ValueError, match="--p"):
        check_settings(Settings(p=0.0), 10)


@pytest.mark.parametrize(("p", "phase"), [(0.2, 0.0), (0.1, 0.037), (0.3, 1796179560.25)])
def test_the_next_look_is_always_later(p: float, phase: float) -> None:
    """A look exactly on the grid (give or take rounding) is followed by the next one, never by
    itself: the player would spin and signal twice in one look."""
    sig = Signaller(p, 4, phase=phase)
    for k in range(2000):
        t = phase + k * p
        nxt = sig.next_look(t)
        assert t < nxt <= t + p + 1e-6
