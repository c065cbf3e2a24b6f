"""A researcher's toolkit: many runs scored together, their matched pairs
exported, synthetic runs written in the paper's file formats, and a parameter
sweep of both estimators.

The signal model itself is :mod:`iqn_ctl.engine.synth` (sans-I/O); this module
does the file writing around it, so ``iqn-ctl synth`` output can be read back
by ``replay`` and ``evaluate`` like a paper trace.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from iqn_ctl.engine.estimators import ESTIMATORS
from iqn_ctl.engine.params import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, SignalParams
from iqn_ctl.engine.synth import PROTOCOLS, SignalModel, random_stalls, signal_shots, signal_times
from iqn_ctl.errors import IqnError
from iqn_ctl.evaluate.replay import infer_times
from iqn_ctl.evaluate.scoring import Score, score
from iqn_ctl.evaluate.traces import Stall, write_real_stalls

#: the paper's file names inside one run's directory
TRUTH_FILE = "Real_stalls.txt"
CANDIDATES_FILE = "timestamp_of_candidate.txt"
JITTER_DISTS = ("uniform", "exponential")


class ResearchError(IqnError):
    """Bad toolkit input (parameter file, run directory, output path)."""


# many runs -----------------------------------------------------------------------


def find_runs(root: Path) -> list[Path]:
    """Run directories in the paper's layout under ``root`` (``root`` itself
    or its subdirectories, sorted): each holds Real_stalls.txt and
    timestamp_of_candidate.txt."""
    if not root.is_dir():
        raise ResearchError(f"{root}: not a directory")
    dirs = [root, *sorted(d for d in root.iterdir() if d.is_dir())]
    runs = [d for d in dirs if (d / TRUTH_FILE).is_file() and (d / CANDIDATES_FILE).is_file()]
    if not runs:
        raise ResearchError(f"{root}: no run directory with {TRUTH_FILE} and {CANDIDATES_FILE}")
    return runs


PAIR_FIELDS = (
    "run",
    "kind",
    "real_start",
    "real_end",
    "real_duration",
    "inferred_start",
    "inferred_end",
    "inferred_duration",
    "error",
)


def pair_rows(runs: Iterable[tuple[str, Score]]) -> list[dict[str, object]]:
    """One row per matched pair (kind ``matched``) and per false positive
    (kind ``false_positive``, no real stall): durations and error in seconds,
    error = inferred - real duration."""
    rows: list[dict[str, object]] = []
    for name, sc in runs:
        for p in sc.pairs:
            r, i = p.real, p.inferred
            rows.append(
                dict(
                    zip(
                        PAIR_FIELDS,
                        (
                            name,
                            "matched",
                            r.start,
                            r.end,
                            r.duration,
                            i.start,
                            i.end,
                            i.duration,
                            p.error,
                        ),
                        strict=True,
                    )
                )
            )
        for f in sc.false_positive_stalls:
            rows.append(
                dict(
                    zip(
                        PAIR_FIELDS,
                        (
                            name,
                            "false_positive",
                            None,
                            None,
                            None,
                            f.start,
                            f.end,
                            f.duration,
                            None,
                        ),
                        strict=True,
                    )
                )
            )
    return rows


def write_rows(path: Path, rows: Sequence[dict[str, object]], columns: Sequence[str]) -> None:
    """CSV (empty cell for None) or, for a ``.jsonl`` path, one JSON object per line."""
    try:
        with open(path, "w", encoding="utf-8", newline="") as f:
            if path.suffix == ".jsonl":
                for row in rows:
                    f.write(json.dumps(row) + "\n")
                return
            w = csv.DictWriter(f, fieldnames=list(columns))
            w.writeheader()
            for row in rows:
                w.writerow({k: "" if v is None else v for k, v in row.items()})
    except OSError as e:
        raise ResearchError(f"{path}: cannot write: {e.strerror or e}") from None


# synthetic runs ------------------------------------------------------------------


@dataclass
class SynthSpec:
    """Everything ``iqn-ctl synth`` draws a run from; a parameter file (JSON or
    TOML) holds any of these keys, flags override it."""

    stalls: int = 30
    #: explicit stall durations, seconds (else uniform in min_len..max_len)
    durations: list[float] = field(default_factory=list)
    min_len: float = 0.4
    max_len: float = 6.0
    min_gap: float = 3.0
    max_gap: float = 30.0
    p: float = 0.2
    n: int = 4
    delay: float = 0.0
    jitter: float = 0.0
    jitter_dist: str = "uniform"
    loss: float = 0.0
    reorder: float = 0.0
    #: router clock minus agent clock, seconds (shifts the candidates only)
    offset: float = 0.0
    first_miss: float = 0.5
    #: the end-user agent's signal protocol: tick (the paper's) or edges
    protocol: str = "tick"
    seed: int = 0
    t0: float = 1.7e9

    def check(self) -> None:
        if self.jitter_dist not in JITTER_DISTS:
            raise ResearchError(
                f"jitter_dist must be one of {', '.join(JITTER_DISTS)}, not {self.jitter_dist!r}"
            )
        if self.protocol not in PROTOCOLS:
            raise ResearchError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}")
        for name in ("loss", "reorder", "first_miss"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ResearchError(f"{name} must be in 0..1, got {v}")
        for name in ("delay", "jitter", "min_len", "min_gap"):
            if getattr(self, name) < 0:
                raise ResearchError(f"{name} must not be negative")
        if self.max_len < self.min_len or self.max_gap < self.min_gap:
            raise ResearchError("max_len/max_gap must not be below min_len/min_gap")
        if any(not (math.isfinite(d) and d > 0) for d in self.durations):
            raise ResearchError("durations must be positive numbers")
        SignalParams(self.p, self.n)  # validates p and n

    def model(self) -> SignalModel:
        return SignalModel(
            params=SignalParams(self.p, self.n),
            delay=self.delay,
            jitter=self.jitter,
            jitter_dist=self.jitter_dist,
            loss=self.loss,
            reorder=self.reorder,
            first_miss=self.first_miss,
            protocol=self.protocol,
        )


def load_spec(path: Path) -> dict[str, Any]:
    """A parameter file's keys (JSON, or TOML for a ``.toml`` path)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except OSError as e:
        raise ResearchError(f"{path}: cannot read: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ResearchError(f"{path}: not a JSON/TOML parameter file: {e}") from None
    if not isinstance(data, dict):
        raise ResearchError(f"{path}: expected an object of parameters")
    known = {f.name for f in fields(SynthSpec)}
    bad = sorted(set(data) - known)
    if bad:
        raise ResearchError(
            f"{path}: unknown parameter(s) {', '.join(bad)}; known: {', '.join(sorted(known))}"
        )
    return data


def make_spec(file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> SynthSpec:
    """Defaults, then the file, then flags that were given (not None)."""
    try:
        spec = replace(SynthSpec(), **file_values)
        spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
        spec.check()
    except (TypeError, ValueError) as e:
        raise ResearchError(f"bad synth parameters: {e}") from None
    return spec


def synth_stalls(spec: SynthSpec, rng: np.random.Generator) -> list[tuple[float, float]]:
    if not spec.durations:
        return random_stalls(
            spec.stalls, rng, spec.t0, spec.min_len, spec.max_len, spec.min_gap, spec.max_gap
        )
    out, t = [], spec.t0
    for d in spec.durations:
        t += rng.uniform(spec.min_gap, spec.max_gap)
        out.append((t, t + d))
        t += d
    return out


def write_synth(spec: SynthSpec, out: Path, pcap: bool = False) -> dict[str, object]:
    """Write one run in the paper's layout under ``out``: Real_stalls.txt,
    timestamp_of_candidate.txt, Detected_clicks_<p>.txt (``S-`` lines of the
    screenshots that sent a signal), params.json, and with ``pcap`` a router
    capture ``candidates.pcap`` of the same candidates. Returns a summary."""
    rng = np.random.default_rng(spec.seed)
    stalls = synth_stalls(spec, rng)
    model = spec.model()
    seed2 = int(rng.integers(2**32))
    shots = signal_shots(stalls, model, np.random.default_rng(seed2))
    times = signal_times(stalls, model, np.random.default_rng(seed2)) + spec.offset
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / TRUTH_FILE, "w", encoding="utf-8") as f:
            write_real_stalls((Stall(a, b) for a, b in stalls), f)
        (out / CANDIDATES_FILE).write_text("".join(f"{t!r}\n" for t in times.tolist()), encoding="utf-8")
        clicks = sorted(float(s) for arr in shots for s in arr)
        (out / f"Detected_clicks_{spec.p:g}.txt").write_text("".join(f"S-{s!r}\n" for s in clicks), "utf-8")
        (out / "params.json").write_text(json.dumps(asdict(spec), indent=1) + "\n", encoding="utf-8")
        if pcap:
            from iqn_ctl.capture.frames import udp_frame
            from iqn_ctl.capture.pcapwrite import Packet, write_pcap

            sizes = rng.integers(DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE + 1, times.size)
            frames = {int(s): udp_frame("198.18.0.20", "198.18.1.3", 443, 50000, int(s)) for s in set(sizes)}
            write_pcap(
                out / "candidates.pcap",
                [Packet(t, frames[int(s)]) for t, s in zip(times, sizes, strict=True)],
            )
    except OSError as e:
        raise ResearchError(f"{out}: cannot write: {e.strerror or e}") from None
    return {"dir": str(out), "stalls": len(stalls), "candidates": int(times.size), "signals": len(clicks)}


# sweep ---------------------------------------------------------------------------

SWEEP_AXES = ("p", "n", "jitter", "loss")
SWEEP_FIELDS = (
    *SWEEP_AXES, "protocol", "estimator", "significant", "matched", "false_positives", "mae_ms", "rmse_ms"
)


def sweep(
    grid: Mapping[str, Sequence[float]],
    base: SynthSpec,
    estimators: Sequence[str] = tuple(sorted(ESTIMATORS)),
    protocols: Sequence[str] = ("tick",),
) -> list[dict[str, object]]:
    """Every combination of the grid's p, n, jitter and loss, and of the end-user
    agent's signal protocols: the same stalls (seeded by ``base.seed``) through
    synth, the engine (replay) and the paper's scoring (evaluate), once per
    estimator. One row each."""
    rows: list[dict[str, object]] = []
    for proto, (p, n, jit, loss) in itertools.product(
        protocols, itertools.product(*(grid[a] for a in SWEEP_AXES))
    ):
        spec = replace(base, p=float(p), n=int(n), jitter=float(jit), loss=float(loss), protocol=str(proto))
        spec.check()
        rng = np.random.default_rng(spec.seed)
        stalls = synth_stalls(spec, rng)
        times = signal_times(stalls, spec.model(), rng) + spec.offset
        real = [Stall(a, b) for a, b in stalls]
        for est in estimators:
            inf = [Stall(e.start, e.end) for e in infer_times(times, SignalParams(spec.p, spec.n), est)]
            d = score(real, inf).as_dict()
            rows.append(
                {
                    "p": spec.p,
                    "n": spec.n,
                    "jitter": spec.jitter,
                    "loss": spec.loss,
                    "protocol": spec.protocol,
                    "estimator": est,
                    **{k: d[k] for k in SWEEP_FIELDS[6:]},
                }
            )
    return rows


def _num(v: object) -> float:
    return float(v) if isinstance(v, int | float) else math.nan


def plot_sweep(rows: Sequence[dict[str, object]], path: Path) -> None:
    """MAE (ms, mean over the other parameters) against each swept parameter, one line per estimator."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from iqn_ctl.evaluate.plots import PlotError

    fig = Figure(figsize=(12, 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(SWEEP_AXES), sharey=True)
    def line(r: Mapping[str, object]) -> str:
        # one line per estimator, per protocol too when several were swept
        return str(r["estimator"]) if len(protos) == 1 else f"{r.get('protocol')}/{r['estimator']}"

    protos = {r.get("protocol") for r in rows}
    ests = sorted({line(r) for r in rows})
    for ax, axis in zip(axes, SWEEP_AXES, strict=True):
        xs = sorted({_num(r[axis]) for r in rows})
        for est in ests:
            ys = []
            for x in xs:
                v = [
                    _num(r["mae_ms"])
                    for r in rows
                    if line(r) == est and _num(r[axis]) == x and r["mae_ms"] is not None
                ]
                ys.append(sum(v) / len(v) if v else math.nan)
            ax.plot(xs, ys, marker="o", label=est)
        ax.set_xlabel(axis)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MAE, ms")
    axes[0].legend(title="estimator")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except (OSError, ValueError) as e:
        raise PlotError(f"{path}: cannot write the figure: {e}") from None
