"""``iqn-ctl replay / evaluate / synth / sweep``: offline inference, scoring and research tools.

Registered on :data:`iqn_ctl.cli.common.app` by importing this module.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import typer

from iqn_ctl.engine.estimators import DEFAULT_ESTIMATOR, ESTIMATORS
from iqn_ctl.engine.flowkey import KEY_MODES
from iqn_ctl.engine.params import CandidateFilter, SignalParams
from iqn_ctl.evaluate.scoring import SIGNIFICANT, TOLERANCE, Score
from iqn_ctl.evaluate.traces import Stall

from .common import (
    OptBulkRatio,
    OptEstimator,
    OptJson,
    OptKey,
    OptMax,
    OptMin,
    OptN,
    OptP,
    OptPort,
    UserError,
    app,
    check_estimator,
    fmt_time,
    friendly,
)


@app.command()
@friendly
def replay(
    source: Path = typer.Argument(..., help="pcap/pcapng capture, or a text file of candidate timestamps"),
    p: float = OptP,
    n: int = OptN,
    min_size: int = OptMin,
    max_size: int = OptMax,
    port: int = OptPort,
    estimator: str = OptEstimator,
    key: str = OptKey,
    bulk_ratio: float = OptBulkRatio,
    as_json: bool = OptJson,
) -> None:
    """Offline inference on a capture or a paper timestamp file; with the live
    agent's options (--key, --bulk-ratio, estimator, p, n, sizes, port) a
    capture gives the stalls the agent recorded from the same traffic."""
    from iqn_ctl.evaluate.replay import replay_capture_full, replay_timestamps
    from iqn_ctl.evaluate.traces import looks_like_timestamps, stall_to_json

    check_estimator(estimator)
    if key not in KEY_MODES:
        raise UserError(f"--key must be one of {', '.join(KEY_MODES)}, got {key!r}")
    if not 0 <= bulk_ratio < 1e6:
        raise UserError(f"--bulk-ratio must be >= 0, got {bulk_ratio}")
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
        got = replay_capture_full(source, params, estimator, filt, warn=warn, report=report,
                                  key_mode=key, bulk_ratio=bulk_ratio)
        stalls = got.stalls
        if got.discarded:
            report(f"{len(got.discarded)} stall(s) discarded as bulk traffic (--bulk-ratio {bulk_ratio:g})")
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


def _read_inferred(inferred: str) -> list[Stall]:
    from iqn_ctl.evaluate.traces import TraceError, check_regular, read_stall_lines

    if inferred == "-":
        return read_stall_lines(sys.stdin, "<stdin>")
    check_regular(inferred)
    try:
        with open(inferred, encoding="utf-8") as f:
            return read_stall_lines(f, inferred)
    except OSError as e:
        raise TraceError(f"{inferred}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{inferred}: not a text file") from None


def _warn(m: str) -> None:
    typer.echo(f"iqn-ctl: warning: {m}", err=True)


def _summary_rows(sc: Score, significant: float) -> list[tuple[str, str]]:
    d = sc.as_dict()
    return [
        ("real stalls", str(sc.real)),
        (f"significant (>= {significant:g} s)", str(sc.significant)),
        ("inferred stalls", str(sc.inferred)),
        ("significant matched", str(sc.matched)),
        ("false positives", str(sc.false_positives)),
        ("precision", "-" if d["precision"] is None else f"{d['precision']:.3f}"),
        ("recall", "-" if d["recall"] is None else f"{d['recall']:.3f}"),
        ("MAE", _ms(d["mae_ms"])),  # type: ignore[arg-type]
        ("RMSE", _ms(d["rmse_ms"])),  # type: ignore[arg-type]
    ]


def _runs_table(named: list[tuple[str, Score]], pooled: Score) -> None:
    w = max(len("pooled"), *(len(n) for n, _ in named))
    head = f"{'real':>5} {'signif':>6} {'inferred':>8} {'matched':>7} {'FP':>4} {'MAE':>10} {'RMSE':>10}"
    typer.echo(f"{'run':<{w}}  {head}")
    for name, sc in [*named, ("pooled", pooled)]:
        d = sc.as_dict()
        typer.echo(
            f"{name:<{w}}  {sc.real:>5} {sc.significant:>6} {sc.inferred:>8} {sc.matched:>7} "
            f"{sc.false_positives:>4} {_ms(d['mae_ms']):>10} {_ms(d['rmse_ms']):>10}"  # type: ignore[arg-type]
        )


@app.command()
@friendly
def evaluate(
    inferred: list[str] = typer.Argument(
        None, help="inferred stalls (replay --json output), or - for stdin; one per --truth, in order"
    ),
    truth: list[Path] = typer.Option(
        [], "--truth", help="ground truth in the paper's Real_stalls.txt format (repeat for many runs)"
    ),
    runs: Path | None = typer.Option(
        None,
        "--runs",
        help="directory of runs in the paper's layout (Real_stalls.txt + timestamp_of_candidate.txt)",
    ),
    significant: float = typer.Option(
        SIGNIFICANT, "--significant", help="shortest real stall scored, seconds"
    ),
    tolerance: float = typer.Option(
        TOLERANCE, "--tolerance", help="largest start difference matched, seconds"
    ),
    pairs: Path | None = typer.Option(
        None, "--pairs", help="write matched pairs and false positives to this .csv or .jsonl"
    ),
    p: float = OptP,
    n: int = OptN,
    estimator: str = typer.Option(
        DEFAULT_ESTIMATOR,
        "--estimator",
        help="estimator replaying --runs; one of: " + ", ".join(sorted(ESTIMATORS)),
    ),
    as_json: bool = OptJson,
    plot: Path | None = typer.Option(
        None, "--plot", help="write timeline and CDF figures to this PNG (pooled)"
    ),
    candidates: Path | None = typer.Option(
        None, "--candidates", help="candidate timestamps to draw on the timeline (with --plot)"
    ),
) -> None:
    """Score inferred stalls against ground truth, as in the paper; many runs are also pooled."""
    from iqn_ctl.evaluate.replay import replay_timestamps
    from iqn_ctl.evaluate.research import (
        CANDIDATES_FILE,
        PAIR_FIELDS,
        TRUTH_FILE,
        find_runs,
        pair_rows,
        write_rows,
    )
    from iqn_ctl.evaluate.scoring import pool, score
    from iqn_ctl.evaluate.traces import read_real_stalls, read_timestamps

    inferred = list(inferred or [])
    if not (math.isfinite(significant) and significant >= 0):
        raise UserError(f"--significant must be a non-negative number of seconds, got {significant}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(f"--tolerance must be a non-negative number of seconds, got {tolerance}")
    inputs: list[tuple[str, list[Stall], list[Stall]]] = []  # (name, real, inferred)
    if runs is not None:
        if truth or inferred:
            raise UserError("give either --runs DIR or --truth/INFERRED pairs, not both")
        if estimator not in ESTIMATORS:
            raise UserError(
                f"unknown --estimator {estimator!r}; choose one of {', '.join(sorted(ESTIMATORS))}"
            )
        params = SignalParams(p, n)
        for d in find_runs(runs):
            inf_run = replay_timestamps(d / CANDIDATES_FILE, params, estimator, warn=_warn)
            inputs.append((d.name, read_real_stalls(d / TRUTH_FILE), inf_run))
    else:
        if not truth:
            raise UserError("missing --truth (or give --runs DIR)")
        if len(truth) != len(inferred):
            raise UserError(
                f"{len(truth)} --truth file(s) but {len(inferred)} INFERRED input(s); give one per --truth"
            )
        if inferred.count("-") > 1:
            raise UserError("stdin (-) can be read only once")
        for t, i in zip(truth, inferred, strict=True):
            inputs.append((i if i != "-" else "<stdin>", read_real_stalls(t), _read_inferred(i)))
    named = [(name, score(real, inf, significant, tolerance)) for name, real, inf in inputs]
    sc = named[0][1] if len(named) == 1 and runs is None else pool([s for _, s in named])
    if pairs is not None:
        write_rows(pairs, pair_rows(named), PAIR_FIELDS)
    if plot is not None:
        from iqn_ctl.evaluate.plots import plot_evaluation

        cand = read_timestamps(candidates) if candidates is not None else None
        all_real = [r for _, real, _ in inputs for r in real]
        all_inf = [s for _, _, inf in inputs for s in inf]
        plot_evaluation(sc, all_real, all_inf, plot, candidates=cand)
    single = len(named) == 1 and runs is None
    if as_json:
        if single:
            typer.echo(json.dumps(sc.as_dict()))
        else:
            out = {"runs": [{"run": name, **s.as_dict()} for name, s in named], "pooled": sc.as_dict()}
            typer.echo(json.dumps(out))
        return
    if not single:
        _runs_table(named, sc)
        typer.echo("")
    rows = _summary_rows(sc, significant)
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{w}}  {v}")
    if pairs is not None:
        typer.echo(f"pairs written to {pairs}")
    if plot is not None:
        typer.echo(f"plot written to {plot}")


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise UserError(f"{flag}: expected comma-separated numbers, got {text!r}")
    return vals


@app.command()
@friendly
def synth(
    out: Path = typer.Argument(..., help="directory to write the run to (created)"),
    params_file: Path | None = typer.Option(
        None, "--params", help="parameter file (.json or .toml); flags override it"
    ),
    stalls: int | None = typer.Option(None, "--stalls", help="number of stalls (default 30)"),
    durations: str | None = typer.Option(
        None, "--durations", help="explicit stall durations, comma-separated seconds"
    ),
    min_len: float | None = typer.Option(None, "--min-len", help="shortest random stall, s (default 0.4)"),
    max_len: float | None = typer.Option(None, "--max-len", help="longest random stall, s (default 6)"),
    p: float | None = typer.Option(None, "--p", help="signalling interval p, s (default 0.2)"),
    n: int | None = typer.Option(None, "--n", help="toggles per signal n (default 4)"),
    delay: float | None = typer.Option(None, "--delay", help="one-way path delay, s"),
    jitter: float | None = typer.Option(
        None, "--jitter", help="per-packet jitter, s (the paper's path: about 1)"
    ),
    jitter_dist: str | None = typer.Option(
        None, "--jitter-dist", help="uniform (0..jitter) or exponential (mean jitter)"
    ),
    loss: float | None = typer.Option(None, "--loss", help="candidate packet loss probability"),
    reorder: float | None = typer.Option(None, "--reorder", help="probability a packet is held back up to p"),
    offset: float | None = typer.Option(None, "--offset", help="router clock minus agent clock, s"),
    protocol: str | None = typer.Option(
        None, "--protocol", help="end-user agent signal protocol: tick (default, the paper's) or edges"
    ),
    seed: int | None = typer.Option(None, "--seed", help="random seed (default 0)"),
    pcap: bool = typer.Option(False, "--pcap", help="also write candidates.pcap"),
    as_json: bool = OptJson,
) -> None:
    """Write a synthetic run in the paper's file formats (truth, candidates, clicks)."""
    from iqn_ctl.evaluate.research import load_spec, make_spec, write_synth

    flags: dict[str, object] = {
        "stalls": stalls,
        "min_len": min_len,
        "max_len": max_len,
        "p": p,
        "n": n,
        "delay": delay,
        "jitter": jitter,
        "jitter_dist": jitter_dist,
        "loss": loss,
        "reorder": reorder,
        "offset": offset,
        "protocol": protocol,
        "seed": seed,
        "durations": _floats(durations, "--durations") if durations is not None else None,
    }
    spec = make_spec(load_spec(params_file) if params_file is not None else {}, flags)
    summary = write_synth(spec, out, pcap=pcap)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(
        f"{summary['stalls']} stall(s), {summary['signals']} signal(s), "
        f"{summary['candidates']} candidate(s) written to {out}"
    )


def _cell(v: object, column: str) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if column.endswith("_ms") and isinstance(v, float) else str(v)


@app.command()
@friendly
def sweep(
    out: Path = typer.Option(Path("sweep.csv"), "--out", help="table to write (.csv or .jsonl)"),
    plot: Path | None = typer.Option(None, "--plot", help="MAE against each parameter, to this PNG"),
    ps: str = typer.Option("0.2,0.5", "--p", help="values of p, comma-separated"),
    ns: str = typer.Option("2,4", "--n", help="values of n"),
    jitters: str = typer.Option("0,1", "--jitter", help="values of the uniform jitter, s"),
    losses: str = typer.Option("0,0.1", "--loss", help="values of the loss probability"),
    stalls: int = typer.Option(40, "--stalls", help="stalls per grid point"),
    seed: int = typer.Option(0, "--seed", help="random seed (same stalls at every grid point)"),
    protocols: str = typer.Option("tick", "--protocol", help="end-user agent signal protocols: tick, edges"),
    as_json: bool = OptJson,
) -> None:
    """Grid over p, n, jitter and loss through synth, replay and evaluate; both estimators."""
    from iqn_ctl.evaluate.research import SWEEP_FIELDS, SynthSpec, plot_sweep, write_rows
    from iqn_ctl.evaluate.research import sweep as run_sweep

    grid = {
        "p": _floats(ps, "--p"),
        "n": _floats(ns, "--n"),
        "jitter": _floats(jitters, "--jitter"),
        "loss": _floats(losses, "--loss"),
    }
    if stalls < 1:
        raise UserError(f"--stalls must be at least 1, got {stalls}")
    from iqn_ctl.engine.synth import PROTOCOLS

    protos = [x.strip() for x in protocols.split(",") if x.strip()]
    if not protos or any(x not in PROTOCOLS for x in protos):
        raise UserError(f"--protocol takes {' and/or '.join(PROTOCOLS)}, comma-separated; got {protocols!r}")
    rows = run_sweep(grid, SynthSpec(stalls=stalls, seed=seed), protocols=protos)
    write_rows(out, rows, SWEEP_FIELDS)
    if plot is not None:
        plot_sweep(rows, plot)
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
        return
    typer.echo(" ".join(f"{c:>9}" for c in SWEEP_FIELDS))
    for r in rows:
        typer.echo(" ".join(f"{_cell(r[c], c):>9}" for c in SWEEP_FIELDS))
    typer.echo(f"table written to {out}" + (f", plot to {plot}" if plot else ""))
