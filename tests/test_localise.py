"""The localisation lab for real: namespaces, two OTT servers (aioquic), JetStream, the XDP
agent on both access routers, signal players, a real htb fault, and the QoS estimates.

A shortened run (4 players per subnet, 15 s slots, 3 slots) must rank the injected
access link first in every slot after the first and flag no healthy component; the
players' toggles must reach the server; nothing of the lab may outlive it, also when
``up`` fails half way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iqn_lab import netns
from iqn_lab.errors import LabError
from iqn_lab.localise.demo import LocaliseConfig, run_localise
from iqn_lab.localise.lab import LocaliseLab
from iqn_lab.player import read_log
from iqn_lab.testbed import run_prefix
from tests.conftest import need, need_root


def _prereqs() -> None:
    need_root()
    from iqn_lab.jetstream import server_binary

    try:
        server_binary()
    except LabError as e:
        need(False, str(e))


def _left(prefix: str) -> list[str]:
    return [n for n in netns.names() if n.startswith(f"{prefix}-")]


@pytest.fixture
def prefix() -> object:
    p = run_prefix()
    yield p
    LocaliseLab(p).down()  # whatever a failing test left
    assert not _left(p)


def _shown_at_close_or_revised(s: dict[str, object], fault: str = "sub-a") -> None:
    """What the service showed when it closed the slot ranked ``fault`` first, or it was shown
    before some of the fault's lines were stored (records held past the close, then the service
    inferred the slot again): never a wrong ranking on the slot's full lines."""
    shown = s["at_close"]
    assert isinstance(shown, dict)
    if shown["ranking"] and shown["ranking"][0] == fault:
        return
    final = s["estimates"][fault]["lines"]  # type: ignore[index]
    assert s["revised"] and (shown["lines"].get(fault) or 0) < final, s


def test_shortened_localisation_ranks_the_faulty_access_link_first(tmp_path: Path, prefix: str) -> None:
    _prereqs()
    out = tmp_path / "run"
    rep = run_localise(LocaliseConfig(out=out, prefix=prefix, fault="access", slot=15.0, slots=3, players=4),
                       say=print)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["fault"] == rep["fault"] == "sub-a"
    slots = on_disk["slots"]
    assert [s["slot"] for s in slots] == [rep["first_slot"] + 15.0 * k for k in range(3)]
    for s in slots[1:]:
        assert s["ranking"] and s["ranking"][0] == "sub-a", s
        _shown_at_close_or_revised(s)
    assert all(f == "sub-a" for s in slots for f in s["flagged"]), [s["flagged"] for s in slots]
    assert any("sub-a" in s["flagged"] for s in slots[1:])
    # the estimate stands for real stalls: the players behind sub-a stalled, the others did not
    for inj in on_disk["injected"][1:]:
        assert inj["actual"] > 0.1 and inj["estimate"] > 0.05
    for s in slots[1:]:
        assert s["actual"]["sub-b"]["fraction"] < 0.02 and s["actual"]["srv-2"]["fraction"] < s["actual"][
            "sub-a"]["fraction"]
    assert (out / "heatmap.png").stat().st_size > 1000
    # every player logged, and every toggle it logged reached a server as a real request
    logs = {p.stem: read_log(p) for p in (out / "players").glob("*.jsonl")}
    assert len(logs) == 12
    toggles = {name: sum(e["toggles"] for e in ev if e["event"] == "signal") for name, ev in logs.items()}
    assert all(t > 0 for name, t in toggles.items() if name.startswith("sub-a"))
    assert all(e["toggles"] == 4 for ev in logs.values() for e in ev if e["event"] == "signal")
    clients = {ev[0]["client"]: name for name, ev in logs.items()}
    posted: dict[str, int] = {}
    for f in (out / "logs").glob("requests-*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r["path"] == "/api/autoplay":
                name = clients[r["peer"].split(":")[0]]
                posted[name] = posted.get(name, 0) + 1
    for name, t in toggles.items():  # the last look's requests may still be in flight at the end
        assert t - 4 <= posted.get(name, 0) <= t, (name, t, posted.get(name))
    assert not _left(prefix)
    assert not LocaliseLab(prefix).state.exists()


@pytest.mark.parametrize("pullers", ["0", "2"])
def test_cluster_node_killed_mid_run_loses_and_doubles_no_record(tmp_path: Path, prefix: str, pullers: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`iqn-lab demo --localise --cluster 3 --kill-node`, shortened (2 slots of 10 s, 9 players):
    the JetStream node rtr-1's agent exports through is SIGKILLed half way into slot 2; the
    service still names sub-a, and every record of both agents' histories is in the R3 stream
    once and stored once (by id). The service pulls in its own process and with 2 puller
    processes (``IQN_QOS_PULLERS``, read by ``iqn-qos serve``: the lab starts it)."""
    _prereqs()
    monkeypatch.setenv("IQN_QOS_PULLERS", pullers)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "iqn_lab.cli", "demo", "--localise", "--fault", "access", "--slot", "10",
           "--slots", "2", "--players", "3", "--cluster", "3", "--kill-node", "--prefix", prefix,
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["nats_nodes"] == 3 and rep["pipeline"] == "live"
    killed = rep["killed_node"]
    assert killed and killed["url"] == killed["agent_was_connected_to"], killed
    assert rep["first_slot"] + 10.0 <= killed["at"] <= rep["first_slot"] + 20.0
    rec = rep["records"]
    assert rec["stream_replicas"] == 3
    assert killed["url"] not in rec["drain"]["connected"], rec["drain"]  # both agents export through others
    assert rec["stalls"] > 0 and rec["sessions"] >= 9, rec  # 9 players, a watched-time record per slot
    assert rec["lost"] == [] and rec["unknown"] == [] and rec["doubled"] == 0 and rec["unexported"] == 0, rec
    assert rec["agents"] == rec["stream"] == rec["stored"] and rec["ok"], rec
    for s in rep["slots"][1:]:  # the final estimates; a kill may hold the last records past the close
        assert s["ranking"] and s["ranking"][0] == "sub-a", s
        _shown_at_close_or_revised(s)
    assert rep["target"]["healthy_flagged"] == [], rep["target"]
    lat = rep["latency"]["stall_end_to_stored"]
    assert lat["total"]["n"] > 0 and lat["total"]["p50_s"] > 0 and lat["detect"]["n"] == lat["total"]["n"]
    assert not _left(prefix)


def test_cli_up_and_down_and_a_failed_up_leave_nothing(prefix: str) -> None:
    _prereqs()
    # a failure half way (the agent refuses --p 0 after the namespaces, servers and broker are up)
    with pytest.raises(LabError, match=r"agent-rtr[12] exited during up: .*--p"):
        LocaliseLab(prefix).up(slot=10.0, p=0.0)
    assert not _left(prefix)
    # the command line: up, then down
    up = subprocess.run([sys.executable, "-m", "iqn_lab.cli", "up", "--topology", "localise", "--prefix",
                         prefix, "--slot", "10"], capture_output=True, text=True, timeout=240)
    assert up.returncode == 0, up.stderr
    assert "localisation lab" in up.stdout and len(_left(prefix)) == 9
    st = subprocess.run([sys.executable, "-m", "iqn_lab.cli", "status", "--prefix", prefix, "--json"],
                        capture_output=True, text=True, timeout=60)
    status = json.loads(st.stdout)
    assert status["up"] and status["topology"] == "localise" and all(status["daemons"][d] for d in (
        "ott-srv1-www", "ott-srv1-media", "ott-srv2-www", "ott-srv2-media", "agent-rtr1", "agent-rtr2"))
    r = subprocess.run(["ip", "netns", "exec", f"{prefix}-subc", "ping", "-c1", "-W3", "198.19.1.3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    down = subprocess.run([sys.executable, "-m", "iqn_lab.cli", "down", "--prefix", prefix],
                          capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not _left(prefix)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"{prefix}-" not in links
