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
from typing import Any

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



def _show_version(value: bool) -> None:
    if value:
        from iqn_common.version import version_line

        typer.echo(version_line("iqn-qos"))
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_show_version,
        help="print the version (and the git commit when run from a checkout) and exit",
    ),
) -> None:
    pass


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
    store: Path = typer.Option(None, "--store", help="DuckDB file written by 'iqn-qos infer --store'"),
    service: str = typer.Option(None, "--service", help="ask a running 'iqn-qos serve' (its URL) instead"),
    recent: int = typer.Option(4, "--slots", help="use the latest K slots"),
    half_life: float = typer.Option(1.0, "--half-life", help="weight halves every this many slots back"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Expected bad-unit rate on a path, from the latest slots (recent slots weigh more)."""
    if (store is None) == (service is None):
        raise QosError("give either --store FILE or --service URL")
    if service is not None:
        if path is None and (client is None or server is None):
            raise QosError("give --path A,B,C or --client ADDR --server ADDR")
        q = {"path": path} if path is not None else {"client": client, "server": server}
        fc = service_get(service, "/api/predict", {**q, "slots": recent, "half_life": half_life})
        _print_forecast(fc, as_json)
        return
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
    _print_forecast(
        {"path": list(fc.path), "p": fc.p, "lo": fc.lo, "hi": fc.hi, "slots": fc.slots,
         "unknown": list(fc.unknown)},
        as_json,
    )


def _print_forecast(fc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(fc))
        return
    typer.echo(
        f"{','.join(fc['path'])}: p = {fc['p']:.5f} [{fc['lo']:.5f}, {fc['hi']:.5f}]"
        f" from {fc['slots']} slot(s)"
        + (f"; no estimate for {','.join(fc['unknown'])}" if fc["unknown"] else "")
    )


def service_get(base: str, path: str, query: dict[str, object] | None = None) -> Any:
    """GET a JSON endpoint of a running ``iqn-qos serve``; its errors are one line."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    url = base.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            msg = e.reason
        raise QosError(f"{base}: {msg}") from None
    except (urllib.error.URLError, OSError) as e:
        raise QosError(f"--service {base}: cannot reach the service ({getattr(e, 'reason', e)})") from None
    except ValueError:
        raise QosError(f"--service {base}: not an iqn-qos service (no JSON at {path})") from None


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


@app.command()
@friendly
def serve(
    nats: list[str] = typer.Option(..., "--nats", help="NATS server URL (repeat for a cluster's seeds)"),
    topology: Path = typer.Option(..., "--topology", help="topology file (YAML, JSON or GraphML)"),
    store: Path = typer.Option(..., "--store", help="DuckDB file for lines, records and estimates"),
    durable: str = typer.Option("iqn-qos", "--durable", help="name of the durable JetStream consumer"),
    slot: float = typer.Option(900.0, "--slot", help="slot length, seconds"),
    grace: float = typer.Option(10.0, "--grace", help="a slot closes this many seconds after its end"),
    listen: str = typer.Option("127.0.0.1:9480", "--listen", help="HTTP address: web page, /metrics, API"),
    threshold: float = OptThr,
    l1: float = OptL1,
    batch: int = typer.Option(5000, "--batch", help="messages per pull request"),
    pullers: int = typer.Option(
        0, "--pullers", envvar="IQN_QOS_PULLERS",
        help="processes that pull and decode (each on the durable consumer; this one stores); 0: pull here"),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error"),
    log_format: str = typer.Option(
        "text", "--log-format",
        help="text (no time stamp when stderr is the systemd journal) or json (one object per line)",
    ),
) -> None:
    """The live QoS service: consume the routers' export (NATS JetStream), store, infer, serve."""
    import re

    from iqn_common.logsetup import check as check_log

    from .serve import ServeConfig, main, parse_listen

    check_log(log_level, log_format, QosError)
    _check(slot, threshold, l1)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", durable):
        raise QosError(f"--durable must match [A-Za-z0-9_-]{{1,64}}, got {durable!r}")
    if not 1 <= batch <= 100_000:
        raise QosError(f"--batch must be in 1..100000, got {batch}")
    if not 0 <= pullers <= 32:
        raise QosError(f"--pullers must be in 0..32, got {pullers}")
    host, port = parse_listen(listen)
    main(ServeConfig(nats=nats, topology=topology, store=store, durable=durable, slot_s=slot, grace_s=grace,
                     host=host, port=port, batch=batch, threshold=threshold, l1=l1, pullers=pullers),
         log_level=log_level, log_format=log_format)


@app.command()
@friendly
def components(
    service: str = typer.Option(..., "--service", help="URL of a running 'iqn-qos serve'"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per component"),
    top: int = typer.Option(0, "--top", help="only the worst K (0: all)"),
) -> None:
    """The running service's components, worst first (latest slot), with their latest estimate."""
    got = service_get(service, "/api/components")
    comps = got.get("components", [])[: top or None]
    if as_json:
        for c in comps:
            typer.echo(json.dumps({k: c[k] for k in ("slot", "component", "kind", "p", "lo", "hi", "lines",
                                                      "faulty")}))
        return
    last = got.get("last_slot")
    typer.echo(f"latest slot inferred: {_when(last) + ' UTC' if last is not None else 'none yet'}; "
               f"{len(got.get('components', []))} components")
    typer.echo(f"  {'component':<32} {'kind':<16} {'p':>9} {'lo':>9} {'hi':>9} {'lines':>6}  faulty")
    for c in comps:
        typer.echo(f"  {c['name']:<32} {c['kind']:<16} {c['p']:9.5f} {c['lo']:9.5f} {c['hi']:9.5f} "
                   f"{c['lines']:6d}  {'FAULTY' if c['faulty'] else ''}")


from . import cli_synth  # noqa: E402  (QOS-B: the synth command)

cli_synth.register(app)


def main(argv: Sequence[str] | None = None) -> None:
    app(args=list(argv) if argv is not None else None, prog_name="iqn-qos")
