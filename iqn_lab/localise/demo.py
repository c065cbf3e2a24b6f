"""``iqn-lab demo --localise``: a fault on one component, real stalls at many players, and
the QoS service naming the component.

1. the lab (:class:`~iqn_lab.localise.lab.LocaliseLab`): namespaces, two OTT servers,
   JetStream, the ISP agent (XDP) on both access routers with ``--slot``, and, when this
   checkout has the live pipeline (``iqn-ctl attach --export`` and ``iqn-qos serve``),
   agents exporting to JetStream and the QoS service consuming it;
2. the fault: an htb bottleneck on ``sub-a``'s access link (``--fault access``) or on
   ``srv-1``'s uplink (``--fault server``), in place before the first player starts;
3. the players (:mod:`iqn_lab.player`), one process per subnet, started two seconds
   before a slot boundary and stopped half a second before the end of the K-th slot;
4. per slot, the service's estimates: as the running service showed them when the slot
   closed (``GET /api/components``) and as they stand once every record is stored (the
   service infers a slot again when records come after its close: its store), or without
   the live pipeline, from the agents' histories (``iqn-qos from-agent`` + ``iqn-qos infer``:
   the same records, read from disk);
5. ``results/<run>/``: ``report.json``, ``report.txt``, ``heatmap.png``, the media lines,
   the players' logs, the agents' and servers' logs. The lab is always torn down.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iqn_lab import procs
from iqn_lab.errors import LabError
from iqn_lab.player import read_log

from . import audit as A
from . import report as R
from .lab import CLIP, LocaliseLab

Say = Callable[[str], None]
#: agents write a slot's records 2 s after it ends; then export and ingest
CLOSE_WAIT = 6.0
#: how long to wait, after CLOSE_WAIT, for the live service to show a slot
LIVE_WAIT = 30.0
#: after the last slot, how long to wait for every record to be acknowledged and stored
DRAIN_WAIT = 60.0
#: the players start this long before the first reported slot (startup stalls fall before it)
LEAD = 2.0
#: bottleneck as a share of what the players behind the faulty component ask for
SQUEEZE = 0.6


@dataclass(frozen=True)
class LocaliseConfig:
    out: Path
    prefix: str = "iqnloc"
    fault: str = "access"
    slot: float = 30.0
    slots: int = 4
    players: int = 10  # per subnet
    rate: int | None = None  # bit/s; None: SQUEEZE x the demand behind the component
    nats_nodes: int = 1
    p: float = 0.2
    n: int = 4
    keep: bool = False
    seed: int = 1  # the players' signal phases
    kill_node: bool = False  # SIGKILL one JetStream node mid-run (needs nats_nodes=3)


def default_rate(cfg: LocaliseConfig) -> int:
    behind = cfg.players if cfg.fault == "access" else 3 * math.ceil(cfg.players / 2)
    return int(SQUEEZE * behind * CLIP.kbit * 1000)


def _qos(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iqn_qos", *args], capture_output=True, text=True)


def _estimates_offline(lab: LocaliseLab, info: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Media lines from both agents' histories, then ``iqn-qos infer --json``."""
    texts = []
    for a in info["agents"].values():
        r = _qos("from-agent", a["state_dir"], "--router", a["router"], "--topology", info["qos_topology"])
        if r.returncode == 0:
            texts.append(r.stdout)
    (out / "lines.jsonl").write_text("".join(texts))
    if not any(t.strip() for t in texts):
        return []
    r = _qos("infer", str(out / "lines.jsonl"), "--slot", str(info["slot"]), "--json")
    if r.returncode != 0:
        raise LabError(f"iqn-qos infer failed: {r.stderr.strip()}")
    return [json.loads(x) for x in r.stdout.splitlines() if x.strip()]


def _estimates_live(lab: LocaliseLab, info: dict[str, Any], seen: dict[float, list[dict[str, Any]]]) -> None:
    """The latest slot's estimates from the running service (its components table holds, for
    the components of the latest slot, that slot's p, interval and flag)."""
    doc = lab.service_get(info["service"]["url"], "/api/components")
    if not doc or doc.get("last_slot") is None:
        return
    last = float(doc["last_slot"])
    seen[last] = [{"slot": last, "component": c["component"], "p": c["p"], "lo": c["lo"], "hi": c["hi"],
                   "lines": c.get("lines"), "faulty": c.get("faulty", False)}
                  for c in doc.get("components", []) if float(c.get("slot", -1)) == last]


def _store_estimates(info: dict[str, Any], store: Path) -> list[dict[str, Any]]:
    r = _qos("infer", "--store", str(store), "--slot", str(info["slot"]), "--json")
    if r.returncode != 0:
        return []
    return [json.loads(x) for x in r.stdout.splitlines() if x.strip()]


def _cpu_seconds(pid: int) -> float:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _wait_seconds(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (schedstat): a player
    process starved of CPU stalls its viewers for no network reason."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_localise(cfg: LocaliseConfig, say: Say) -> dict[str, Any]:
    if cfg.fault not in ("access", "server"):
        raise LabError(f"--fault must be access or server, got {cfg.fault!r}")
    if cfg.slots < 2 or not cfg.slot >= 5:
        raise LabError("--slots must be at least 2 and --slot at least 5 seconds")
    if cfg.kill_node and cfg.nats_nodes != 3:
        raise LabError("--kill-node needs a JetStream cluster: --cluster 3")
    cfg.out.mkdir(parents=True, exist_ok=True)
    lab = LocaliseLab(cfg.prefix)
    try:
        return _run(lab, cfg, say)
    finally:
        _save_logs(lab, cfg.out)
        if not cfg.keep:
            removed = lab.down()
            say(f"lab {cfg.prefix} torn down ({len(removed)} items)")


def _save_logs(lab: LocaliseLab, out: Path) -> None:
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    if lab.state.is_dir():
        for f in lab.state.glob("*.log"):
            shutil.copy(f, logs / f.name)
        for f in lab.state.glob("requests-*.jsonl"):
            shutil.copy(f, logs / f.name)


def _kill_node(lab: LocaliseLab, info: dict[str, Any], say: Say) -> dict[str, Any]:
    """SIGKILL the JetStream node rtr-1's agent exports through (the worst one to lose)."""
    st = lab.agent_status("rtr1") or {}
    connected = (st.get("export") or {}).get("connected") or ""
    urls = list(info["nats"])
    i = urls.index(connected) if connected in urls else 0
    at = time.time()
    url = lab.kill_nats(i)
    say(f"SIGKILLed JetStream node {i} ({url}; rtr-1's agent was connected to {connected or 'none'})")
    return {"node": i, "url": url, "at": round(at, 3), "agent_was_connected_to": connected or None}


def _drained(lab: LocaliseLab, info: dict[str, Any], timeout: float = DRAIN_WAIT) -> dict[str, Any]:
    """Wait until both agents have had every record acknowledged and the service has stored
    as many records as they exported; returns what was last seen."""
    deadline = time.time() + timeout
    seen: dict[str, Any] = {}
    while True:
        sts = [lab.agent_status(r.role) or {} for r in lab.plan.routers]
        exp = [st.get("export") or {} for st in sts]
        sent = sum(int(e.get("exported_stalls", 0)) + int(e.get("exported_sessions", 0)) for e in exp)
        doc = lab.service_get(info["service"]["url"], "/api/components") or {}
        ing = doc.get("ingest") or {}
        stored = sum(int(v) for v in (ing.get("records") or {}).values())
        seen = {"backlog": [e.get("backlog") for e in exp], "exported": sent, "stored": stored,
                "retries": [e.get("retries") for e in exp], "errors": [e.get("errors") for e in exp],
                "connected": [e.get("connected") for e in exp],
                "lag": ing.get("lag"), "ack_pending": ing.get("ack_pending")}
        if (all(e.get("backlog") == 0 for e in exp) and sent > 0 and stored >= sent
                and not ing.get("lag") and not ing.get("ack_pending")):
            return seen
        if time.time() > deadline:
            return seen
        time.sleep(1.0)


def _run(lab: LocaliseLab, cfg: LocaliseConfig, say: Say) -> dict[str, Any]:
    info = lab.up(slot=cfg.slot, nats_nodes=cfg.nats_nodes, p=cfg.p, n=cfg.n, say=say)
    live = info["service"] is not None
    if cfg.kill_node and not live:
        raise LabError("--kill-node needs the live pipeline (iqn-ctl attach --export and iqn-qos serve)")
    killed: dict[str, Any] | None = None
    kill_at = math.inf
    rate = cfg.rate or default_rate(cfg)
    fault = lab.inject(cfg.fault, rate)
    say(f"fault: {fault['component']} ({cfg.fault}): htb {rate / 1e6:g} Mbit/s on {fault['iface']} "
        f"in {fault['namespace']}")
    first = math.ceil((time.time() + LEAD + 1.0) / cfg.slot) * cfg.slot
    time.sleep(max(0.0, first - LEAD - time.time()))
    duration = LEAD + cfg.slots * cfg.slot - 0.5
    player_dir = cfg.out / "players"
    drops0 = lab.udp_drops()
    pids = lab.start_players(cfg.players, duration, player_dir, stagger=1.5, seed=cfg.seed)
    if cfg.kill_node:  # mid-run: half way through the second slot
        kill_at = first + 1.5 * cfg.slot
    say(f"{3 * cfg.players} players started; slots of {cfg.slot:g} s from {first:.0f}, {cfg.slots} of them "
        f"({'live: agents -> JetStream -> iqn-qos serve' if live else 'agents histories -> iqn-qos infer'})")
    seen: dict[float, list[dict[str, Any]]] = {}
    cpu = {pid: 0.0 for pid in pids}
    waited = {pid: 0.0 for pid in pids}
    for k in range(cfg.slots):
        close = first + (k + 1) * cfg.slot + CLOSE_WAIT
        while time.time() < close:
            for pid in pids:
                c = _cpu_seconds(pid)
                if not math.isnan(c):
                    cpu[pid] = c
                w = _wait_seconds(pid)
                if not math.isnan(w):
                    waited[pid] = w
            if killed is None and time.time() >= kill_at:
                killed = _kill_node(lab, info, say)
            time.sleep(min(1.0, max(0.0, close - time.time())))
        if live:  # the service closes a slot GRACE s after its end, then infers: wait for it
            deadline = time.time() + LIVE_WAIT
            while first + k * cfg.slot not in seen and time.time() < deadline:
                _estimates_live(lab, info, seen)
                time.sleep(1.0)
            ests = list(seen.get(first + k * cfg.slot, []))
        else:
            ests = [e for e in _estimates_offline(lab, info, cfg.out)
                    if float(e["slot"]) == first + k * cfg.slot]
        ests.sort(key=lambda e: -float(e["p"]))
        top = ", ".join(f"{R.name(e['component'])} {e['p']:.3f}" for e in ests[:3]) or "no estimate yet"
        say(f"slot {k + 1}/{cfg.slots} ({first + k * cfg.slot:.0f}): {top}")
    for pid in pids:  # the players end on their own at the end of the last slot
        deadline = time.monotonic() + 30
        while procs.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    drops = {k: v - drops0.get(k, 0) for k, v in lab.udp_drops().items()}
    logs = {p.stem: read_log(p) for p in sorted(player_dir.glob("*.jsonl"))}
    records: dict[str, Any] = {}
    latency: dict[str, Any] = {}
    at_close: dict[float, list[dict[str, Any]]] | None = None
    if live:
        drained = _drained(lab, info)
        lab.stop_service()
        store = cfg.out / "qos.duckdb"
        shutil.copy(info["service"]["store"], store)
        recs = [r for a in info["agents"].values()
                for r in A.history_records(Path(a["state_dir"]) / "stalls.sqlite", a["iface"], a["router"])]
        stored, line_ids = A.store_records(store)
        records = A.audit(recs, A.stream_messages(lab.jsz() or {}), stored, line_ids)
        records["drain"] = drained
        records["stream_replicas"] = A.stream_replicas(lab.jsz() or {})
        latency = {"stall_end_to_stored": A.stall_latency(logs, recs, stored),
                   "slot_end_to_session_stored": A.session_latency(recs, stored)}
        say(f"records: {records['agents']} in the agents' histories ({records['stalls']} stalls, "
            f"{records['sessions']} sessions), {records['stream']} in the stream, {records['stored']} "
            f"stored; "
            f"lost {len(records['lost'])}, doubled {records['doubled']}, unknown {len(records['unknown'])}")
        tot = latency["stall_end_to_stored"]["total"]
        say(f"stall end at the player -> stored by the service: p50 {tot['p50_s']} s, p99 {tot['p99_s']} s "
            f"({tot['n']} stalls)")
        # the final estimates, once every record is stored (the service infers a slot again when
        # records come after its close); a slot the store has nothing for keeps what was shown
        final = _store_estimates(info, store)
        have = {float(e["slot"]) for e in final}
        estimates = final + [e for s, ests in seen.items() if s not in have for e in ests]
        at_close = R.per_slot([e for ests in seen.values() for e in ests], first, cfg.slots, cfg.slot)
        heat = _qos("heatmap", "--store", str(store), "--slot", str(cfg.slot), "--out",
                    str(cfg.out / "heatmap.png"))
    else:
        estimates = _estimates_offline(lab, info, cfg.out)
        heat = _qos("heatmap", str(cfg.out / "lines.jsonl"), "--slot", str(cfg.slot), "--out",
                    str(cfg.out / "heatmap.png"))
    slots = R.per_slot(estimates, first, cfg.slots, cfg.slot)
    comps = [c["id"] for c in lab.plan.qos_topology()["components"]]
    rep = R.build(fault["component"], cfg.slot, slots, logs, lab.plan.component_of, comps, at_close)
    wall = duration
    rep.update({
        "fault_kind": cfg.fault, "fault_iface": fault["iface"], "rate_bit": rate,
        "players": len(logs), "pipeline": "live" if live else "offline (agents' histories)",
        "nats_nodes": cfg.nats_nodes, "killed_node": killed, "records": records or None,
        "latency": latency or None, "seed": cfg.seed, "p": cfg.p, "n": cfg.n, "first_slot": first,
        "heatmap": "heatmap.png" if heat.returncode == 0 else None,
        "players_cpu_s": round(sum(cpu.values()), 2),
        "players_runqueue_wait_s": [round(waited[p], 2) for p in pids], "players_udp_drops": drops,
        "players_cpu_share": round(sum(cpu.values()) / wall, 3),
        "players_stalls": sum(1 for ev in logs.values() for e in ev if e.get("event") == "stall"
                              and not e.get("startup")),
    })
    (cfg.out / "report.json").write_text(json.dumps(rep, indent=1))
    text = R.summary(rep)
    (cfg.out / "report.txt").write_text(text + "\n")
    say(text)
    return rep
