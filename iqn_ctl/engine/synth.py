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

``protocol="edges"`` models the end-user agent's newer protocol instead
(docs/user-agent.md): it looks every p/``looks_per_p``, each look compared
with the grab p before it, so the first look that sees the stall is the first
one p after its start; and the bursts
carry a toggle count that the count estimator decodes to the agent's own
estimate of the duration (:func:`edges_toggles`). This is the ISP's model of
that agent, written from the protocol's definition; a test checks it against
the user agent's encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from iqn_ctl.engine.params import COUNT_OFFSET, EDGES_LOOKS_PER_P, SignalParams

PROTOCOLS = ("tick", "edges")


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
    #: the agent's signal protocol: "tick" (the paper's) or "edges"
    protocol: str = "tick"
    #: protocol edges: looks per p; each look is compared with the grab p
    #: before it, so the first STALL verdict is the first look p after the start
    #: (``first_miss`` does not apply), and the agent assumes exactly that lag
    looks_per_p: int = EDGES_LOOKS_PER_P


def edges_toggles(duration: float, params: SignalParams) -> int:
    """Protocol edges: the even toggle count the agent sends for a stall it
    timed at ``duration`` s, the one the count estimator decodes within p/n."""
    q = 2 * params.p / params.n
    return 2 * max(0, math.floor((duration - COUNT_OFFSET * params.p) / q + 0.5))


def edges_bursts(looks: npt.NDArray[np.float64], stall: npt.NDArray[np.bool_], model: SignalModel,
                 ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:  # fmt: skip
    """Protocol edges for one run of looks (times) and their verdicts: the
    times and sizes of the bursts sent. Sizes are even, n per p while the stall
    lasts, then a final burst of the rest owed."""
    par = model.params
    look = par.p / model.looks_per_p
    times: list[float] = []
    sizes: list[int] = []
    began: float | None = None
    ended = -math.inf  # a new stall never begins before the previous one's end
    sent = 0
    for t, st in zip(looks.tolist(), stall.tolist(), strict=True):
        if st:
            if began is None:
                began, sent = max(t - par.p - 0.5 * look, ended), 0
            owed = edges_toggles(t - began, par) - sent
            k = owed - owed % par.n if owed >= par.n else 0
        elif began is not None:
            ended = t - 0.5 * look
            owed = edges_toggles(ended - began, par) - sent
            k = max(owed, 0) if sent else 0
            began = None
        else:
            k = 0
        if k:
            times.append(t)
            sizes.append(k)
            sent += k
    return np.asarray(times, dtype=np.float64), np.asarray(sizes, dtype=np.int64)


def _bursts(
    stalls: list[tuple[float, float]], model: SignalModel, rng: np.random.Generator
) -> list[tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]]:
    """Per stall, the bursts sent: (times, sizes)."""
    if model.protocol == "tick":
        n = model.params.n
        return [(s, np.full(s.size, n, dtype=np.int64)) for s in signal_shots(stalls, model, rng)]
    if model.protocol != "edges":
        raise ValueError(f"unknown protocol {model.protocol!r}; choose from {', '.join(PROTOCOLS)}")
    look = model.params.p / model.looks_per_p
    out = []
    for start, end in stalls:
        phase = rng.uniform(0, look)
        k = int(np.ceil((end - start - phase) / look)) + 2
        looks = np.asarray(start + phase + look * np.arange(max(k, 0)), dtype=np.float64)
        if model.period_jitter:
            looks = np.sort(looks + rng.normal(0, model.period_jitter, looks.size))
        stall = (looks - model.params.p > start) & (looks < end)
        out.append(edges_bursts(looks, stall, model))
    return out


def signal_shots(
    stalls: list[tuple[float, float]],
    model: SignalModel = SignalModel(),
    rng: np.random.Generator | None = None,
) -> list[npt.NDArray[np.float64]]:
    """Per stall, the screenshots that sent a signal (the agent's ``S-`` log
    lines). :func:`signal_times` draws the same random numbers in the same
    order, so a seed gives the same shots to both."""
    rng = rng or np.random.default_rng(0)
    if model.protocol != "tick":
        return [times for times, _ in _bursts(stalls, model, rng)]
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
    out = [
        np.repeat(shots, sizes) + model.spacing * np.concatenate([np.arange(k) for k in sizes.tolist()])
        for shots, sizes in _bursts(stalls, model, rng)
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
