"""Pictures of the estimates (matplotlib, Agg): the paper's Fig. 5 and Figs. 6-8."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .errors import QosError  # noqa: E402
from .mle import Estimate  # noqa: E402

History = Sequence[tuple[float, Sequence[Estimate]]]


def _name(c: str | tuple[str, ...]) -> str:
    return c if isinstance(c, str) else "+".join(c)


def _label(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%m-%d %H:%M")


def _save(fig: plt.Figure, out: Path) -> None:
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise QosError(f"{out}: {e.strerror}") from None
    finally:
        plt.close(fig)


def plot_heatmap(per_slot: History, out: Path, *, threshold: float) -> None:
    """Rows: components faulty in at least one slot; columns: slots; colour: p (blank: no lines)."""
    rows = sorted({_name(e.component) for _, ests in per_slot for e in ests if e.faulty})
    starts = [s for s, _ in per_slot]
    width = min(14.0, max(6.0, 0.12 * len(starts) + 3))
    fig, ax = plt.subplots(figsize=(width, max(3.0, 0.3 * len(rows) + 2)))
    if not rows:
        ax.text(0.5, 0.5, f"no component above p = {threshold} in any slot", ha="center", va="center")
        ax.set_axis_off()
    else:
        grid = np.full((len(rows), len(starts)), np.nan)
        ix = {r: i for i, r in enumerate(rows)}
        for j, (_, ests) in enumerate(per_slot):
            for e in ests:
                i = ix.get(_name(e.component))
                if i is not None:
                    grid[i, j] = e.p
        im = ax.imshow(
            np.ma.masked_invalid(grid), aspect="auto", cmap="inferno_r", interpolation="nearest", vmin=0.0
        )
        fig.colorbar(im, ax=ax, label="estimated bad-unit rate p")
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        step = max(1, len(starts) // 12)
        ax.set_xticks(
            range(0, len(starts), step),
            [_label(s) for s in starts[::step]],
            rotation=45,
            ha="right",
            fontsize=8,
        )
        ax.set_xlabel("slot start (UTC)")
    ax.set_title("degraded components per slot (only components ever faulty)")
    fig.tight_layout()
    _save(fig, out)


def plot_component(per_slot: History, component: str, out: Path, *, slot_s: float) -> None:
    """One component's p per slot with its interval; a group member shows its group's estimate."""
    t: list[int] = []
    p: list[float] = []
    lo: list[float] = []
    hi: list[float] = []
    label = component
    for start, ests in per_slot:
        for e in ests:
            ids = (e.component,) if isinstance(e.component, str) else e.component
            if component in ids:
                label = _name(e.component)
                t.append(int((start + slot_s / 2) * 1000))
                p.append(e.p)
                lo.append(e.lo)
                hi.append(e.hi)
    if not t:
        raise QosError(f"component {component!r} is on no media line")
    tx = np.array(t, dtype="datetime64[ms]")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.fill_between(tx, lo, hi, alpha=0.3, step="mid", label="95 % interval")
    ax.plot(tx, p, marker="o", ms=3, label="p (MLE)")
    ax.set_ylabel("bad-unit rate p")
    ax.set_xlabel("time (UTC)")
    ax.set_title(f"{label}: estimated degradation per slot")
    ax.set_ylim(bottom=0)
    pad = np.timedelta64(int(slot_s * 1000), "ms")  # one slot either side: a lone point keeps a sane axis
    ax.set_xlim(tx.min() - pad, tx.max() + pad)
    ax.legend(loc="upper right")
    fig.autofmt_xdate()
    fig.tight_layout()
    _save(fig, out)
