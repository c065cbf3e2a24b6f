"""The ``iqn-qos`` command line (typer): infer, predict, heatmap.

Every expected failure (bad line, unknown component, empty input) ends as one
``iqn-qos: error: ...`` line on stderr and exit status 2, never a traceback;
input is read and checked completely before anything is written to a store.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import typer

from .errors import QosError
from .friendly import friendly
from .io import read_media_lines
from .mle import L1_DEFAULT, Estimate, infer_slot, slots
from .predict import predict_path
from .topology import Topology, load_topology

app = typer.Typer(
    name="iqn-qos",
    help="Where do the stalls come from? Maximum-likelihood localisation of degraded components (QoSaaS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

OptSlot = typer.Option(
    900.0, "--slot", help="slot length, seconds (lines belong to the slot of their start t)"
)
OptTopo = typer.Option(None, "--topology", help="topology file (YAML, JSON or GraphML)")
OptThr = typer.Option(0.01, "--threshold", help="faulty when the interval's lower end exceeds this p")
OptL1 = typer.Option(
    L1_DEFAULT,
    "--l1",
    help="sparsity: L1 weight per unit of data choosing which components carry blame; 0: plain MLE",
)
OptStore = typer.Option(None, "--store", help="DuckDB file keeping lines and per-slot estimates")


def _topology(path: Path | None) -> Topology | None:
    return load_topology(path) if path is not None else None


def _check(slot: float, threshold: float, l1: float) -> None:
    if not slot > 0:
        raise QosError(f"--slot must be positive, got {slot}")
    if not 0 <= threshold < 1:
        raise QosError(f"--threshold must be in [0, 1), got {threshold}")
    if l1 < 0:
        raise QosError(f"--l1 must be >= 0, got {l1}")


def estimate_slots(
    source: str | None, *, slot: float, topology: Path | None, threshold: float, l1: float, store: Path | None
) -> Iterator[tuple[float, list[Estimate]]]:
    """(slot start, estimates) per slot of ``source``, or of the whole store when no source."""
    _check(slot, threshold, l1)
    if source is None and store is None:
        raise QosError("give media lines (a file or -) or --store FILE with lines already stored")
    lines = read_media_lines(source, _topology(topology)) if source is not None else None
    if store is None:
        assert lines is not None
        for start, group in slots(lines, slot):
            yield start, infer_slot(group, threshold=threshold, l1=l1)
        return
    from .store import Store, slots_of

    with Store(store) as db:
        if lines is not None:
            db.add_lines(lines)
            starts = slots_of(lines, slot)
        else:
            starts = db.slot_starts(slot)
            if not starts:
                raise QosError(f"{store}: no media lines stored")
        for start in starts:
            yield start, db.infer(start, slot, threshold=threshold, l1=l1)


def _name(c: str | tuple[str, ...]) -> str:
    return c if isinstance(c, str) else "+".join(c)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _obj(start: float, e: Estimate) -> dict[str, object]:
    comp: object = e.component if isinstance(e.component, str) else list(e.component)
    return {
        "slot": start,
        "component": comp,
        "p": e.p,
        "lo": e.lo,
        "hi": e.hi,
        "lines": e.lines,
        "faulty": e.faulty,
    }


@app.command()
@friendly
def infer(
    lines: str = typer.Argument(None, help="media lines (JSON lines), '-' for stdin; omit to use --store"),
    slot: float = OptSlot,
    topology: Path = OptTopo,
    threshold: float = OptThr,
    l1: float = OptL1,
    as_json: bool = typer.Option(False, "--json", help="one JSON object per slot and component"),
    store: Path = OptStore,
) -> None:
    """Estimate each component's bad-unit rate per slot, worst first."""
    for start, ests in estimate_slots(
        lines, slot=slot, topology=topology, threshold=threshold, l1=l1, store=store
    ):
        if as_json:
            for e in ests:
                typer.echo(json.dumps(_obj(start, e)))
            continue
        nf = sum(e.faulty for e in ests)
        typer.echo(f"slot {_when(start)} UTC ({start:.0f}): {len(ests)} components, {nf} faulty")
        typer.echo(f"  {'component':<32} {'p':>9} {'lo':>9} {'hi':>9} {'lines':>6}  faulty")
        for e in ests:
            typer.echo(
                f"  {_name(e.component):<32} {e.p:9.5f} {e.lo:9.5f} {e.hi:9.5f} {e.lines:6d}  "
                f"{'FAULTY' if e.faulty else ''}"
            )


@app.command()
@friendly
def predict(
    path: str = typer.Option(None, "--path", help="comma-separated component ids, e.g. wifi-3,paris,relay-1"),
    client: str = typer.Option(None, "--client", help="client address (needs --topology)"),
    server: str = typer.Option(None, "--server", help="server address (needs --topology)"),
    topology: Path = OptTopo,
    store: Path = typer.Option(..., "--store", help="DuckDB file written by 'iqn-qos infer --store'"),
    recent: int = typer.Option(4, "--slots", help="use the latest K slots"),
    half_life: float = typer.Option(1.0, "--half-life", help="weight halves every this many slots back"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Expected bad-unit rate on a path, from the latest slots (recent slots weigh more)."""
    topo = _topology(topology)
    if path is not None:
        if client is not None or server is not None:
            raise QosError("give either --path or --client/--server, not both")
        comps = tuple(c.strip() for c in path.split(",") if c.strip())
        if not comps:
            raise QosError("--path: no component ids")
        if topo is not None:
            for c in comps:
                if c not in topo.components:
                    raise QosError(f"--path: unknown component {c!r} (not in the topology)")
    elif client is not None and server is not None:
        if topo is None:
            raise QosError("--client/--server need --topology to resolve the path")
        comps = topo.resolve(client, server)
    else:
        raise QosError("give --path A,B,C or --client ADDR --server ADDR --topology FILE")
    if recent < 1:
        raise QosError(f"--slots must be >= 1, got {recent}")
    if not store.exists():
        raise QosError(f"{store}: no such store (run 'iqn-qos infer LINES --store {store}' first)")
    from .store import Store

    with Store(store) as db:
        history = db.latest(recent)
    if not history:
        raise QosError(f"{store}: no estimates stored yet")
    fc = predict_path(comps, history, half_life=half_life)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "path": list(fc.path),
                    "p": fc.p,
                    "lo": fc.lo,
                    "hi": fc.hi,
                    "slots": fc.slots,
                    "unknown": list(fc.unknown),
                }
            )
        )
        return
    typer.echo(
        f"{','.join(fc.path)}: p = {fc.p:.5f} [{fc.lo:.5f}, {fc.hi:.5f}] from {fc.slots} slot(s)"
        + (f"; no estimate for {','.join(fc.unknown)}" if fc.unknown else "")
    )


@app.command()
@friendly
def heatmap(
    lines: str = typer.Argument(None, help="media lines (JSON lines), '-' for stdin; omit to use --store"),
    out: Path = typer.Option(..., "--out", help="PNG file to write"),
    component: str = typer.Option(None, "--component", help="one component's time series instead"),
    slot: float = OptSlot,
    topology: Path = OptTopo,
    threshold: float = OptThr,
    l1: float = OptL1,
    store: Path = OptStore,
) -> None:
    """Components x slots (only components ever faulty; colour = p), or one component over time."""
    from .heatmap import plot_component, plot_heatmap

    per_slot = list(
        estimate_slots(lines, slot=slot, topology=topology, threshold=threshold, l1=l1, store=store)
    )
    if component is not None:
        plot_component(per_slot, component, out, slot_s=slot)
    else:
        plot_heatmap(per_slot, out, threshold=threshold)
    typer.echo(f"wrote {out}")


@app.command("from-agent")
@friendly
def from_agent(
    state_dir: Path = typer.Argument(..., help="the IQN agent's state dir (or its stalls.sqlite)"),
    router: str = typer.Option(
        None, "--router", help="router id for the lines (default: the agent's host name)"
    ),
    topology: Path = OptTopo,
    out: Path = typer.Option(None, "--out", help="write the media lines here instead of stdout"),
) -> None:
    """Media lines (one per client and slot: n watched seconds, m not stalled) from an ISP agent's history."""
    from .from_agent import read_sessions
    from .lines import to_json

    lines = list(read_sessions(state_dir, router, _topology(topology)))
    if not lines:
        raise QosError(f"{state_dir}: no watched-time records yet (the agent writes one per client and slot)")
    text = "".join(to_json(ln) + "\n" for ln in lines)
    if out is None:
        sys.stdout.write(text)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise QosError(f"{out}: {e.strerror}") from None


from . import cli_synth  # noqa: E402  (QOS-B: the synth command)

cli_synth.register(app)


def main(argv: Sequence[str] | None = None) -> None:
    app(args=list(argv) if argv is not None else None, prog_name="iqn-qos")
