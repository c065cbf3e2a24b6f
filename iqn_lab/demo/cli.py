"""``iqn-lab demo``: the end-to-end demo (registered on :data:`iqn_lab.cli.app` by that module).

A separate module so the demo's imports (Selenium, the user agent, scoring)
stay out of the lab's everyday commands. Expected failures become one
``iqn-lab: error:`` line through :func:`iqn_lab.cli.friendly`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from iqn_ctl.engine import params as P
from iqn_lab.lab import LabError


def demo(
    prefix: str = typer.Option("iqndemo", "--prefix", help="name prefix of the demo's lab instance"),
    out: Path | None = typer.Option(None, "--out", help="results dir (default results/demo-<UTC time>)"),
    stalls: int = typer.Option(24, "--stalls", help="bottleneck squeezes, one stall each"),
    p: float = typer.Option(P.DEFAULT_P, "--p", help="end-user agent's signalling interval, seconds"),
    n: int = typer.Option(P.DEFAULT_N, "--n", help="toggles per signal (even)"),
    starve_rate: str = typer.Option("100kbit", "--starve-rate", help="media path rate during a squeeze"),
    release: float = typer.Option(5.0, "--release", help="seconds unshaped between squeezes"),
    seed: int = typer.Option(
        1, "--seed", help="order of the stall lengths (localise: the players' signal phases)"
    ),
    localise: bool = typer.Option(
        False, "--localise", help="the localisation demo: a fault, many signal players, the QoS service"
    ),
    fault: str = typer.Option("access", "--fault", help="localise: access (sub-a's link) or server (srv-1)"),
    slot: float = typer.Option(30.0, "--slot", help="localise: slot length, seconds"),
    slots: int = typer.Option(4, "--slots", help="localise: slots to run (at least 2)"),
    players: int = typer.Option(10, "--players", help="localise: signal players per subnet (3 subnets)"),
    rate: str | None = typer.Option(
        None, "--rate", help="localise: the fault's bottleneck (default: 0.6 x the video behind it)"
    ),
    nats_nodes: int = typer.Option(1, "--nats-nodes", "--cluster", help="localise: JetStream nodes, 1 or 3"),
    kill_node: bool = typer.Option(
        False, "--kill-node", help="localise, with --cluster 3: SIGKILL one JetStream node mid-run"
    ),
    keep: bool = typer.Option(False, "--keep", help="localise: leave the lab up at the end (iqn-lab down)"),
    protocol: str = typer.Option("edges", "--protocol", help="user agent signal protocol: edges or tick"),
    truth_stamp: str = typer.Option(
        "paint", "--truth-stamp",
        help="ground truth: the spinner as painted (paint, what the viewer sees) or its DOM change (dom); "
             "the report scores against both",
    ),
    witness: bool = typer.Option(
        False, "--witness", help="also grab the spinner's box and a patch of the picture at 200/s: when the "
        "screen shows each edge (edges.tsv, witness.tsv; costs a few per cent of a core)",
    ),
    mitigation: bool = typer.Option(
        False, "--mitigation",
        help="the mitigation experiment: viewers and bulk TCP through one bottleneck, without and with "
             "iqn-ctl attach --mitigate (results/<run>/mitigation.json)",
    ),
    link: str = typer.Option("4mbit", "--link", help="mitigation: the bottleneck's rate"),
    viewers: int = typer.Option(6, "--viewers", help="mitigation: signal players"),
    duration: float = typer.Option(90.0, "--duration", help="mitigation: seconds per run"),
    boost_gap: float = typer.Option(5.0, "--boost-gap", help="mitigation: the agent's --boost-gap"),
) -> None:
    """Lab, ISP agent (XDP), headful Chromium, end-user agent, stalls on a timetable; report at the end.
    With --localise: a fault on one component, many signal players, the QoS service's ranking."""
    if mitigation:
        _mitigation(prefix, out, link, viewers, duration, seed, boost_gap)
        return
    if localise:
        _localise(prefix, out, p, n, fault, slot, slots, players, rate, nats_nodes, keep, seed, kill_node)
        return
    from iqn_lab.demo.report import ReportError
    from iqn_lab.demo.run import DemoConfig, check, run_demo
    from iqn_lab.xvfb import XvfbError
    from user_agent.errors import AgentError

    if os.geteuid() != 0:
        raise LabError("the demo needs root (namespaces, XDP, OpenVPN): run with sudo")
    if stalls < 1 or release <= 0:
        raise LabError("--stalls must be at least 1 and --release positive")
    out = out or Path("results") / time.strftime("demo-%Y%m%dT%H%M%SZ", time.gmtime())
    cfg = DemoConfig(out=out.resolve(), prefix=prefix, stalls=stalls, p=p, n=n, starve_rate=starve_rate,
                     seed=seed, release=release, protocol=protocol, truth_stamp=truth_stamp,
                     witness=witness)  # fmt: skip
    try:
        check(cfg)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LabError(f"{out}: cannot create the results directory: {e.strerror or e}") from None
        run_demo(cfg, say=lambda msg: typer.echo(msg))
    except (XvfbError, ReportError, AgentError, ValueError) as e:
        raise LabError(str(e)) from None


def _mitigation(prefix: str, out: Path | None, link: str, viewers: int, duration: float, seed: int,
                boost_gap: float) -> None:
    from iqn_lab.mitigation.demo import MitigationConfig, check, run_mitigation
    from iqn_lab.shaping import parse_rate

    if os.geteuid() != 0:
        raise LabError("the demo needs root (namespaces, XDP, tc): run with sudo")
    bits = parse_rate(link)
    if bits is None:
        raise LabError("--link must be a rate, e.g. 6mbit")
    out = out or Path("results") / time.strftime("mitigation-%Y%m%dT%H%M%SZ", time.gmtime())
    cfg = MitigationConfig(out=out.resolve(), prefix=prefix if prefix != "iqndemo" else "iqnmit",
                           link_bps=bits, viewers=viewers, duration=duration, seed=seed,
                           boost_gap=boost_gap)
    check(cfg)
    run_mitigation(cfg, say=lambda msg: typer.echo(msg))


def _localise(prefix: str, out: Path | None, p: float, n: int, fault: str, slot: float, slots: int,
              players: int, rate: str | None, nats_nodes: int, keep: bool, seed: int,
              kill_node: bool) -> None:
    from iqn_lab.localise.demo import LocaliseConfig, run_localise
    from iqn_lab.shaping import parse_rate

    if os.geteuid() != 0:
        raise LabError("the demo needs root (namespaces, XDP, tc): run with sudo")
    if fault not in ("access", "server"):
        raise LabError(f"--fault must be access or server, got {fault!r}")
    bits = parse_rate(rate) if rate is not None else None
    prefix = "iqnloc" if prefix == "iqndemo" else prefix
    out = out or Path("results") / time.strftime(f"localise-{fault}-%Y%m%dT%H%M%SZ", time.gmtime())
    cfg = LocaliseConfig(out=out.resolve(), prefix=prefix, fault=fault, slot=slot, slots=slots,
                         players=players, rate=bits, nats_nodes=nats_nodes, p=p, n=n, keep=keep,
                         seed=seed, kill_node=kill_node)
    run_localise(cfg, say=lambda msg: typer.echo(msg))
