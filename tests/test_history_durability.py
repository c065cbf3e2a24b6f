"""Nothing lost (issue 10 B): the stall history survives SIGKILL mid-stall, a
full disk and a damaged file, from the outside.

Real parts only: the agent is a real ``iqn-ctl attach`` on a real veth with the
real XDP program, signals are real UDP packets from another namespace, the full
disk is a real tmpfs of a few MiB filled with a real file, and the damaged
history is a real SQLite file with garbage written over pages in its middle.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from test_agent_live import DEADLINE, LEAD, cli, need_xdp, poll_until, stop, wait_ready

from iqn_ctl.engine.synth import SignalModel, signal_times
from iqn_ctl.live.api import request, sock_path
from iqn_ctl.live.history import MAX_PENDING, History, StallRecord, db_path
from iqn_lab.testbed import PY
from iqn_lab.testbed import Testbed as Lab


def stalls_json(lab: Lab, env: dict[str, str], state: Path) -> list[dict[str, Any]]:
    r = cli(lab, env, "stalls", "--json", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines()]


def signal_spec(lab: Lab, port: int, seconds: float, seed: int) -> dict[str, Any]:
    """One flow signalling a stall of ``seconds`` (offsets from the sender's start)."""
    times = [float(t) for t in signal_times([(0.0, seconds)], SignalModel(), np.random.default_rng(seed))]
    return {"lead": LEAD, "flows": [{"name": "x", "src": lab.srv4, "dst": lab.cli4, "dport": port,
                                     "frame": 1250, "times": times}]}


def start_agent(lab: Lab, env: dict[str, str], state: Path, *extra: str) -> subprocess.Popen[str]:
    agent = subprocess.Popen(lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(state), *extra),
                             env=env, stderr=subprocess.PIPE, text=True)
    wait_ready(sock_path(Path(env["IQN_RUN_DIR"]), lab.cli_if), agent)
    return agent


def finish(proc: subprocess.Popen[str] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=60)


def test_sigkill_mid_stall_leaves_an_interrupted_stall(tmp_path: Path) -> None:
    """A stall is in the history as soon as it starts ("open"); the agent is
    SIGKILLed in the middle of it; the next agent on the interface marks it
    "interrupted" (and truncated), and ``stalls --json`` shows it."""
    need_xdp()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    state = tmp_path / "s"
    with Lab() as lab:
        sock = sock_path(tmp_path / "run", lab.cli_if)
        agent: subprocess.Popen[str] | None = start_agent(lab, env, state)
        snd: subprocess.Popen[str] | None = None
        again: subprocess.Popen[str] | None = None
        try:
            snd = lab.send(signal_spec(lab, 40030, 30.0, 12))
            poll_until(lambda: request(sock, "flows"), lambda fs: any(f["state"] == "stall" for f in fs))
            # written when it starts, long before it ends: visible with the agent running
            opened = poll_until(lambda: stalls_json(lab, env, state), lambda rs: len(rs) == 1)
            assert [(r["state"], r["truncated"]) for r in opened] == [("open", False)], opened
            assert opened[0]["flow"].endswith(":40030")
            assert opened[0]["end"] == opened[0]["detected_at"] >= opened[0]["start"], opened
            assert agent is not None
            agent.kill()  # SIGKILL: no chance to close anything
            agent.wait(DEADLINE)
            assert agent.returncode == -signal.SIGKILL
            killed = time.time()
            agent = None
            # dead agent, nothing restarted yet: the row is still there, as written
            assert [r["state"] for r in stalls_json(lab, env, state)] == ["open"]
            again = start_agent(lab, env, state)
            recs = stalls_json(lab, env, state)
        finally:
            finish(snd)
            if agent is not None:
                stop(agent)
            err = stop(again) if again is not None else ""
    # the signal goes on: the new agent may already have seen a new stall of its own, open
    (r,) = [x for x in recs if x["start"] == opened[0]["start"]]
    assert all(x["state"] == "open" and x["start"] > killed for x in recs if x is not r), recs
    assert (r["state"], r["truncated"], r["flow"]) == ("interrupted", True, opened[0]["flow"]), r
    # what was known when it was written is kept: it started then and went on at least until detection
    assert (r["start"], r["end"]) == (opened[0]["start"], opened[0]["detected_at"])
    assert "1 stall(s) left open by an agent that died marked interrupted" in err, err


def _fill(path: Path) -> int:
    """Write zeros to ``path`` until the file system is full; returns bytes written."""
    chunk = b"\0" * 65536
    n = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n += f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                if len(chunk) == 1:
                    return n
                chunk = chunk[: len(chunk) // 2]


def _metrics(lab: Lab, port: int) -> dict[str, float]:
    out = subprocess.run(
        ["ip", "netns", "exec", lab.cli_ns, PY, "-c",
         f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics')"
         ".read().decode())"], capture_output=True, text=True, timeout=30, check=True).stdout
    got = {}
    for line in out.splitlines():
        if line.startswith("iqn_history_"):
            name, value = line.rsplit(" ", 1)
            got[name.split("{", 1)[0]] = float(value)
    return got


def test_disk_full_keeps_records_counts_failures_and_writes_them_later(tmp_path: Path) -> None:
    """The state dir is a 4 MiB tmpfs; it is filled while a stall runs. The
    stall's records stay in memory, the failed writes show in ``status`` and the
    metrics, and once the filler is deleted the stall is written, complete."""
    need_xdp()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    state = tmp_path / "s"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "iqntest", str(state)], check=True)
    try:
        with Lab() as lab:
            sock = sock_path(tmp_path / "run", lab.cli_if)
            mport = 20000 + os.getpid() % 30000
            agent = start_agent(lab, env, state, "--metrics-port", str(mport), "--metrics-addr", "127.0.0.1")
            snd: subprocess.Popen[str] | None = None
            try:
                assert _fill(state / "filler") > 0
                snd = lab.send(signal_spec(lab, 40031, 2.0, 13))
                out, err = snd.communicate(timeout=60)
                assert snd.returncode == 0, err
                sent = len(json.loads(out)["sent"]["x"])
                # the stall started and ended; both writes failed and are held
                st = poll_until(lambda: request(sock, "status"),
                                lambda s: s["events"] >= sent and s["stalls_ended"] == 1
                                and s["history_pending"] == 2)
                assert (st["stalls_ended"], st["history_pending"], st["history_dropped"]) == (1, 2, 0), st
                assert st["history_failures"] >= 1, st
                m = _metrics(lab, mport)
                assert m["iqn_history_pending"] == 2, m
                assert m["iqn_history_write_failures_total"] >= 1, m
                assert m["iqn_history_dropped_total"] == 0, m
                assert stalls_json(lab, env, state) == []  # nothing on disk yet
                fails = st["history_failures"]
                # failures are retried, not given up: the count goes on while the disk is full
                st = poll_until(lambda: request(sock, "status"), lambda s: s["history_failures"] > fails)
                assert st["history_failures"] > fails and st["history_pending"] == 2, st
                (state / "filler").unlink()
                st = poll_until(lambda: request(sock, "status"), lambda s: s["history_pending"] == 0)
                assert st["history_pending"] == 0, st
                recs = stalls_json(lab, env, state)
            finally:
                finish(snd)
                err = stop(agent)
        assert len(recs) == 1, recs
        assert (recs[0]["state"], recs[0]["truncated"]) == ("ended", False), recs
        assert recs[0]["flow"].endswith(":40031") and recs[0]["duration"] > 1.0, recs
        assert "database or disk is full; keeping them in memory" in err, err
        assert "writable again: wrote 2 held record(s)" in err, err
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def _damage(path: Path) -> bytes:
    """A real history of several pages with garbage over two pages in its middle."""
    with History(path.parent) as h:
        h.add([StallRecord("eth0", f"198.18.0.1:443>198.18.0.2:{1000 + i}", "198.18.0.2", "198.18.0.1",
                           1.7e9 + i, 1.7e9 + i + 1, 8, 1.7e9 + i + 1.2) for i in range(3000)])
    size = path.stat().st_size
    assert size > 16 * 4096, size
    with open(path, "r+b") as f:
        f.seek((size // 2) // 4096 * 4096)
        f.write(os.urandom(2 * 4096))
    return path.read_bytes()


def test_damaged_history_is_moved_aside_at_attach(tmp_path: Path) -> None:
    """The agent checks the history when it starts; a damaged one is moved aside
    (kept for recovery, said in one log line) and a new one is started, which
    records the next stall. ``stalls`` on the damaged file is one error line."""
    need_xdp()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    damaged = _damage(db_path(state))
    with Lab() as lab:
        r = cli(lab, env, "stalls", "--state-dir", str(state))
        assert r.returncode == 2, r
        assert r.stderr.startswith(f"iqn-ctl: error: stall history {db_path(state)} is damaged"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        sock = sock_path(tmp_path / "run", lab.cli_if)
        agent = start_agent(lab, env, state)
        snd: subprocess.Popen[str] | None = None
        try:
            snd = lab.send(signal_spec(lab, 40032, 2.0, 14))
            out, err = snd.communicate(timeout=60)
            assert snd.returncode == 0, err
            st = poll_until(lambda: request(sock, "status"), lambda s: s["stalls_ended"] == 1)
            assert st["stalls_ended"] == 1 and st["history_failures"] == 0, st
            recs = stalls_json(lab, env, state)
        finally:
            finish(snd)
            log = stop(agent)
    aside = [p for p in state.iterdir()
             if p.name.startswith("stalls.sqlite.damaged-") and not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1, list(state.iterdir())
    assert aside[0].read_bytes() == damaged  # kept as it was, for recovery
    moved = [x for x in log.splitlines() if "is damaged" in x]
    assert len(moved) == 1 and f"moved it to {aside[0]}" in moved[0], log
    assert [(x["state"], x["flow"].rsplit(":", 1)[1]) for x in recs] == [("ended", "40032")], recs


def test_history_is_fully_synchronous(tmp_path: Path) -> None:
    """synchronous=FULL (docs/agent.md, bench/bench_history.py): a commit is on
    disk before the agent goes on, so power loss costs no recorded stall."""
    with History(tmp_path) as h:
        assert h._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert h._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_history_from_before_states_reads_as_ended(tmp_path: Path) -> None:
    """A history written before the state column existed opens, reads its rows
    as "ended", and takes new ones."""
    db = sqlite3.connect(db_path(tmp_path))
    db.executescript(
        'CREATE TABLE stalls (id INTEGER PRIMARY KEY AUTOINCREMENT, iface TEXT NOT NULL, flow TEXT NOT NULL,'
        ' client TEXT NOT NULL, server TEXT NOT NULL, start REAL NOT NULL, "end" REAL NOT NULL,'
        ' candidates INTEGER NOT NULL, detected_at REAL NOT NULL, truncated INTEGER NOT NULL DEFAULT 0,'
        " estimator TEXT NOT NULL DEFAULT '');"
        " INSERT INTO stalls (iface, flow, client, server, start, \"end\", candidates, detected_at)"
        " VALUES ('eth0', 'f', 'c', 's', 1.0, 2.0, 8, 2.5);")
    db.commit()
    db.close()
    with History(tmp_path, create=False) as h:
        (old,) = h.query()
    assert (old.state, old.end, old.as_json()["state"]) == ("ended", 2.0, "ended")
    t = time.time()
    with History(tmp_path) as h:
        h.add([StallRecord("eth0", "g", "c", "s", t, t + 1, 8, t + 1.5)])
        assert [r.state for r in h.query()] == ["ended", "ended"]


def test_staged_writes_start_end_drop_and_the_bound(tmp_path: Path) -> None:
    """What the agent stages: a start is an open row, its end replaces that row
    (matched by the start it was written with), a drop deletes it; ``--since``
    keeps open stalls; at most MAX_PENDING writes are held, the oldest dropped."""
    def r(port: int, state: str = "ended", start: float = 1.8e9) -> StallRecord:
        return StallRecord("eth0", f"f:{port}", "c", "s", start, start + 2, 0 if state == "open" else 9,
                           start + 2.5, state=state)

    with History(tmp_path) as h:
        h.stage("start", r(1, "open"))
        h.stage("start", r(2, "open"))
        h.stage("start", r(3, "open", 1.9e9))
        assert h.flush() and h.pending == 0
        assert [x.state for x in h.query()] == ["open", "open", "open"]
        # the end's start may differ from the open row's by a wall-clock step: matched by ``opened``
        h.stage("end", r(1, start=1.8e9 + 0.001), opened=1.8e9)
        h.stage("drop", r(2))
        assert h.flush()
        got = h.query()
        assert [(x.flow, x.state, x.candidates) for x in got] == [("f:1", "ended", 9), ("f:3", "open", 0)]
        assert [x.flow for x in h.query(since=1.95e9)] == ["f:3"]  # open: its end is unknown yet
        for i in range(MAX_PENDING + 5):
            h.stage("start", r(100 + i, "open"))
        assert (h.pending, h.dropped, h.failures) == (MAX_PENDING, 5, 0)
        assert h.flush() and h.count() == 2 + MAX_PENDING
        flows = {x.flow for x in h.query()}
        assert {"f:100", "f:104"}.isdisjoint(flows) and {"f:105", f"f:{104 + MAX_PENDING}"} <= flows


def test_one_flush_of_many_writes_equals_a_flush_per_write(tmp_path: Path) -> None:
    """History.flush writes a run of starts (or of ends and drops) in one
    statement each: random interleavings of stalls starting, ending and being
    discarded (some in the same flush as their start) leave the same rows as
    committing every write on its own."""
    import random as _random

    rng = _random.Random(19)
    for trial in range(30):
        ops: list[tuple[str, StallRecord, float | None]] = []
        open_: list[tuple[str, float]] = []
        for k in range(rng.randrange(1, 60)):
            if open_ and rng.random() < 0.5:
                flow, start = open_.pop(rng.randrange(len(open_)))
                kind = rng.choice(["end", "end", "drop"])
                end = StallRecord("eth0", flow, "c", "s", start + 0.001, start + 2, 9, start + 2.5)
                ops.append((kind, end, start))
            else:
                flow, start = f"f:{rng.randrange(8)}", 1.8e9 + k
                open_.append((flow, start))
                rec = StallRecord("eth0", flow, "c", "s", start, start, 0, start, state="open")
                ops.append(("start", rec, None))
        rows = []
        for batched in (True, False):
            with History(tmp_path / f"{trial}-{batched}") as h:
                for kind, rec, opened in ops:
                    h.stage(kind, rec, opened)
                    if not batched:
                        assert h.flush()
                assert h.flush()
                rows.append([(r.flow, r.start, r.state, r.candidates) for r in h.query()])
        assert rows[0] == rows[1]


def _all_rows(path: Path) -> list[tuple[Any, ...]]:
    """Every column of every row, ids included, read by plain SQLite."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT * FROM stalls ORDER BY id").fetchall()
    finally:
        db.close()


def test_many_rows_in_one_flush_are_the_rows_one_insert_each_would_write(tmp_path: Path) -> None:
    """A flush writes its rows many to a statement (History._insert_rows): around
    and across the statement's row count, ``stage_open`` and ``stage`` leave the same
    rows, ids and every column, as inserting the records one statement each, and
    ends and drops still find the open rows they replace."""
    from iqn_ctl.live.history import _ROWS_PER_INSERT

    k = _ROWS_PER_INSERT
    for n in (1, k - 1, k, k + 1, 2 * k + 3):
        recs = [StallRecord("eth0", f"198.18.0.1:443>198.18.0.2:{i}", f"198.18.0.{2 + i % 5}", "198.18.0.1",
                            1.8e9 + i / 7, 1.8e9 + i / 7 + 0.25, 0, 1.8e9 + i / 7 + 0.25, estimator="median",
                            state="open") for i in range(n)]
        ref = tmp_path / f"ref{n}"
        with History(ref) as h:
            for r in recs:
                h._db.execute('INSERT INTO stalls (iface, flow, client, server, start, "end", candidates, '
                              "detected_at, truncated, estimator, bulk_check, state) "
                              "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                              (r.iface, r.flow, r.client, r.server, r.start, r.end, r.candidates,
                               r.detected_at, int(r.truncated), r.estimator, r.bulk_check, r.state))
            h._db.commit()
        staged, opened = tmp_path / f"stage{n}", tmp_path / f"open{n}"
        with History(staged) as h:
            for r in recs:
                h.stage("start", r)
            assert h.flush() and h.pending == 0
        with History(opened) as h:
            for r in recs:
                h.stage_open(r.iface, r.flow, r.client, r.server, r.start, r.end, r.estimator)
            assert h.flush() and h.pending == 0
            assert h.query() == recs
        want = _all_rows(db_path(ref))
        assert len(want) == n
        assert _all_rows(db_path(staged)) == want
        assert _all_rows(db_path(opened)) == want
        with History(opened) as h:  # every open row is found by its end (or drop)
            for i, r in enumerate(recs):
                end = StallRecord(r.iface, r.flow, r.client, r.server, r.start, r.start + 2, 9, r.start + 2.5,
                                  estimator="median")
                h.stage("drop" if i % 3 == 0 else "end", end)
            assert h.flush()
            assert [(x.flow, x.state) for x in h.query()] == [
                (r.flow, "ended") for i, r in enumerate(recs) if i % 3]


def test_rows_of_a_flush_survive_the_process_dying_right_after(tmp_path: Path) -> None:
    """What ``flush`` returned True for is on disk: a process that stages an
    outage's open rows (several rounds, thousands a round), flushes each round
    and dies at once (``os._exit``: no close, no checkpoint), with a round staged
    and not flushed, leaves every flushed row and none of the unflushed ones."""
    code = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from pathlib import Path
from iqn_ctl.live.history import History
h = History(Path({str(tmp_path)!r}))
for rnd in range(3):
    for i in range(3001):
        h.stage_open("eth0", f"f:{{rnd}}:{{i}}", "c", "s", 1.8e9 + rnd + i / 1e4, 1.8e9 + rnd + 0.2, "count")
    assert h.flush()
for i in range(10):
    h.stage_open("eth0", f"late:{{i}}", "c", "s", 1.9e9, 1.9e9, "count")
os._exit(0)
"""
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with History(tmp_path) as h:
        got = h.query()
    assert len(got) == 3 * 3001
    assert {x.state for x in got} == {"open"}
    assert [x.flow for x in got] == [f"f:{rnd}:{i}" for rnd in range(3) for i in range(3001)]
