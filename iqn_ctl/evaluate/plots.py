"""Figures of an evaluation, in the shape of the IQN paper's Fig. 2.

One PNG answers the three questions an engineer asks of a run: *where* did the
inference go right or wrong (timeline), are inferred durations distributed like
the real ones (duration CDFs), and how large are the errors (error CDF with the
MAE). A paper trace spans many minutes and a stall is a few seconds, so the
timeline is drawn twice: an overview of the whole trace, where every miss and
false positive is marked so none can hide, and a readable detail window chosen
to show the inference's mistakes up close.

matplotlib is used through its object API with the Agg canvas (no pyplot), so
plotting never touches a global backend or needs a display, and is imported
only when a plot is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from iqn_ctl.errors import IqnError
from iqn_ctl.evaluate.scoring import Score
from iqn_ctl.evaluate.traces import Stall

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: width of the detail window, seconds: a few stalls and their gaps, with every
#: candidate tick still distinguishable
DETAIL_SECONDS = 90.0

#: candidate ticks drawn at most per timeline (about its width in pixels)
TICK_BINS = 1500
#: detail-window positions tried per kind (mistakes, stalls)
MAX_TRIES = 300

C_REAL = "#1f77b4"
C_MATCHED = "#2ca02c"
C_FP = "#d62728"
C_MISSED = "#ff7f0e"
C_CAND = "#444444"


class PlotError(IqnError):
    """The figure cannot be written (bad directory, unknown suffix); the CLI
    shows the message as one line."""


def _span(stalls: Sequence[Stall]) -> list[tuple[float, float]]:
    return [(s.start, max(s.duration, 1e-3)) for s in stalls]


def _detail_window(
    score: Score, real: Sequence[Stall], inferred: Sequence[Stall], lo: float, hi: float
) -> tuple[float, float]:
    """The DETAIL_SECONDS window worth looking at: the one holding the most
    mistakes (misses and false positives), then the most stalls; the trace's
    start when there is nothing to choose between."""
    if hi - lo <= DETAIL_SECONDS:
        return lo, hi
    def spans(stalls: Sequence[Stall]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        return (np.array([x.start for x in stalls], dtype=np.float64),
                np.array([x.end for x in stalls], dtype=np.float64))

    mistakes = spans([*score.missed, *score.false_positive_stalls])
    events = spans([*real, *inferred])
    margin = 0.1 * DETAIL_SECONDS

    def inside(st: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]], w0: float, w1: float) -> int:
        return int(np.count_nonzero((st[0] >= w0) & (st[1] <= w1)))

    def some(starts: npt.NDArray[np.float64]) -> list[float]:
        # a day-long evaluation has tens of thousands of stalls: try a few hundred
        u = np.unique(starts)
        return u[np.linspace(0, u.size - 1, min(u.size, MAX_TRIES)).astype(int)].tolist() if u.size else []

    best, best_key = lo, (-1, -1)
    for t in [lo, *some(mistakes[0]), *some(events[0])]:
        # the stall at t sits near the left edge, unless the trace ends first
        w0 = min(max(t - margin, lo), hi - DETAIL_SECONDS)
        w1 = w0 + DETAIL_SECONDS
        key = (inside(mistakes, w0, w1), inside(events, w0, w1))
        if key > best_key:
            best, best_key = w0, key
    return best, best + DETAIL_SECONDS


def _timeline(
    ax: Axes,
    score: Score,
    real: Sequence[Stall],
    inferred: Sequence[Stall],
    candidates: npt.NDArray[np.float64] | None,
    t0: float,
    window: tuple[float, float],
    detail: bool,
) -> None:
    """Rows, top to bottom: candidate arrivals, actual stalls, inferred stalls."""
    # by value: the caller's lists need not hold the very objects scored
    fps = set(score.false_positive_stalls)
    missed = set(score.missed)

    def rel(stalls: Sequence[Stall]) -> list[tuple[float, float]]:
        return [(a - t0, d) for a, d in _span(stalls)]

    rows = {"inferred": 0.0, "actual": 1.0}
    if candidates is not None:
        rows["candidates"] = 2.0
    h = 0.6
    if candidates is not None and candidates.size:
        c = candidates - t0
        c = c[(c >= window[0] - t0) & (c <= window[1] - t0)]
        if c.size > TICK_BINS:
            # more ticks than pixels: one tick per occupied pixel-wide bin
            edges = np.linspace(window[0] - t0, window[1] - t0, TICK_BINS + 1)
            hist, _ = np.histogram(c, edges)
            c = edges[:-1][hist > 0]
        y = rows["candidates"]
        ax.vlines(c, y - h / 2, y + h / 2, color=C_CAND, linewidth=0.6 if detail else 0.3)
    ok_real = [s for s in real if s not in missed]
    ax.broken_barh(rel(ok_real), (rows["actual"] - h / 2, h), facecolor=C_REAL)
    ax.broken_barh(
        rel(score.missed), (rows["actual"] - h / 2, h),
        facecolor="white", edgecolor=C_MISSED, hatch="////", linewidth=1.2,
    )
    ok_inf = [s for s in inferred if s not in fps]
    ax.broken_barh(rel(ok_inf), (rows["inferred"] - h / 2, h), facecolor=C_MATCHED)
    ax.broken_barh(rel(score.false_positive_stalls), (rows["inferred"] - h / 2, h), facecolor=C_FP)
    if not detail:
        # a stall is a sliver at this scale: flag every mistake with a marker
        for s in score.missed:
            ax.plot(s.start - t0, rows["actual"] + 0.55, "v", color=C_MISSED, markersize=6)
        for s in score.false_positive_stalls:
            ax.plot(s.start - t0, rows["inferred"] - 0.55, "^", color=C_FP, markersize=6)
    ax.set_yticks(list(rows.values()), list(rows))
    ax.set_ylim(-0.8, max(rows.values()) + 0.8)
    ax.set_xlim(window[0] - t0, window[1] - t0)
    ax.grid(axis="x", alpha=0.3)


def _cdf(ax: Axes, values: Sequence[float], label: str, color: str) -> None:
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size:
        y = np.arange(1, v.size + 1) / v.size
        ax.step(np.concatenate(([v[0]], v)), np.concatenate(([0.0], y)), where="post",
                label=label, color=color, linewidth=1.6)


def plot_evaluation(
    score: Score,
    real: Sequence[Stall],
    inferred: Sequence[Stall],
    path: str | Path,
    candidates: npt.ArrayLike | None = None,
) -> None:
    """Write the evaluation figure (timeline overview + detail, duration CDFs,
    error CDF) to ``path``; the format follows the suffix (PNG for ``.png``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    cand = None if candidates is None else np.sort(np.asarray(candidates, dtype=np.float64).ravel())
    starts = [s.start for s in [*real, *inferred]]
    ends = [s.end for s in [*real, *inferred]]
    if cand is not None and cand.size:
        starts.append(float(cand[0]))
        ends.append(float(cand[-1]))
    if starts:
        lo, hi = min(starts), max(ends)
    else:
        lo, hi = 0.0, 1.0
    pad = max(0.01 * (hi - lo), 0.5)
    lo, hi = lo - pad, hi + pad
    t0 = lo

    window = _detail_window(score, real, inferred, lo, hi)
    overview = window != (lo, hi)  # a short trace needs no overview
    summary = (
        f"{score.real} real stalls ({score.significant} >= 0.4 s), {score.inferred} inferred; "
        f"{score.matched} matched, {len(score.missed)} missed, {score.false_positives} false positives"
    )
    fig = Figure(figsize=(13, 10 if overview else 8.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    if overview:
        grid = fig.add_gridspec(3, 2, height_ratios=[1, 1.3, 1.6])
        ax_all = fig.add_subplot(grid[0, :])
        _timeline(ax_all, score, real, inferred, cand, t0, (lo, hi), detail=False)
        ax_all.axvspan(window[0] - t0, window[1] - t0, color="#ffd54f", alpha=0.3, zorder=0)
        ax_all.set_title(f"(a) whole trace: {summary}  (shaded: detail below; markers: mistakes)",
                         fontsize=10, loc="left")
        ax_det = fig.add_subplot(grid[1, :])
        det_title = f"(a) detail, {window[0] - t0:.0f}-{window[1] - t0:.0f} s"
    else:
        grid = fig.add_gridspec(2, 2, height_ratios=[1.3, 1.6])
        ax_det = fig.add_subplot(grid[0, :])
        det_title = f"(a) {summary}"
    row = 2 if overview else 1
    ax_dur = fig.add_subplot(grid[row, 0])
    ax_err = fig.add_subplot(grid[row, 1])

    _timeline(ax_det, score, real, inferred, cand, t0, window, detail=True)
    ax_det.set_title(det_title, fontsize=10, loc="left")
    ax_det.set_xlabel("time since trace start (s)")
    legend = [
        Patch(facecolor=C_REAL, label="actual stall"),
        Patch(facecolor="white", edgecolor=C_MISSED, hatch="////", label="missed (>= 0.4 s)"),
        Patch(facecolor=C_MATCHED, label="inferred stall"),
        Patch(facecolor=C_FP, label="false positive"),
    ]
    if cand is not None:
        legend.insert(0, Patch(facecolor=C_CAND, label="candidate arrival"))
    ax_det.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.28),
                  ncol=len(legend), frameon=False, fontsize=9)

    real_d = [p.real.duration for p in score.pairs]
    inf_d = [p.inferred.duration for p in score.pairs]
    _cdf(ax_dur, real_d, "actual", C_REAL)
    _cdf(ax_dur, inf_d, "inferred", C_MATCHED)
    ax_dur.set_title(f"(b) stall durations of the {score.matched} matched pairs", fontsize=10, loc="left")
    ax_dur.set_xlabel("stall duration (s)")
    if score.pairs:
        ax_dur.set_xlabel("stall duration (s, log scale)")
        # durations span 0.4 s to tens of seconds: linear would crush the bulk
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

        ax_dur.set_xscale("log")
        ax_dur.xaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500]))
        ax_dur.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax_dur.xaxis.set_minor_formatter(NullFormatter())
    ax_dur.set_ylabel("CDF")

    errs_ms = [abs(p.error) * 1000 for p in score.pairs]
    _cdf(ax_err, errs_ms, "|inferred - actual|", C_CAND)
    if errs_ms:
        mae = score.mae * 1000
        ax_err.axvline(mae, color=C_FP, linestyle="--", linewidth=1.2,
                       label=f"MAE {mae:.1f} ms (RMSE {score.rmse * 1000:.1f} ms)")
    ax_err.set_title("(c) absolute duration error of matched pairs", fontsize=10, loc="left")
    ax_err.set_xlabel("absolute duration error (ms)")
    for ax in (ax_dur, ax_err):
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if score.pairs:
            ax.legend(loc="lower right", fontsize=9)
        else:
            ax.text(0.5, 0.5, "no matched stalls", transform=ax.transAxes, ha="center", va="center")

    try:
        fig.savefig(path)
    except ValueError as e:  # unsupported suffix
        raise PlotError(f"{path}: cannot write this figure format ({e})") from None
    except OSError as e:
        raise PlotError(f"{path}: cannot write: {e.strerror or e}") from None
