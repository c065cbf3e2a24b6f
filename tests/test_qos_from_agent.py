"""``iqn-qos from-agent``: the ISP agent's watched-time records as media lines.

Offline: a history file written by the agent's own store -> lines, and every
bad input (missing, damaged, no sessions table, a newer record version) as one
error line, exit 2. Live: real XDP on a veth (iqn_lab.testbed), a client that
signals two stalls on its page connection while video comes from another
server, and a client that never signals; the sessions rows are checked against
the times the sender actually observed and the stalls the agent recorded, then
``iqn-qos from-agent`` -> ``iqn-qos infer`` runs on them.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_agent_live import DEADLINE, LEAD, STALL, burst_times, need_xdp, poll_until, settled, wait_ready

from iqn_ctl.engine.watch import WatchRecord
from iqn_ctl.live.api import request, sock_path
from iqn_ctl.live.history import History
from iqn_ctl.live.sessions import SAMPLE_EVERY, SessionStore
from iqn_lab.testbed import Testbed as Lab
from iqn_qos.lines import parse_line

QOS = [str(Path(sys.executable).with_name("iqn-qos"))]


def qos(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QOS, *args], capture_output=True, text=True, timeout=120)


def history_with(tmp: Path, recs: list[WatchRecord]) -> Path:
    with History(tmp):
        pass
    store = SessionStore(tmp / "stalls.sqlite")
    store.add(recs, 0.0)
    store.close()
    return tmp


def test_rows_become_media_lines(tmp_path: Path) -> None:
    state = history_with(tmp_path, [
        WatchRecord("rtr", "eth0", "10.0.0.2", "10.9.0.1", 1800.0, 900.0, 600.4, 12.6),
        WatchRecord("rtr", "eth0", "10.0.0.3", "10.9.0.1", 900.0, 900.0, 0.3, 0.0),  # < 1 s: no unit
        WatchRecord("rtr", "eth0", "10.0.0.3", "10.9.0.1", 900.0, 900.0, 5.0, 5.0),
    ])
    r = qos("from-agent", str(state))
    assert r.returncode == 0, r.stderr
    lines = [parse_line(x, f"out:{i}") for i, x in enumerate(r.stdout.splitlines(), 1)]
    assert [(ln.t, ln.n, ln.m, ln.client, ln.server, ln.router, ln.kind) for ln in lines] == [
        (900.0, 5, 0, "10.0.0.3", "10.9.0.1", "rtr", "iqn"),
        (1800.0, 600, 587, "10.0.0.2", "10.9.0.1", "rtr", "iqn"),
    ]
    topo = tmp_path / "topo.yaml"
    topo.write_text("components:\n  - {id: net, kind: subnet}\n  - {id: srv, kind: server}\n"
                    "edges:\n  - [srv, net]\nattach:\n  - {prefix: 10.0.0.0/24, node: net}\n"
                    "  - {prefix: 10.9.0.1/32, node: srv, role: server}\n")
    out = tmp_path / "lines.jsonl"
    r = qos("from-agent", str(state / "stalls.sqlite"), "--router", "pop-7", "--topology", str(topo),
            "--out", str(out))
    assert r.returncode == 0 and r.stdout == "", r.stderr
    got = [parse_line(x, "f") for x in out.read_text().splitlines()]
    assert {ln.router for ln in got} == {"pop-7"} and {ln.path for ln in got} == {("srv", "net")}


@pytest.mark.parametrize("case", ["missing", "damaged", "old", "newer", "empty", "unresolved"])
def test_bad_history_is_one_error_line(tmp_path: Path, case: str) -> None:
    extra: list[str] = []
    if case == "missing":
        state = tmp_path / "nowhere"
    elif case == "damaged":
        state = tmp_path
        (tmp_path / "stalls.sqlite").write_bytes(b"not a database at all" * 100)
    elif case == "old":  # an agent from before the sessions table
        state = tmp_path
        con = sqlite3.connect(tmp_path / "stalls.sqlite")
        con.execute("CREATE TABLE stalls (id INTEGER PRIMARY KEY, client TEXT)")
        con.commit()
        con.close()
    elif case == "newer":
        state = history_with(tmp_path, [WatchRecord("r", "e", "10.0.0.2", "s", 0.0, 900.0, 10.0, 1.0)])
        con = sqlite3.connect(tmp_path / "stalls.sqlite")
        con.execute("UPDATE sessions SET v = 2")
        con.commit()
        con.close()
    elif case == "empty":
        state = history_with(tmp_path, [])
    else:
        state = history_with(tmp_path, [WatchRecord("r", "e", "10.7.0.2", "10.9.0.1", 0.0, 900.0, 10.0, 1.0)])
        topo = tmp_path / "t.yaml"
        topo.write_text("components:\n  - {id: net}\nattach:\n  - {prefix: 10.0.0.0/24, node: net}\n")
        extra = ["--topology", str(topo)]
    db = tmp_path / "stalls.sqlite"
    before = sorted(p.name for p in tmp_path.iterdir()), db.read_bytes() if db.exists() else None
    r = qos("from-agent", str(state), *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iqn-qos: error: "), r.stderr
    want = {"missing": "no IQN agent history", "damaged": "cannot read", "old": "no sessions table",
            "newer": "record version 2", "empty": "no watched-time records", "unresolved": "row 1"}[case]
    assert want in err[0]
    # read-only: the database is never created nor changed (SQLite may add a WAL index beside it)
    after = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm")))
    assert (after, db.read_bytes() if db.exists() else None) == before


# -- live --------------------------------------------------------------------------

SLOT = 5.0
VIDEO_S = 10.0  # video from a second server, seconds
VIDEO_PPS = 100


def test_live_agent_records_watched_time(tmp_path: Path) -> None:
    need_xdp()
    state = tmp_path / "state"
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    with Lab() as lab:
        agent = subprocess.Popen(
            lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(state), "--slot", str(SLOT)),
            env=env, stderr=subprocess.PIPE, text=True)
        try:
            sock = sock_path(tmp_path / "run", lab.cli_if)
            wait_ready(sock, agent)
            spec: dict[str, Any] = {"lead": LEAD, "flows": [
                # the page connection: two stalls signalled; the first makes the client known
                {"name": "sigA", "src": lab.srv4, "dst": lab.cli4, "dport": 40001, "frame": 1250,
                 "times": burst_times(0.0, 11)},
                {"name": "sigB", "src": lab.srv4, "dst": lab.cli4, "dport": 40001, "frame": 1250,
                 "times": burst_times(5.0, 12)},
                # the video, from another server, full-size frames (not candidates)
                {"name": "video", "src": lab.srv4b, "dst": lab.cli4, "dport": 40010, "frame": 1292,
                 "bulk_pps": VIDEO_PPS, "from": 0.0, "to": VIDEO_S},
                # a viewer that never signals: must not appear
                {"name": "other", "src": lab.srv6, "dst": lab.cli6, "dport": 40020, "frame": 1292,
                 "bulk_pps": VIDEO_PPS, "from": 0.0, "to": VIDEO_S},
            ]}
            snd = lab.send(spec)
            out, err = snd.communicate(timeout=120)
            assert snd.returncode == 0, err
            sent = json.loads(out)["sent"]
            poll_until(lambda: request(sock, "status"), settled(len(sent["sigA"]) + len(sent["sigB"])))
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
            agent.wait(DEADLINE)
        assert agent.returncode == 0, agent.stderr.read() if agent.stderr else ""

        # `iqn-ctl stalls` still works, and tells when the client became known
        st = subprocess.run(lab.agent_cmd("stalls", "--json", "--state-dir", str(state)), env=env,
                            capture_output=True, text=True, timeout=60)
        assert st.returncode == 0, st.stderr
        stalls = sorted((json.loads(x) for x in st.stdout.splitlines()), key=lambda s: s["start"])
        assert [s["client"] for s in stalls] == [lab.cli4, lab.cli4], stalls
        first, second = stalls
        con = sqlite3.connect(state / "stalls.sqlite")
        rows = con.execute("SELECT v, iface, client, server, slot, slot_s, watched_s, stalled_s "
                           "FROM sessions ORDER BY slot").fetchall()
        con.close()

    assert rows and {r[2] for r in rows} == {lab.cli4}, rows  # the silent viewer is absent
    for v, iface, _client, server, slot, slot_s, watched, stalled in rows:
        assert (v, iface, slot_s) == (1, lab.cli_if, SLOT)
        assert server == lab.srv4b  # the media server, not the signalling one
        assert slot % SLOT == 0 and 0 <= stalled <= watched <= SLOT
    assert len({r[4] for r in rows}) == len(rows)
    watched = sum(r[6] for r in rows)
    stalled = sum(r[7] for r in rows)
    # the first stall selected the client and is not counted; the second is, exactly as recorded
    assert stalled == pytest.approx(second["duration"], abs=1e-6)
    lag = (sent["sigB"][-1] - sent["sigB"][0]) - (burst_times(5.0, 12)[-1] - burst_times(5.0, 12)[0])
    assert stalled == pytest.approx(STALL + lag, abs=0.3)
    # watched: from when the first stall's end was noticed to the last video packet actually
    # sent; samples are SAMPLE_EVERY s apart (the loop looks every 0.5 s), so the end may run
    # over by up to two
    expect = sent["video"][-1] - first["detected_at"]
    assert expect - 0.25 <= watched <= expect + 2 * SAMPLE_EVERY + 1.0, (watched, expect, rows)

    # the QoS service takes them
    topo = tmp_path / "topo.yaml"
    topo.write_text(
        "components:\n  - {id: viewers, kind: subnet}\n  - {id: media, kind: media-server}\n"
        "  - {id: media>viewers, kind: link}\n"
        "edges:\n  - {from: media, to: viewers, via: media>viewers}\n"
        f"attach:\n  - {{prefix: {lab.cli4}/32, node: viewers}}\n"
        f"  - {{prefix: {lab.srv4b}/32, node: media, role: server}}\n")
    lines_file = tmp_path / "lines.jsonl"
    r = qos("from-agent", str(state), "--topology", str(topo), "--out", str(lines_file))
    assert r.returncode == 0, r.stderr
    lines = [parse_line(x, f"lines:{i}") for i, x in enumerate(lines_file.read_text().splitlines(), 1)]
    assert [(ln.t, ln.n, ln.n - ln.m, ln.client, ln.server) for ln in lines] == [
        (r[4], round(r[6]), round(r[7]), r[2], r[3]) for r in rows if round(r[6]) >= 1]
    assert {ln.path for ln in lines} == {("media", "media>viewers", "viewers")}
    inf = qos("infer", str(lines_file), "--slot", str(SLOT), "--json", "--l1", "0")
    assert inf.returncode == 0, inf.stderr
    ests = [json.loads(x) for x in inf.stdout.splitlines()]
    assert {e["slot"] for e in ests} == {ln.t for ln in lines}
    bad = sum(ln.n - ln.m for ln in lines)
    assert bad > 0 and any(e["p"] > 0 for e in ests)
