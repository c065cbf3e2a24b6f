"""``iqn-ctl attach / detach / flows / stalls / status``: the live agent's commands.

Registered on :data:`iqn_ctl.cli.app` by importing this module. Output is a
table for people and ``--json`` for scripts (shapes in docs/contracts.md). Every
expected failure (not root, no such interface, foreign XDP program, agent
already running, no agent) is one ``iqn-ctl: error:`` line and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import typer

from iqn_ctl.engine import boost as BOOST
from iqn_ctl.engine import params as P
from iqn_ctl.engine.watch import DEFAULT_SLOT
from iqn_ctl.live.api import DEFAULT_RUN_DIR, NoAgent, agent_sockets, request, sock_path
from iqn_ctl.live.history import DEFAULT_STATE_DIR, History
from iqn_ctl.live.settings import (
    DEFAULT_BACKLOG,
    DEFAULT_DIRECTION,
    DEFAULT_HOOK,
    DEFAULT_RING_PAGES,
    DEFAULT_VOL_SAMPLE,
    DEFAULT_XDP_MODE,
)
from iqn_ctl.live.watchdog import DEFAULT_PERIOD as DEFAULT_WATCHDOG

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
    fmt_time,
    friendly,
)

# readable=False: click would refuse an unreadable directory with a usage box; the
# commands say what is wrong themselves, in one line (not root, not in the group)
OptRunDir = typer.Option(
    DEFAULT_RUN_DIR, "--run-dir", envvar="IQN_RUN_DIR", hidden=True, readable=False,
    help="where agents keep their sockets and pid files",
)
OptStateDir = typer.Option(
    DEFAULT_STATE_DIR, "--state-dir", envvar="IQN_STATE_DIR", readable=False,
    help="where the stall history is kept",
)


OptLogLevel = typer.Option("info", "--log-level", help="debug, info, warning or error")
OptLogFormat = typer.Option(
    "text", "--log-format",
    help="text (no time stamp when stderr is the systemd journal) or json (one object per line)",
)


def _setup_logging(handler: logging.Handler | None = None, level: str = "info", fmt: str = "text") -> None:
    from iqn_common.logsetup import configure

    configure(level, fmt, handler)


@app.command()
@friendly
def attach(
    ctx: typer.Context,
    ifaces: list[str] | None = typer.Argument(
        None, metavar="[IFACE]...",
        help="interfaces on the server-to-client path, e.g. eth0 (several: one process, one /metrics); "
             "none: every [interfaces.NAME] of --config",
    ),
    config: Path | None = typer.Option(
        None, "--config", envvar="IQN_CONFIG",
        help="TOML config file (e.g. /etc/iqn/iqn.toml): [global] and [interfaces.NAME] sections, a key per "
             "flag; flags override it (docs/agent.md, 'Config file')",
    ),
    watchdog: float = typer.Option(
        DEFAULT_WATCHDOG, "--watchdog",
        help="seconds between checks that IQN's program is still attached (replaced, removed, interface "
             "gone: logged, shown, attached again); 0: off",
    ),
    p: float = OptP,
    n: int = OptN,
    min_size: int = OptMin,
    max_size: int = OptMax,
    port: int = OptPort,
    xdp_mode: str = typer.Option(
        DEFAULT_XDP_MODE, "--xdp-mode", help="auto (native, else generic), native or skb"
    ),
    daemon: bool = typer.Option(False, "--daemon", help="run in the background (pid file in the run dir)"),
    key: str = OptKey,
    max_flows: int = typer.Option(
        P.DEFAULT_MAX_FLOWS, "--max-flows", help="flows tracked at once (least recent dropped)"
    ),
    state_dir: Path = OptStateDir,
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="serve Prometheus /metrics here"),
    metrics_addr: str = typer.Option(
        "127.0.0.1", "--metrics-addr",
        help="address for --metrics-port (loopback by default; e.g. 0.0.0.0 opens it to the network)",
    ),
    redact: bool = typer.Option(
        False, "--redact", help="log client addresses as keyed hashes (anon-...), not in the clear"
    ),
    force: bool = typer.Option(False, "--force", help="replace another XDP program already on IFACE"),
    estimator: str = OptEstimator,
    ring_pages: int = typer.Option(
        DEFAULT_RING_PAGES, "--ring-pages", "--perf-pages",
        help="ring buffer size, 4 KiB pages shared by all CPUs (a power of two; --perf-pages: old name)",
    ),
    bulk_ratio: float = OptBulkRatio,
    source_rate: float = typer.Option(
        P.DEFAULT_SOURCE_RATE, "--source-rate",
        help="new flows per second (and per burst) one server address may open; more are refused "
             "and counted (status 'refused'); 0: no limit",
    ),
    slot: float = typer.Option(
        DEFAULT_SLOT, "--slot",
        help="seconds per watched-time record (the sessions table read by 'iqn-qos from-agent')",
    ),
    export: list[str] | None = typer.Option(
        None, "--export",
        help="ship finished stalls and watched-time records to NATS JetStream at nats://HOST:PORT "
             "(repeat for a cluster's seeds; docs/export.md)",
    ),
    router_id: str | None = typer.Option(
        None, "--router-id",
        help="this router's name in export subjects and records ([A-Za-z0-9_-], default: the host name)",
    ),
    export_replicas: int | None = typer.Option(
        None, "--export-replicas",
        help="replicas of the IQN stream if the agent creates it (default: 3 with 3+ --export seeds, else 1)",
    ),
    export_batch: int = typer.Option(
        1, "--export-batch",
        help="records per export message: 1 sends schema-v1 messages; 2-1000 sends schema-v2 batches "
             "(faster; needs consumers that read v2, e.g. iqn-qos serve; docs/export.md)",
    ),
    hook: str = typer.Option(
        DEFAULT_HOOK, "--hook",
        help="auto: XDP, or a TC (clsact) classifier after another XDP program already on IFACE "
             "(nothing replaced) or where XDP cannot attach; xdp; tc",
    ),
    direction: str = typer.Option(
        DEFAULT_DIRECTION, "--direction",
        help="ingress, or egress (TC only: traffic leaving IFACE, e.g. server-to-client on a tunnel server)",
    ),
    backlog: int = typer.Option(
        DEFAULT_BACKLOG, "--backlog",
        help="candidate records the agent holds when it falls behind; past this the oldest are "
             "dropped and counted (status 'shed'), so the newest data is kept",
    ),
    vol_sample: int = typer.Option(
        DEFAULT_VOL_SAMPLE, "--vol-sample",
        help="the kernel counts the volume of 1 in this many non-candidate UDP datagrams from the "
             "port (each as this many; a power of two): 1 counts every one, exact volumes for the "
             "bulk rule and watched time at a little more kernel time per packet",
    ),
    pairing: str = typer.Option(
        "on", "--pairing",
        help="on: a candidate counts only if its client sent a packet to the server port shortly "
             "before (seen leaving IFACE by a TC egress program), so off-path senders cannot forge "
             "stalls; off: for one-directional taps (a mirror port)",
    ),
    pair_window: float = typer.Option(
        P.DEFAULT_PAIR_WINDOW, "--pair-window",
        help="seconds after a client packet its flow may carry candidates",
    ),
    cap: float | None = typer.Option(
        None, "--cap",
        help="signal bursts per second one client address may send to the agent (n candidates each); "
             "more are counted ('capped'), not emitted; default 10/p; 0: no cap",
    ),
    run_dir: Path = OptRunDir,
    log_level: str = OptLogLevel,
    log_format: str = OptLogFormat,
    group: str | None = typer.Option(
        None, "--group",
        help="group whose members may read the API socket and the stall history without root "
             "(default: iqn, if that group exists; '' for root only)",
    ),
    mitigate: str | None = typer.Option(
        None, "--mitigate", metavar="EGRESS_IFACE",
        help="while a client stalls, put its traffic in a priority class on EGRESS_IFACE (the link "
             "toward the viewers; the agent shapes it with an HTB at --link-rate): docs/agent.md",
    ),
    link_rate: str | None = typer.Option(
        None, "--link-rate",
        help="--mitigate: the egress link's rate, e.g. 20mbit (default: its reported speed)"),
    boost_rate: str = typer.Option(
        "2mbit", "--boost-rate", help="--mitigate: rate guaranteed to one boosted client"),
    boost_max: float = typer.Option(
        BOOST.DEFAULT_BOOST_MAX, "--boost-max", help="--mitigate: seconds of boost per episode at most"),
    boost_share: float = typer.Option(
        BOOST.DEFAULT_BOOST_SHARE, "--boost-share",
        help="--mitigate: fraction of the link all boosted clients may take together"),
    boost_gap: float = typer.Option(
        BOOST.DEFAULT_BOOST_GAP, "--boost-gap",
        help="--mitigate: seconds without a boost that end a client's episode (its boosts, at most "
             "--boost-max s in all)"),
) -> None:
    """Load the classifier on each IFACE (XDP or TC) and infer stalls live until SIGINT/SIGTERM."""
    from iqn_ctl.extras import require

    require("iqn-ctl attach", "pyroute2", "prometheus_client")  # the router role
    from iqn_ctl.live.agent import check_iface, need_root
    from iqn_ctl.live.config import KEYS, load
    from iqn_ctl.live.supervisor import serve

    values, explicit = _flag_values(ctx, KEYS)
    shared, cfgs, proc = load(config, list(ifaces or []), values, explicit)
    need_root("attach")
    for cfg in cfgs:
        check_iface(cfg.iface)
    level, fmt = proc["log-level"], proc["log-format"]
    if proc["daemon"]:
        _daemonize(cfgs, shared, level, fmt)
        return
    _setup_logging(None, level, fmt)
    serve(cfgs, shared)


def _flag_values(ctx: typer.Context, keys: dict[str, str]) -> tuple[dict[str, Any], set[str]]:
    """Every config key's value as this command line has it, and the keys given
    on it (or by environment variable): those override the config file."""
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    for param in ctx.command.params:
        key = next((o[2:] for o in param.opts if o.startswith("--") and o[2:] in keys), None)
        if key is None or param.name is None:
            continue
        values[key] = ctx.params[param.name]
        source = ctx.get_parameter_source(param.name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            explicit.add(key)
    missing = set(keys) - set(values)
    assert not missing, f"config keys without an attach flag: {sorted(missing)}"
    return values, explicit


def _daemonize(cfgs: list[Any], shared: Any, log_level: str = "info", log_format: str = "text") -> None:
    """Fork a detached agent; this process waits until it is attached (or has
    failed) so errors still reach the terminal and the exit status."""
    from iqn_ctl.live.agent import DaemonLog, InterfaceLock
    from iqn_ctl.live.api import ensure_private_dir
    from iqn_ctl.live.supervisor import serve

    for cfg in cfgs:
        holder = InterfaceLock(cfg.run_dir, cfg.iface).holder()
        if holder is not None:
            raise UserError(
                f"an IQN agent is already attached to {cfg.iface} (pid {holder}); "
                f"run 'iqn-ctl detach {cfg.iface}' first"
            )
    first = cfgs[0]
    names = ", ".join(c.iface for c in cfgs)
    ensure_private_dir(first.state_dir, "state dir")
    log_path = first.state_dir / f"{first.iface}.log"
    logfile = DaemonLog(log_path)  # opened here, so a refused log file is the caller's error
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode(errors="replace").strip()
        if msg.startswith("ok "):
            _, pid, where = msg.split(maxsplit=2)  # where: "XDP native", "XDP skb", "TC ingress"
            typer.echo(f"agent on {names} running in the background (pid {pid}, {where}); "
                       f"log: {log_path}")
            return
        raise UserError(msg or f"the agent on {names} died while starting; see {log_path}")
    # child: new session, then a second fork so the daemon can never regain a terminal
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    code = 0
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.close(devnull)
        logfile.redirect(1, 2)  # stray output follows the log across rotations
        os.chdir("/")
        _setup_logging(logfile, log_level, log_format)

        def ready(sup: Any) -> None:
            slots = list(sup.slots.values())
            where = (slots[0].agent.dp.describe() if len(slots) == 1 else
                     ", ".join(f"{s.iface}: {s.agent.dp.describe()}" for s in slots))
            os.write(w, f"ok {os.getpid()} {where}\n".encode())
            os.close(w)

        serve(cfgs, shared, on_ready=ready)
    except BaseException as e:
        msg = str(e) or type(e).__name__
        logging.getLogger("iqn.agent").error("%s: %s", names, msg)
        try:
            os.write(w, msg.encode())
        except OSError:
            pass
        code = 2
    finally:
        os._exit(code)


@app.command()
@friendly
def detach(
    iface: str = typer.Argument(..., help="interface the agent is attached to"),
    run_dir: Path = OptRunDir,
) -> None:
    """Stop the agent on IFACE and remove IQN's XDP program or TC classifier, also after the agent was
    killed (foreign programs and classifiers stay)."""
    from iqn_ctl.live.supervisor import detach as do_detach

    typer.echo(f"{iface}: {do_detach(iface, run_dir)}")


def _targets(run_dir: Path, iface: str | None) -> list[tuple[str, Path]]:
    if iface is not None:
        path = sock_path(run_dir, iface)
        if not path.exists():
            if not run_dir.exists() or os.access(run_dir, os.X_OK):
                raise UserError(f"no agent attached to {iface} (start one with 'iqn-ctl attach {iface}')")
            raise UserError(f"permission denied on {run_dir}: the IQN API is for root (use sudo)")
        return [(iface, path)]
    return agent_sockets(run_dir)


@app.command()
@friendly
def flows(
    iface: str | None = typer.Option(None, "--interface", "--iface", help="only this interface"),
    as_json: bool = OptJson,
    run_dir: Path = OptRunDir,
    stalling: bool = typer.Option(False, "--stalling", help="only flows in a stall"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="only the N flows seen last, per agent"),
) -> None:
    """Live flows of running agents."""
    out: list[dict[str, Any]] = []
    opts: dict[str, Any] = {"stalling": True} if stalling else {}
    if limit is not None:
        opts["limit"] = limit
    for name, path in _targets(run_dir, iface):
        try:
            got = request(path, "flows", iface=name, **opts)  # one process may serve several
        except NoAgent:
            if iface is not None:
                raise UserError(
                    f"the agent on {name} is not running (stale files; 'iqn-ctl detach {name}')"
                ) from None
            continue
        for f in got:
            f["iface"] = name
        out.extend(got)
    if as_json:
        typer.echo(json.dumps(out))
        return
    if not out:
        typer.echo("no flows (no candidate packets seen yet)" if iface or agent_sockets(run_dir) else
                   "no IQN agents running")
        return
    wi = max(5, *(len(f["iface"]) for f in out))
    wf = max(4, *(len(f["flow"]) for f in out))
    typer.echo(f"{'iface':<{wi}} {'flow':<{wf}} {'state':<6} {'cand':>7} {'stalls':>6} "
               f"{'stall since (UTC)':<23} {'last dur':>8} {'last seen (UTC)':<23}")
    for f in sorted(out, key=lambda r: (r["iface"], r["flow"])):
        since = fmt_time(f["stall_start"]) if f["stall_start"] is not None else "-"
        dur = f"{f['last_duration']:.2f}s" if f["last_duration"] is not None else "-"
        seen = fmt_time(f["last_seen"]) if f["last_seen"] is not None else "-"
        typer.echo(f"{f['iface']:<{wi}} {f['flow']:<{wf}} {f['state']:<6} {f['candidates']:>7} "
                   f"{f['stalls']:>6} {since:<23} {dur:>8} {seen:<23}")
    in_stall = sum(1 for f in out if f["state"] == "stall")
    typer.echo(f"{len(out)} flow(s), {in_stall} in a stall")


@app.command()
@friendly
def stalls(
    iface: str | None = typer.Option(None, "--interface", "--iface", help="only stalls seen on this one"),
    since: float | None = typer.Option(None, "--since", help="only stalls ending at/after this epoch"),
    as_json: bool = OptJson,
    state_dir: Path = OptStateDir,
) -> None:
    """Inferred stall history (read from disk; works with no agent running)."""
    from iqn_ctl.live.history import db_path

    try:
        present = db_path(state_dir).exists()
        if present and not os.access(db_path(state_dir), os.R_OK):
            raise PermissionError
    except PermissionError:
        msg = (f"permission denied on {state_dir}: the stall history is for root and the agent's group "
               "(use sudo, or join the group: docs/deploy.md)")
        raise UserError(msg) from None
    if not present:
        if not as_json:
            typer.echo(f"no stalls recorded (no history in {state_dir} yet)")
        return
    with History(state_dir, create=False) as h:
        recs = h.query(iface, since)
    if as_json:
        for r in recs:
            typer.echo(json.dumps(r.as_json()))
        return
    if not recs:
        where = (f" on {iface}" if iface else "") + (" in that period" if since else "")
        typer.echo(f"no stalls recorded{where}")
        return
    wi = max(5, *(len(r.iface) for r in recs))
    wf = max(4, *(len(r.flow) for r in recs))
    typer.echo(f"{'iface':<{wi}} {'flow':<{wf}} {'start (UTC)':<23} {'end (UTC)':<23} {'duration':>9}")
    for r in recs:
        # open/interrupted: the end is only the last moment the stall was known to go on
        mark = {"open": " (open: still going on, or its agent died)",
                "interrupted": " (interrupted: its agent died)"}.get(
            r.state, " (open at exit)" if r.truncated else "")
        typer.echo(f"{r.iface:<{wi}} {r.flow:<{wf}} {fmt_time(r.start):<23} {fmt_time(r.end):<23} "
                   f"{r.duration:>8.3f}s{mark}")
    typer.echo(f"{len(recs)} stall(s)")


def _uptime(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _export_line(ex: dict[str, Any] | None) -> None:
    """The ``--export`` state under an agent's status row (nothing without --export)."""
    if not ex:
        return
    where = f"connected to {ex['connected']}" if ex["connected"] else "not connected"
    last = fmt_time(ex["last_export"]) if ex["last_export"] is not None else "never"
    typer.echo(f"  export as {ex['router']}: {where}, backlog {ex['backlog']}, exported "
               f"{ex['exported_stalls']} stall(s) + {ex['exported_sessions']} session(s), last {last}, "
               f"errors {ex['errors']}, retries {ex['retries']}"
               + (f" (last error: {ex['last_error']})" if ex["last_error"] else ""))


def _boost_line(b: dict[str, Any] | None) -> None:
    """The --mitigate state under an agent's status row (nothing without --mitigate)."""
    if not b:
        return
    typer.echo(f"  boost on {b['egress']}: {b['active']} active of {b['slots']} slot(s), {b['total']} total, "
               f"{b['seconds']:.1f} s, {b['bytes']} bytes; denied {b['denied_full']} full, "
               f"{b['denied_rate']} rate; share cap {b['share']:g} of {b['link_bps']} bit/s")


def _hook(st: dict[str, Any]) -> str:
    """"xdp/native", "xdp/skb", "tc/ingress", "tc/egress"; "+l3" on a layer-3 device."""
    hook = st.get("hook", "xdp")
    where = st.get("direction", "ingress") if hook == "tc" else st.get("xdp_mode", "")
    return f"{hook}/{where}" + ("+l3" if st.get("link") == "l3" else "")


@app.command()
@friendly
def status(
    as_json: bool = OptJson, run_dir: Path = OptRunDir,
    iface: str | None = typer.Option(None, "--interface", "--iface", help="only this interface"),
) -> None:
    """Running agents: interface, hook (XDP mode or TC direction), packets, candidates, lost events, flows."""
    rows: list[dict[str, Any]] = []
    for name, path in _targets(run_dir, iface):
        try:
            st = request(path, "status", iface=name)  # one process may serve several
            st["running"] = True
        except NoAgent:
            st = {"iface": name, "running": False,
                  "error": f"agent not running (stale files; run 'iqn-ctl detach {name}')"}
        rows.append(st)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo("no IQN agents running")
        return
    wi = max(5, *(len(st["iface"]) for st in rows))
    typer.echo(f"{'iface':<{wi}} {'pid':>7} {'hook':<13} {'packets':>12} {'candidates':>11} {'lost':>8} "
               f"{'flows':>7} {'in stall':>8} {'stalls':>7} {'uptime':>10}")
    for st in rows:
        if not st["running"]:
            typer.echo(f"{st['iface']:<{wi}} {st['error']}")
            continue
        typer.echo(f"{st['iface']:<{wi}} {st['pid']:>7} {_hook(st):<13} {st['packets']:>12} "
                   f"{st['candidates']:>11} {st['lost']:>8} {st['flows']:>7} {st['flows_in_stall']:>8} "
                   f"{st['stalls_ended']:>7} {_uptime(st['uptime']):>10}")
        _export_line(st.get("export"))
        _boost_line(st.get("boost"))
        if "pairing" in st:
            cap = f"cap {st['cap']:g} bursts/s per client" if st.get("cap") else "no cap"
            typer.echo(f"  forgery guard: pairing {st['pairing']}, {cap}; unpaired {st.get('unpaired', 0)}, "
                       f"capped {st.get('capped', 0)}, client packets {st.get('client_packets', 0)}")
        if st.get("attach_state") not in (None, "attached"):
            typer.echo(f"  warning: {st['iface']} is {st['attach_state']}: {st.get('attach_note', '')}",
                       err=True)
        if st["lost"]:
            typer.echo(f"  warning: {st['lost']} candidate events lost on {st['iface']}: "
                       "the agent could not keep up; stalls may be missed", err=True)

