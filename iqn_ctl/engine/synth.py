"""Synthetic IQN signals: what a router would see from an end-user agent.

Used by tests, benchmarks and the live-agent tests' sender, so that all of them
exercise the engine with the same model of the signal: the agent takes a
screenshot every p (with a random phase and a little scheduling jitter); every
screenshot taken while the stall is on screen sends a burst of n toggles, each
answered by one candidate packet, except that the first such screenshot is
missed with probability ``first_miss`` (the detector compares two frames, and
the one before the stall may already match the frozen picture or not); the path
adds a delay and jitter per packet. With ``first_miss = 0.5`` a stall of D
seconds gives D/p - 1/2 signals on average, as in the paper's traces (a linear
fit of their Detected_clicks log gives D = 0.200 k + 0.100 for news and
0.2015 k + 0.125 for music).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from iqn_ctl.engine.params import SignalParams


@dataclass(frozen=True, slots=True)
class SignalModel:
    params: SignalParams = SignalParams()
    #: spacing of toggles within a burst (the agent keeps them < 5 ms apart)
    spacing: float = 0.002
    #: standard deviation of the screenshot period, seconds
    period_jitter: float = 0.0
    #: one-way path delay and its per-packet jitter, seconds: uniform over
    #: 0..jitter, or (``jitter_dist="exponential"``) long-tailed with mean jitter
    delay: float = 0.0
    jitter: float = 0.0
    jitter_dist: str = "uniform"
    #: probability that a packet is held back by up to p more (arrives after
    #: later packets: reordering)
    reorder: float = 0.0
    #: probability that a candidate packet is lost
    loss: float = 0.0
    #: probability that the first screenshot showing the stall sends no signal
    first_miss: float = 0.5


def signal_shots(
    stalls: list[tuple[float, float]],
    model: SignalModel = SignalModel(),
    rng: np.random.Generator | None = None,
) -> list[npt.NDArray[np.float64]]:
    """Per stall, the screenshots that sent a signal (the agent's ``S-`` log
    lines). :func:`signal_times` draws the same random numbers in the same
    order, so a seed gives the same shots to both."""
    rng = rng or np.random.default_rng(0)
    p = model.params.p
    out: list[npt.NDArray[np.float64]] = []
    for start, end in stalls:
        phase = rng.uniform(0, p)
        k = int(np.ceil((end - start - phase) / p)) + 1
        shots = start + phase + p * np.arange(max(k, 0))
        if model.period_jitter:
            shots = shots + rng.normal(0, model.period_jitter, shots.size)
        shots = shots[(shots > start) & (shots < end)]
        if shots.size and rng.random() < model.first_miss:
            shots = shots[1:]
        out.append(np.asarray(shots, dtype=np.float64))
    return out


def signal_times(
    stalls: list[tuple[float, float]],
    model: SignalModel = SignalModel(),
    rng: np.random.Generator | None = None,
) -> npt.NDArray[np.float64]:
    """Candidate arrival times (sorted) for stalls given as (start, end) pairs."""
    rng = rng or np.random.default_rng(0)
    n = model.params.n
    out = [
        (shots[:, None] + model.spacing * np.arange(n)[None, :]).ravel()
        for shots in signal_shots(stalls, model, rng)
        if shots.size
    ]
    if not out:
        return np.empty(0)
    t = np.concatenate(out)
    if model.loss:
        t = t[rng.random(t.size) >= model.loss]
    t = t + model.delay
    if model.jitter:
        if model.jitter_dist == "exponential":
            t = t + rng.exponential(model.jitter, t.size)
        elif model.jitter_dist == "uniform":
            t = t + rng.uniform(0, model.jitter, t.size)
        else:
            raise ValueError(f"unknown jitter distribution {model.jitter_dist!r}")
    if model.reorder:
        held = rng.random(t.size) < model.reorder
        t = t + held * rng.uniform(0, model.params.p, t.size)
    return np.sort(t)


def random_stalls(
    count: int,
    rng: np.random.Generator,
    t0: float = 1.7e9,
    min_len: float = 0.4,
    max_len: float = 6.0,
    min_gap: float = 3.0,
    max_gap: float = 30.0,
) -> list[tuple[float, float]]:
    """Non-overlapping stalls with uniform lengths and gaps."""
    out = []
    t = t0
    for _ in range(count):
        t += rng.uniform(min_gap, max_gap)
        d = rng.uniform(min_len, max_len)
        out.append((t, t + d))
        t += d
    return out
