"""``iqn-ctl replay / evaluate``: offline inference and scoring.

Registered on :data:`iqn_ctl.cli.common.app` by importing this module.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import typer

from iqn_ctl.engine.estimators import DEFAULT_ESTIMATOR, ESTIMATORS
from iqn_ctl.engine.params import CandidateFilter, SignalParams

from .common import OptJson, OptMax, OptMin, OptN, OptP, OptPort, UserError, app, fmt_time, friendly


@app.command()
@friendly
def replay(
    source: Path = typer.Argument(..., help="pcap/pcapng capture, or a text file of candidate timestamps"),
    p: float = OptP,
    n: int = OptN,
    min_size: int = OptMin,
    max_size: int = OptMax,
    port: int = OptPort,
    estimator: str = typer.Option(
        DEFAULT_ESTIMATOR, "--estimator", help=f"one of: {', '.join(sorted(ESTIMATORS))}"
    ),
    as_json: bool = OptJson,
) -> None:
    """Offline inference on a capture or a paper timestamp file."""
    from iqn_ctl.evaluate.replay import replay_capture, replay_timestamps
    from iqn_ctl.evaluate.traces import looks_like_timestamps, stall_to_json

    if estimator not in ESTIMATORS:
        raise UserError(f"unknown --estimator {estimator!r}; choose one of {', '.join(sorted(ESTIMATORS))}")
    params = SignalParams(p, n)
    filt = CandidateFilter(port, min_size, max_size)
    if not source.exists():
        raise UserError(f"{source}: no such file")
    if source.is_dir():
        raise UserError(f"{source}: is a directory, expected a capture or a timestamp file")
    if not source.is_file():  # a FIFO or a device: reading it could wait forever
        raise UserError(f"{source}: not a regular file, expected a capture or a timestamp file")

    def warn(m: str) -> None:
        typer.echo(f"iqn-ctl: warning: {m}", err=True)

    def report(m: str) -> None:
        typer.echo(f"iqn-ctl: {m}", err=True)

    if looks_like_timestamps(source):
        stalls = replay_timestamps(source, params, estimator, warn=warn)
    else:
        stalls = replay_capture(source, params, estimator, filt, warn=warn, report=report)
    if as_json:
        for st in stalls:
            typer.echo(stall_to_json(st))
        return
    if not stalls:
        typer.echo("no stalls inferred")
        return
    typer.echo(f"{'flow':<44} {'start (UTC)':<23} {'end (UTC)':<23} {'duration':>9}")
    for st in stalls:
        typer.echo(f"{st.flow:<44} {fmt_time(st.start):<23} {fmt_time(st.end):<23} {st.duration:>8.3f}s")
    typer.echo(f"{len(stalls)} stall(s), estimator {estimator}")


def _ms(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f} ms"


@app.command()
@friendly
def evaluate(
    inferred: str = typer.Argument(..., help="inferred stalls (replay --json output), or - for stdin"),
    truth: Path = typer.Option(..., "--truth", help="ground truth in the paper's Real_stalls.txt format"),
    as_json: bool = OptJson,
    plot: Path | None = typer.Option(None, "--plot", help="write timeline and CDF figures to this PNG"),
    candidates: Path | None = typer.Option(
        None, "--candidates", help="candidate timestamps to draw on the timeline (with --plot)"
    ),
) -> None:
    """Score inferred stalls against ground truth, as in the paper."""
    from iqn_ctl.evaluate.scoring import score
    from iqn_ctl.evaluate.traces import (
        TraceError,
        check_regular,
        read_real_stalls,
        read_stall_lines,
        read_timestamps,
    )

    real = read_real_stalls(truth)
    if inferred == "-":
        inf = read_stall_lines(sys.stdin, "<stdin>")
    else:
        check_regular(inferred)
        try:
            with open(inferred, encoding="utf-8") as f:
                inf = read_stall_lines(f, inferred)
        except OSError as e:
            raise TraceError(f"{inferred}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise TraceError(f"{inferred}: not a text file") from None
    sc = score(real, inf)
    d = sc.as_dict()
    if plot is not None:
        from iqn_ctl.evaluate.plots import plot_evaluation

        cand = read_timestamps(candidates) if candidates is not None else None
        plot_evaluation(sc, real, inf, plot, candidates=cand)
    if as_json:
        typer.echo(json.dumps(d))
        return
    rows = [
        ("real stalls", str(sc.real)),
        ("significant (>= 0.4 s)", str(sc.significant)),
        ("inferred stalls", str(sc.inferred)),
        ("significant matched", str(sc.matched)),
        ("false positives", str(sc.false_positives)),
        ("precision", "-" if d["precision"] is None else f"{d['precision']:.3f}"),
        ("recall", "-" if d["recall"] is None else f"{d['recall']:.3f}"),
        ("MAE", _ms(d["mae_ms"])),  # type: ignore[arg-type]
        ("RMSE", _ms(d["rmse_ms"])),  # type: ignore[arg-type]
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{w}}  {v}")
    if plot is not None:
        typer.echo(f"plot written to {plot}")

