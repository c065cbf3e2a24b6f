"""The ``iqn-lab`` command line: up, down, status, rate, jitter, exec.

Expected failures (not root, bad rate, lab not up) end as one
``iqn-lab: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import typer

from iqn_ctl.clikit import friendly_for, make_app

from .demo import cli as demo_cli
from .lab import Lab, LabError
from .shaping import parse_rate
from .topology import ROLES

app = make_app("iqn-lab", "IQN lab: client - OpenVPN tunnel - router - OTT (HTTP/3) in network namespaces.")
friendly = friendly_for("iqn-lab", permission_hint="run as root")
OptPrefix = typer.Option(
    os.environ.get("IQN_LAB_PREFIX", "iqnlab"), "--prefix", help="name prefix of this lab instance"
)


def _root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (namespaces, OpenVPN, nftables): run with sudo")


@app.command()
@friendly
def up(
    prefix: str = OptPrefix,
    rate: str = typer.Option("none", "--rate", help="server-to-client bottleneck, e.g. 1mbit, 300kbit, none"),
    schedule: str | None = typer.Option(
        None, "--schedule", help="rate steps SECONDS:RATE,... e.g. 0:none,20:300kbit,40:none"
    ),
    repeat: float = typer.Option(0.0, "--repeat", help="restart the schedule every this many seconds"),
    topology: str = typer.Option(
        "basic", "--topology", help="basic (client - OpenVPN - router - OTT) or localise (docs/lab.md)"
    ),
    slot: float = typer.Option(30.0, "--slot", help="localise: the agents' watched-time slot, seconds"),
    nats_nodes: int = typer.Option(1, "--nats-nodes", help="localise: JetStream nodes, 1 or 3 (a cluster)"),
) -> None:
    """Build the lab (idempotent: if it is up, only the bottleneck changes)."""
    if topology == "localise":
        _up_localise(prefix, slot, nats_nodes)
        return
    if topology != "basic":
        raise LabError(f"--topology must be basic or localise, got {topology!r}")
    bits = parse_rate(rate)
    lab = Lab(prefix)
    _root()
    t0 = time.monotonic()
    lab.up(rate=bits, schedule=schedule, repeat=repeat)
    st = lab.status()
    typer.echo(f"lab {prefix} up in {time.monotonic() - t0:.1f} s")
    typer.echo(f"  namespaces   {' '.join(st['namespaces'].values())}")
    typer.echo(f"  ISP agent    ip netns exec {lab.router_ns} iqn-ctl attach {lab.router_ott_iface}")
    how = " (schedule)" if schedule else ""
    typer.echo(f"  bottleneck   {st['rate']} on {st['router_client_iface']}{how}")
    typer.echo(f"  player       {lab.player_url} (from the client namespace; see iqn-lab status --json)")


def _up_localise(prefix: str, slot: float, nats_nodes: int) -> None:
    from .localise.lab import LocaliseLab

    _root()
    t0 = time.monotonic()
    info = LocaliseLab(prefix).up(slot=slot, nats_nodes=nats_nodes, say=lambda m: typer.echo(f"  {m}"))
    typer.echo(f"localisation lab {prefix} up in {time.monotonic() - t0:.1f} s")
    typer.echo(f"  QoS topology {info['qos_topology']}")
    for rid, a in info["agents"].items():
        typer.echo(f"  ISP agent    {rid}: {a['iface']} in {a['ns']} (state {a['state_dir']})")
    if info["service"]:
        typer.echo(f"  QoS service  {info['service']['url']} (in {info['namespaces']['ops']})")
    typer.echo(f"  players      iqn-lab demo --localise, or python -m iqn_lab.player in {prefix}-suba/b/c")


@app.command()
@friendly
def down(prefix: str = OptPrefix) -> None:
    """Remove the lab: processes, namespaces, interfaces, state (also after a crash)."""
    from .localise.lab import LocaliseLab
    from .mitigation.lab import MitigationLab

    _root()
    removed = Lab(prefix).down() + LocaliseLab(prefix).down()
    if MitigationLab.valid(prefix):  # the mitigation demo's lab, left by a crash of the demo
        removed += MitigationLab(prefix).down()
    typer.echo(f"lab {prefix}: removed {len(removed)} item(s)" if removed else f"lab {prefix}: nothing to do")


@app.command()
@friendly
def status(
    prefix: str = OptPrefix, as_json: bool = typer.Option(False, "--json", help="machine-readable")
) -> None:
    """Show whether the lab is up, its daemons, tunnel and bottleneck."""
    _root()
    from .localise.lab import LocaliseLab

    loc = LocaliseLab(prefix)
    if loc.exists():
        lst = loc.status()
        if as_json:
            typer.echo(json.dumps(lst))
            return
        typer.echo(f"localisation lab {prefix}: {'up' if lst['up'] else 'DEGRADED (iqn-lab down, then up)'}")
        for d, pid in lst.get("daemons", {}).items():
            typer.echo(f"  {d:<16} {'pid ' + str(pid) if pid else 'NOT RUNNING'}")
        fault = lst.get("fault")
        typer.echo(f"  fault            {fault['component'] + ' on ' + fault['iface'] if fault else 'none'}")
        return
    st = Lab(prefix).status()
    if as_json:
        typer.echo(json.dumps(st))
        return
    if not st["namespaces"]:
        typer.echo(f"lab {prefix}: down")
        return
    typer.echo(f"lab {prefix}: {'up' if st['up'] else 'DEGRADED (run iqn-lab up to rebuild)'}")
    for role, ns in st["namespaces"].items():
        typer.echo(f"  {role:<7} {ns}")
    for d, pid in st["daemons"].items():
        typer.echo(f"  {d:<15} {'pid ' + str(pid) if pid else 'NOT RUNNING'}")
    typer.echo(f"  tunnel          {'up' if st['tunnel'] else 'DOWN'}")
    typer.echo(f"  bottleneck      {st.get('rate')} on {st.get('router_client_iface')}")
    if st.get("schedule"):
        state = "running" if st.get("schedule_running") else "finished"
        typer.echo(f"  schedule        {st['schedule']} ({state})")
    typer.echo(f"  ISP agent iface {st.get('router_ott_iface')} in {st['namespaces'].get('router')}")
    typer.echo(f"  player          {st.get('player_url')}")
    typer.echo(f"  request log     {st.get('request_log')}")


@app.command()
@friendly
def rate(
    value: str = typer.Argument(..., help="e.g. 1mbit, 300kbit or none"), prefix: str = OptPrefix
) -> None:
    """Change the bottleneck now (stops a running schedule)."""
    _root()
    lab = Lab(prefix)
    bits = parse_rate(value)
    lab.stop_schedule()
    lab.set_rate(bits)
    typer.echo(f"lab {prefix}: bottleneck {value}")


@app.command()
@friendly
def jitter(
    delay: str = typer.Argument(..., help="constant part of the delay, seconds, or 'off'"),
    spread: float = typer.Option(0.0, "--jitter", help="jitter, seconds (the paper's path: about 1)"),
    dist: str = typer.Option(
        "uniform", "--dist", help="constant, uniform (delay + U(0, jitter)), normal (sd jitter) or "
                                  "exponential (mean jitter)",
    ),
    prefix: str = OptPrefix,
) -> None:
    """Delay the OTT's packets to the router (the server-to-client path) with jitter; 'off' stops it."""
    from . import jitter as J

    if delay.strip().lower() == "off":
        _root()
        lab = Lab(prefix)
        typer.echo(f"lab {prefix}: " + ("jitter off" if J.stop_bg(lab.state) else "no jitter was on"))
        return
    try:
        seconds = float(delay)
    except ValueError:
        raise LabError(f"bad delay {delay!r}: seconds (e.g. 0.05) or off") from None
    spec = J.Jitter(seconds, spread, dist)
    _root()
    lab = Lab(prefix)
    lab.need_ns("ott")
    pid = J.start(lab.names.ott_if, spec, lab.ott_ns, lab.state)
    typer.echo(f"lab {prefix}: {dist} jitter on {lab.names.ott_if} "
               f"(delay {seconds:g} s, jitter {spread:g} s; "
               f"delay line pid {pid}, log {lab.state / 'jitter.log'})")


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@friendly
def exec_(
    role: str = typer.Argument(..., help=f"one of: {', '.join(ROLES)}"),
    command: list[str] = typer.Argument(..., help="command and its arguments (put -- before options)"),
    prefix: str = OptPrefix,
) -> None:
    """Run a command inside a lab namespace, e.g. iqn-lab exec client -- ping -c1 198.19.0.2."""
    lab = Lab(prefix)
    lab.ns(role)  # validates the role
    _root()
    try:
        rc = lab.exec(role, command).returncode
    except FileNotFoundError:
        raise LabError("ip not found: install iproute2") from None
    except subprocess.SubprocessError as e:
        raise LabError(str(e)) from None
    raise typer.Exit(rc)


app.command(name="demo")(friendly(demo_cli.demo))


def main() -> None:
    app(prog_name="iqn-lab")


if __name__ == "__main__":
    main()
