"""The live agent end to end: real XDP on a real veth, real UDP signals from
another namespace, the agent as a real ``iqn-ctl attach`` subprocess.

One traffic phase (a few seconds) is shared by all assertions: two labs, two
agents (5-tuple keys with the default estimator; client keys with the paper's
estimator) and, at once, an IPv4 signal, a bulk flow of 1,292-byte frames, an
IPv6 signal, a VLAN-tagged signal, a second concurrent IPv4 signal, and a
signal split over four connections of one client.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from conftest import need, need_root

from iqn_ctl.engine.synth import SignalModel, signal_times
from iqn_ctl.live.api import ApiError, request, sock_path
from iqn_lab.testbed import PY
from iqn_lab.testbed import Testbed as Lab

P = 0.2
STALL = 2.0  # seconds of signal per flow: enough for a stall, short enough for a fast test
#: the sender starts its schedule this long after it is ready (times in specs are offsets)
LEAD = 0.3
#: how long to wait for something the agent must do; generous: a loaded CI box is slow
DEADLINE = 30.0
T = TypeVar("T")


def need_xdp() -> None:
    need_root()
    build = Path(f"/lib/modules/{os.uname().release}/build/include")
    need(build.exists(), f"needs kernel headers at {build} (sudo bash scripts/setup.sh)")
    try:
        import bcc  # noqa: F401
    except ImportError:
        need(False, "needs bcc (python3-bpfcc)")


def wait_ready(path: Path, proc: subprocess.Popen[str], timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"agent exited {proc.returncode}: {err}")
        try:
            request(path, "ping", timeout=1.0)
            return
        except ApiError:
            time.sleep(0.05)
    raise AssertionError("agent did not come up")


def poll_until(get: Callable[[], T], ok: Callable[[T], bool], timeout: float = DEADLINE) -> T:
    """Ask ``get()`` until ``ok`` holds or the deadline passes; returns the last
    answer either way, so the caller's assertions say what was wrong."""
    deadline = time.monotonic() + timeout
    while True:
        got = get()
        if ok(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def burst_while_stopped(lab: Lab, agent: subprocess.Popen[str], count: int) -> None:
    """``count`` candidates back to back while the agent is stopped (SIGSTOP), so
    its ring fills and the kernel has to count what did not fit."""
    agent.send_signal(signal.SIGSTOP)
    try:
        snd = lab.send({"lead": 0.0, "flows": [{
            "name": "x", "src": lab.srv4, "dst": lab.cli4, "dport": 40009, "frame": 1250,
            "times": [i * 1e-5 for i in range(count)]}]})
        snd.communicate(timeout=60)
        assert snd.returncode == 0
    finally:
        agent.send_signal(signal.SIGCONT)


def settled(total: int) -> Callable[[dict[str, Any]], bool]:
    """Status predicate: all ``total`` candidates sent reached the agent (delivered
    or counted lost) and no stall is open any more."""
    return lambda st: st["events"] + st["lost"] >= total and st["flows_in_stall"] == 0


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.stderr.read() if proc.stderr else ""


def cli(lab: Lab, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lab.agent_cmd(*args), env=env, capture_output=True, text=True, timeout=120)


def burst_times(start: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(t) for t in signal_times([(start, start + STALL)], SignalModel(), rng)]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need_xdp()
    base = tmp_path_factory.mktemp("agent")
    env = dict(os.environ, IQN_RUN_DIR=str(base / "run"))
    procs: list[subprocess.Popen[str]] = []
    with Lab() as lab1, Lab() as lab2:
        port = random.randrange(20000, 60000)
        a1 = subprocess.Popen(
            lab1.agent_cmd("attach", lab1.cli_if, "--state-dir", str(base / "s1"),
                           "--metrics-port", str(port), "--metrics-addr", "127.0.0.1"),
            env=env, stderr=subprocess.PIPE, text=True)
        procs.append(a1)
        a2 = subprocess.Popen(
            lab2.agent_cmd("attach", lab2.cli_if, "--state-dir", str(base / "s2"), "--key", "client",
                           "--estimator", "paper"),
            env=env, stderr=subprocess.PIPE, text=True)
        procs.append(a2)
        try:
            s1, s2 = sock_path(base / "run", lab1.cli_if), sock_path(base / "run", lab2.cli_if)
            wait_ready(s1, a1)
            wait_ready(s2, a2)
            t0 = 0.0  # offsets: each sender starts its schedule LEAD s after it is ready
            split = burst_times(t0, 6)
            spec1: dict[str, Any] = {"lead": LEAD, "flows": [
                {"name": "v4", "src": lab1.srv4, "dst": lab1.cli4, "dport": 40001, "frame": 1250,
                 "times": burst_times(t0, 1)},
                {"name": "bulk", "src": lab1.srv4, "dst": lab1.cli4, "dport": 40002, "frame": 1292,
                 "bulk_pps": 400, "from": t0, "to": t0 + STALL + 0.5},
                {"name": "v6", "src": lab1.srv6, "dst": lab1.cli6, "dport": 40003, "frame": 1288,
                 "times": burst_times(t0 + 0.1, 2)},
                {"name": "vlan", "src": lab1.srv4v, "dst": lab1.cli4v, "dport": 40004, "frame": 1180,
                 "vlan": lab1.vlan_id, "times": burst_times(t0, 3)},
                {"name": "v4b", "src": lab1.srv4b, "dst": lab1.cli4, "dport": 40005, "frame": 1250,
                 "times": burst_times(t0 + 0.5, 4)},
            ]}
            spec2: dict[str, Any] = {"lead": LEAD, "flows": [
                {"name": f"c{i}", "src": lab2.srv4, "dst": lab2.cli4, "dport": 41000 + i, "frame": 1250,
                 "times": split[i::4]} for i in range(4)
            ]}
            # the paper's estimator ends a stall only on a packet (its per-packet loop): send one
            spec2["flows"].append({"name": "closer", "src": lab2.srv4, "dst": lab2.cli4, "dport": 41000,
                                   "frame": 1250, "times": [split[-1] + 1.0]})
            snd1, snd2 = lab1.send(spec1), lab2.send(spec2)
            # the live view mid-stall: the v4 flow shows in a stall while its signal goes on
            v4 = f"{lab1.srv4}:443>{lab1.cli4}:40001"
            mid = poll_until(lambda: request(s1, "flows"),
                             lambda fs: any(f["flow"] == v4 and f["state"] == "stall" for f in fs))
            out1, err1 = snd1.communicate(timeout=60)
            out2, err2 = snd2.communicate(timeout=60)
            assert snd1.returncode == 0 and snd2.returncode == 0, err1 + err2
            got1, got2 = json.loads(out1), json.loads(out2)
            # wait for what the assertions need: every candidate in, every stall closed
            poll_until(lambda: request(s1, "status"),
                       settled(sum(len(v) for k, v in got1["sent"].items() if k != "bulk")))
            poll_until(lambda: request(s2, "status"), settled(sum(len(v) for v in got2["sent"].values())))
            metrics = subprocess.run(
                ["ip", "netns", "exec", lab1.cli_ns, PY, "-c",
                 f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics')"
                 ".read().decode())"], capture_output=True, text=True, timeout=30).stdout
            res: dict[str, Any] = {
                "lab1": lab1, "lab2": lab2, "env": env, "base": base, "a1": a1, "t0": got1["t0"],
                "mid": mid, "sent1": got1["sent"], "sent2": got2["sent"],
                "plan1": {f["name"]: f["times"] for f in spec1["flows"] if "times" in f},
                "flows1": json.loads(cli(lab1, env, "flows", "--json").stdout),
                "flows2": json.loads(cli(lab2, env, "flows", "--json", "--iface", lab2.cli_if).stdout),
                "status": [x for x in json.loads(cli(lab1, env, "status", "--json").stdout)
                           if x["iface"] == lab1.cli_if],
                "stalls1": [json.loads(x) for x in cli(lab1, env, "stalls", "--json", "--state-dir",
                                                       str(base / "s1")).stdout.splitlines()],
                "stalls2": [json.loads(x) for x in cli(lab2, env, "stalls", "--json", "--state-dir",
                                                       str(base / "s2")).stdout.splitlines()],
                "metrics": metrics,
            }
            yield res
        finally:
            for p in procs:
                stop(p)


def by_port(stalls: list[dict[str, Any]], port: int) -> list[dict[str, Any]]:
    return [s for s in stalls if s["flow"].endswith(f":{port}")]


def check_stall(stalls: list[dict[str, Any]], live: dict[str, Any], name: str, offset: float) -> None:
    """One stall, placed and sized like the signal the sender actually sent.

    The synthetic stall ran from ``offset`` for STALL s on the sender's schedule;
    the sender may have sent late (a loaded box), so the truth is shifted by the
    observed lag of its first and last packet before comparing."""
    (st,) = stalls
    sent, plan = live["sent1"][name], live["plan1"][name]
    lag_first = sent[0] - (live["t0"] + plan[0])
    lag_last = sent[-1] - (live["t0"] + plan[-1])
    assert st["duration"] == pytest.approx(STALL + lag_last - lag_first, abs=0.3)
    # count estimator: the stall began about one screenshot (p) before the first burst
    assert st["start"] == pytest.approx(sent[0] - P, abs=0.1)
    assert st["start"] == pytest.approx(live["t0"] + offset + lag_first, abs=P + 0.05)
    assert st["end"] == pytest.approx(st["start"] + st["duration"])


def candidates_per_cpu(lab: Lab) -> dict[int, int]:
    """The XDP program's per-CPU candidate counter (CNT_CANDIDATES, index 1 of its
    per-CPU array ``counters``), read with bpftool: on which CPUs XDP saw candidates."""
    out = subprocess.run(["ip", "-n", lab.cli_ns, "-j", "-d", "link", "show", "dev", lab.cli_if],
                         capture_output=True, text=True, check=True).stdout
    xdp = json.loads(out)[0]["xdp"]
    prog = (xdp.get("attached") or [xdp])[0]["prog"]["id"]

    def tool(*args: str) -> Any:
        return json.loads(subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True,
                                         check=True).stdout)

    for m in tool("prog", "show", "id", str(prog))["map_ids"]:
        if tool("map", "show", "id", str(m))["name"] == "counters":
            (row,) = [r for r in tool("map", "dump", "id", str(m)) if r["formatted"]["key"] == 1]
            return {int(v["cpu"]): int(v["value"]) for v in row["formatted"]["values"]}
    raise AssertionError(f"no counters map on XDP program {prog}")


def test_one_flow_over_two_cpus(tmp_path: Path) -> None:
    """The toggles of one flow leave from two CPUs (the sender moves between them
    packet by packet), so XDP runs on both and the candidates reach the agent
    through two per-CPU perf rings: the stall is still inferred like the signal
    actually sent, nothing is lost, and stragglers clamped to the watermark
    (``late``) stay rare: with LIVE_REORDER = 0 a systematic cross-CPU delay
    would show up here as late arrivals and a misplaced stall."""
    need_xdp()
    need((os.cpu_count() or 1) >= 2, "needs two CPUs")
    need(shutil.which("bpftool") is not None, "needs bpftool (sudo bash scripts/setup.sh)")
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    with Lab() as lab:
        agent = subprocess.Popen(lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(tmp_path / "s")),
                                 env=env, stderr=subprocess.PIPE, text=True)
        try:
            sock = sock_path(tmp_path / "run", lab.cli_if)
            wait_ready(sock, agent)
            plan = burst_times(0.0, 8)
            spec = {"lead": LEAD, "flows": [{"name": "x", "src": lab.srv4, "dst": lab.cli4, "dport": 40012,
                                             "frame": 1250, "cpus": [0, 1], "times": plan}]}
            out, err = lab.send(spec).communicate(timeout=60)
            assert out, err
            got = json.loads(out)
            sent = got["sent"]["x"]
            st = poll_until(lambda: request(sock, "status"), settled(len(sent)))
            per_cpu = candidates_per_cpu(lab)
            stalls = [json.loads(x) for x in cli(lab, env, "stalls", "--json", "--state-dir",
                                                 str(tmp_path / "s")).stdout.splitlines()]
        finally:
            stop(agent)
    assert sorted(set(got["cpu"]["x"])) == [0, 1]
    assert per_cpu[0] > 0 and per_cpu[1] > 0 and sum(per_cpu.values()) == len(sent), per_cpu
    assert (st["candidates"], st["events"], st["lost"]) == (len(sent), len(sent), 0), st
    assert (st["stalls_started"], st["stalls_ended"]) == (1, 1), st
    assert st["late"] <= len(sent) // 8, st["late"]
    check_stall(stalls, {"sent1": {"x": sent}, "plan1": {"x": plan}, "t0": got["t0"]}, "x", 0.0)


@pytest.mark.parametrize("estimator", ["count", "paper"])
def test_cross_cpu_stragglers_are_clamped_and_counted(tmp_path: Path, estimator: str) -> None:
    """The deterministic half of the test above. A poll drains the per-CPU perf
    rings one after the other, so a toggle that XDP stamps on CPU 0 just after
    ring 0 was drained comes a poll later than its successor from CPU 1. With
    LIVE_REORDER = 0 the agent holds nothing back: such a straggler is placed at
    the watermark (its successor) and counted in ``late`` in the agent's status,
    and the stall comes out as from the arrivals in order (to within the clamp,
    which moves an arrival by less than one toggle spacing). Built from a real
    signal, fed through the agent's own event path (ingest, advance, _on_events)
    in the order the rings deliver it; no kernel needed, so this runs everywhere
    and cannot race. The paper's estimator ends a stall at its last candidate, so
    there a straggler left in place (not clamped) would end the stall early."""
    import struct

    from iqn_ctl.engine.flowtable import FlowTable
    from iqn_ctl.engine.params import SignalParams
    from iqn_ctl.engine.tracker import StallEnded, StallStarted
    from iqn_ctl.live.agent import LIVE_REORDER, Agent, AgentConfig

    agent = Agent(AgentConfig(iface="lo", state_dir=tmp_path / "s", run_dir=tmp_path / "run",
                              estimator=estimator))
    assert agent.flows.table.reorder == LIVE_REORDER == 0.0  # what the live agent runs with
    raw = bytes([198, 18, 7, 1]) + bytes(12) + bytes([198, 18, 7, 2]) + bytes(12) + struct.pack(
        "!HHB3x", 443, 40013, 4)
    times = burst_times(1_700_000_000.0, 9)
    n = SignalParams().n
    bursts = [times[i:i + n] for i in range(0, len(times), n)]
    assert all(len(b) == n for b in bursts)
    # toggles alternate CPUs 0,1,0,1 and each burst lands between the drains of ring 0
    # and ring 1: a poll gets toggles 2 and 4 (ring 1), the next one toggles 1 and 3
    polls = [p for b in bursts for p in ([b[1], b[3]], [b[0], b[2]])]
    closer = [times[-1] + 1.0]  # the paper's estimator ends a stall only on a packet
    polls.append(closer)
    events: list[Any] = []
    for batch in polls:
        evs = [(raw, t, 1250) for t in batch]
        out = agent.flows.ingest(evs)
        out.extend(agent.flows.advance(max(batch) + 0.001))  # the loop advances after each poll
        agent._on_events(out)
        events.extend(out)
    out = agent.flows.advance(closer[0] + 2.0)  # the flow falls silent: its stall ends
    agent._on_events(out)
    events.extend(out)
    st = agent.status()
    assert st["late"] == 2 * len(bursts), st["late"]  # two stragglers a burst, each counted once
    assert (st["events"], st["stalls_started"], st["stalls_ended"], st["flows_in_stall"]) == (
        len(times) + 1, 1, 1, 0)

    def reference(ts: list[float]) -> list[Any]:
        ref = FlowTable(estimator=estimator, reorder=0.0)
        return ref.feed("f", ts + closer) + ref.advance(closer[0] + 2.0)

    def shape(evs: list[Any]) -> list[tuple[Any, ...]]:
        return [(type(e).__name__, e.start, getattr(e, "end", None), getattr(e, "candidates", None))
                for e in evs]

    # exactly as if each straggler had arrived at the watermark (its successor's time) ...
    clamped = sorted(t for b in bursts for t in (b[1], b[3], b[3], b[3]))
    assert shape(events) == shape(reference(clamped))
    # ... which is the in-order result to within one toggle spacing
    want = reference(times)
    assert [type(e) for e in events] == [type(e) for e in want] == [StallStarted, StallEnded]
    spacing = max(b[-1] - b[0] for b in bursts)
    for got, exp in zip(shape(events), shape(want), strict=True):
        assert got[1:3] == pytest.approx(exp[1:3], abs=spacing)
    assert events[1].candidates == len(times)


def test_ipv4_signal_one_stall_right_duration_and_start(live: dict[str, Any]) -> None:
    lab = live["lab1"]
    v4 = by_port(live["stalls1"], 40001)
    check_stall(v4, live, "v4", 0.0)
    assert v4[0]["client"] == lab.cli4 and v4[0]["server"] == lab.srv4 and v4[0]["iface"] == lab.cli_if
    assert v4[0]["flow"] == f"{lab.srv4}:443>{lab.cli4}:40001"


def test_bulk_flow_has_no_stall(live: dict[str, Any]) -> None:
    assert by_port(live["stalls1"], 40002) == []
    # 1,292-byte frames are not candidates: the agent never even tracked that flow
    assert by_port(live["flows1"], 40002) == []
    st = live["status"][0]
    assert st["packets"] >= len(live["sent1"]["bulk"]) + st["candidates"]


def test_ipv6_signal(live: dict[str, Any]) -> None:
    lab = live["lab1"]
    v6 = by_port(live["stalls1"], 40003)
    check_stall(v6, live, "v6", 0.1)
    assert v6[0]["flow"] == f"[{lab.srv6}]:443>[{lab.cli6}]:40003"


def test_vlan_tagged_signal(live: dict[str, Any]) -> None:
    check_stall(by_port(live["stalls1"], 40004), live, "vlan", 0.0)


def test_two_concurrent_signals_and_nothing_else(live: dict[str, Any]) -> None:
    check_stall(by_port(live["stalls1"], 40005), live, "v4b", 0.5)
    assert len(live["stalls1"]) == 4  # v4, v6, vlan, v4b: exactly one each


def test_live_view_mid_stall_and_after(live: dict[str, Any]) -> None:
    mid = {f["flow"]: f for f in live["mid"]}
    lab = live["lab1"]
    f = mid[f"{lab.srv4}:443>{lab.cli4}:40001"]
    assert f["state"] == "stall" and f["stall_start"] == pytest.approx(live["sent1"]["v4"][0] - P, abs=0.1)
    after = {f["flow"]: f for f in live["flows1"]}
    f = after[f"{lab.srv4}:443>{lab.cli4}:40001"]
    assert (f["state"], f["stalls"], f["candidates"]) == ("normal", 1, len(live["sent1"]["v4"]))
    assert f["last_duration"] == pytest.approx(STALL, abs=0.3)
    assert f["packets"] == len(live["sent1"]["v4"]) and f["iface"] == lab.cli_if


def test_status_counts_and_no_lost_events(live: dict[str, Any]) -> None:
    (st,) = live["status"]
    sent = live["sent1"]
    cands = sum(len(sent[k]) for k in ("v4", "v6", "vlan", "v4b"))
    assert st["running"] and st["iface"] == live["lab1"].cli_if and st["xdp_mode"] in ("native", "skb")
    assert st["candidates"] == cands and st["events"] == cands
    assert st["lost"] == 0
    assert (st["stalls_started"], st["stalls_ended"], st["flows_in_stall"]) == (4, 4, 0)
    # the forgery guard (default on) paired every candidate with the client's request before it
    assert (st["pairing"], st["unpaired"], st["capped"]) == ("on", 0, 0), st
    assert st["client_packets"] >= cands, st


def test_metrics(live: dict[str, Any]) -> None:
    iface = live["lab1"].cli_if
    body = live["metrics"]
    assert f'iqn_stalls_ended_total{{iface="{iface}"}} 4.0' in body
    assert f'iqn_lost_events_total{{iface="{iface}"}} 0.0' in body
    assert f'iqn_stall_duration_seconds_count{{iface="{iface}"}} 4.0' in body
    assert f'iqn_flows{{iface="{iface}"}} 4.0' in body
    assert f'iqn_unpaired_candidates_total{{iface="{iface}"}} 0.0' in body  # the guard's counters
    assert f'iqn_capped_candidates_total{{iface="{iface}"}} 0.0' in body
    client = [ln for ln in body.splitlines() if ln.startswith("iqn_client_packets_total")]
    assert len(client) == 1 and float(client[0].split()[-1]) > 0, client


def test_client_key_with_paper_estimator(live: dict[str, Any]) -> None:
    """A signal split over four connections (one toggle each) is one client's stall."""
    lab = live["lab2"]
    (st,) = live["stalls2"]
    sent = live["sent2"]
    first = min(sent[k][0] for k in ("c0", "c1", "c2", "c3"))
    last = max(sent[k][-1] for k in ("c0", "c1", "c2", "c3"))
    assert st["flow"] == lab.cli4 and st["client"] == lab.cli4 and st["estimator"] == "paper"
    assert st["start"] == pytest.approx(first, abs=0.1)  # the paper: start = the n-th packet of a burst
    assert st["end"] == pytest.approx(last, abs=0.1)  # the paper: end = the last candidate
    (f,) = live["flows2"]
    assert f["flow"] == lab.cli4 and f["stalls"] == 1 and f["candidates"] == sum(
        len(v) for v in live["sent2"].values())


def test_crash_detach_reattach_daemon(live: dict[str, Any]) -> None:
    """kill -9 leaves the program, socket and pid file; detach cleans them up;
    attach works again (as a daemon), a second attach is refused, history intact."""
    lab, env, base = live["lab1"], live["env"], live["base"]
    run = base / "run"
    a1: subprocess.Popen[str] = live["a1"]
    assert lab.egress_classifiers() == ["iqn_tc_egress"]  # the forgery guard's pairing
    a1.kill()
    a1.wait(10)
    assert lab.xdp_on_client() == "iqn_xdp"
    assert lab.egress_classifiers() == ["iqn_tc_egress"]  # a SIGKILLed agent leaves it too
    assert sock_path(run, lab.cli_if).exists() and (run / f"{lab.cli_if}.pid").exists()
    st = [x for x in json.loads(cli(lab, env, "status", "--json").stdout) if x["iface"] == lab.cli_if]
    assert st == [{"iface": lab.cli_if, "running": False, "error": st[0]["error"]}]
    assert "not running" in st[0]["error"]
    d = cli(lab, env, "detach", lab.cli_if)
    assert d.returncode == 0, d.stderr
    assert "removed the IQN XDP program" in d.stdout
    assert "removed the IQN egress classifier" in d.stdout
    assert lab.xdp_on_client() is None and lab.egress_classifiers() == []
    assert not sock_path(run, lab.cli_if).exists() and not (run / f"{lab.cli_if}.pid").exists()

    s1 = str(base / "s1")
    a = cli(lab, env, "attach", lab.cli_if, "--daemon", "--state-dir", s1)
    try:
        assert a.returncode == 0, a.stderr
        assert "running in the background" in a.stdout
        assert lab.xdp_on_client() == "iqn_xdp" and lab.egress_classifiers() == ["iqn_tc_egress"]
        (st,) = [x for x in json.loads(cli(lab, env, "status", "--json").stdout) if x["iface"] == lab.cli_if]
        assert st["running"] and st["pid"] == int((run / f"{lab.cli_if}.pid").read_text())
        again = cli(lab, env, "attach", lab.cli_if, "--state-dir", s1)
        assert again.returncode == 2
        assert again.stderr.startswith(f"iqn-ctl: error: an IQN agent is already attached to {lab.cli_if}")
        assert len(again.stderr.strip().splitlines()) == 1
        out = cli(lab, env, "stalls", "--json", "--state-dir", s1).stdout
        stalls = [json.loads(x) for x in out.splitlines()]
        assert stalls == live["stalls1"]
    finally:
        d = cli(lab, env, "detach", lab.cli_if)
    assert d.returncode == 0 and "stopped agent pid" in d.stdout, d.stdout + d.stderr
    assert lab.xdp_on_client() is None and lab.egress_classifiers() == []
    assert not sock_path(run, lab.cli_if).exists()
    log = (base / "s1" / f"{lab.cli_if}.log").read_text()
    assert "SIGTERM received, detaching" in log and "detached" in log


def test_lost_events_are_counted_and_logged(tmp_path: Path) -> None:
    """A stopped agent with a one-page perf ring overflows: every candidate is
    either delivered or counted as lost, and the loss is logged."""
    need_xdp()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    with Lab() as lab:
        # --cap 0: the burst is one client's 600 paired candidates, which the per-client
        # cap would keep back before the ring could overflow
        agent = subprocess.Popen(lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(tmp_path / "s"),
                                               "--perf-pages", "1", "--cap", "0"),
                                 env=env, stderr=subprocess.PIPE, text=True)
        try:
            sock = sock_path(tmp_path / "run", lab.cli_if)
            wait_ready(sock, agent)
            burst_while_stopped(lab, agent, 600)
            # the event loop establishes (and logs) the loss when it next reads the counters
            st = poll_until(lambda: request(sock, "status"),
                            lambda st: st["lost"] > 0 and st["events"] + st["lost"] >= 600)
            assert st["candidates"] == 600
            assert st["lost"] > 0 and st["events"] + st["lost"] == 600, (st["lost"], st["events"])
            table = cli(lab, env, "status").stdout
            assert f" {st['lost']} " in table
        finally:
            log = stop(agent)
    assert f"candidate events lost (total {st['lost']})" in log


def test_force_replaces_a_foreign_program_and_detach_removes_ours(tmp_path: Path) -> None:
    need_xdp()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    with Lab() as lab:
        lab.attach_foreign_xdp("other_prog")
        a = cli(lab, env, "attach", lab.cli_if, "--force", "--daemon", "--xdp-mode", "skb",
                "--state-dir", str(tmp_path / "s"))
        try:
            assert a.returncode == 0, a.stderr
            assert "XDP skb" in a.stdout
            assert lab.xdp_on_client() == "iqn_xdp"
        finally:
            d = cli(lab, env, "detach", lab.cli_if)
        assert d.returncode == 0 and lab.xdp_on_client() is None


def test_video_flow_with_candidate_sized_packets_is_discarded(tmp_path: Path) -> None:
    """A video flow's segment tails can fall in the size band; a burst of them
    (n within w_start) starts a stall in the engine, but the kernel's per-flow
    counters show megabytes of other traffic beside a few candidates, so the
    agent discards it (--bulk-ratio) and records nothing. A signal on another
    flow at the same time is still recorded."""
    need_xdp()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    with Lab() as lab:
        agent = subprocess.Popen(
            lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(tmp_path / "s")),
            env=env, stderr=subprocess.PIPE, text=True)
        try:
            wait_ready(sock_path(tmp_path / "run", lab.cli_if), agent)
            t0 = 0.0  # offsets from the sender's own start
            video = dict(src=lab.srv4, dst=lab.cli4, dport=40010)
            tails = [t0 + 0.3 + 0.04 * i for i in range(8)]  # 8 candidate-sized frames in 0.28 s
            spec = {"lead": LEAD, "flows": [
                {"name": "video", **video, "frame": 1292, "bulk_pps": 400, "from": t0, "to": t0 + 1.6},
                {"name": "tails", **video, "frame": 1250, "times": tails},
                {"name": "signal", "src": lab.srv4, "dst": lab.cli4, "dport": 40011, "frame": 1250,
                 "times": burst_times(t0, 7)},
            ]}
            out, err = lab.send(spec).communicate(timeout=60)
            assert out, err
            cands = sum(len(v) for k, v in json.loads(out)["sent"].items() if k != "video")
            poll_until(lambda: request(sock_path(tmp_path / "run", lab.cli_if), "status"), settled(cands))
            (st,) = [x for x in json.loads(cli(lab, env, "status", "--json").stdout)
                     if x["iface"] == lab.cli_if]
            stalls = [json.loads(x) for x in cli(lab, env, "stalls", "--json", "--state-dir",
                                                 str(tmp_path / "s")).stdout.splitlines()]
        finally:
            log = stop(agent)
    assert (st["stalls_started"], st["stalls_ended"], st["stalls_discarded"]) == (2, 1, 1), st
    assert by_port(stalls, 40010) == []
    assert len(by_port(stalls, 40011)) == 1
    assert "stall discarded" in log and ":40010" in log
