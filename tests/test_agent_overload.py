"""Graceful overload (issue 19), live: an agent starved of CPU (a cgroup CPU
quota) under more candidates than it can handle, with a small ring and a small
``--backlog``.

What must hold: the agent says it is behind (``lag_ms``/``lag_max_ms``,
``polls_late``, ``load`` = ``shedding``, the ``shed`` and ``backlog`` counters
and metrics move); every candidate the kernel counted is accounted for (fed to
the engine, shed by the agent or lost in the ring: nothing silent); and once
the quota is lifted, every stall whose end the agent logged is in the history,
none left open.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from conftest import ROOT, need
from test_agent_live import DEADLINE, need_xdp, poll_until, stop, wait_ready

from iqn_ctl.live.api import ApiError, request, sock_path
from iqn_ctl.live.history import MAX_PENDING, History, StallRecord
from iqn_lab.testbed import PY
from iqn_lab.testbed import Testbed as Lab

FLOWS, SECS = 3000, 4.0  # 60,000 candidates/s for 4 s: far more than 5 % of a core handles
BACKLOG = 2000
OTHER_MAC = "02:00:00:00:00:99"  # the client's stack drops these after XDP has seen them


@contextlib.contextmanager
def cpu_quota(pid: int, fraction: float) -> Iterator[None]:
    """Hold ``pid`` (all its threads) to ``fraction`` of one CPU in a cgroup of
    its own (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``); removed after."""
    v2 = Path("/sys/fs/cgroup")
    if "cpu" in (v2 / "cgroup.controllers").read_text(errors="replace").split() if (
            v2 / "cgroup.controllers").exists() else False:
        root, limit = v2, lambda d: (d / "cpu.max").write_text(f"{int(fraction * 100000)} 100000")
    else:
        root = Path("/sys/fs/cgroup/cpu")
        need((root / "cpu.cfs_quota_us").exists(), "needs a cgroup CPU controller (v2 cpu.max or v1 cpu)")

        def limit(d: Path) -> None:
            (d / "cpu.cfs_period_us").write_text("100000")
            (d / "cpu.cfs_quota_us").write_text(str(int(fraction * 100000)))
    group = root / f"iqn-overload-{os.getpid()}-{random.randrange(1 << 30):x}"
    group.mkdir()
    if not any((group / f).exists() for f in ("cpu.max", "cpu.cfs_quota_us")):
        group.rmdir()
        need(False, f"the cgroup CPU controller is not enabled for children of {root}")
    try:
        limit(group)
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        with contextlib.suppress(OSError):  # the process may be gone
            for p in (group / "cgroup.procs").read_text().split():
                (root / "cgroup.procs").write_text(p)
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def metric(lab: Lab, port: int, name: str) -> float:
    """One sample of the agent's /metrics, read inside the client namespace (where it listens)."""
    text = subprocess.run(
        ["ip", "netns", "exec", lab.cli_ns, PY, "-c",
         f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics',"
         " timeout=30).read().decode())"], capture_output=True, text=True, check=True, timeout=60).stdout
    m = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_starved_agent_sheds_oldest_says_so_and_records_every_ended_stall(tmp_path: Path) -> None:
    need_xdp()
    need(shutil.which("gcc") is not None, "needs gcc")
    exe = tmp_path / "blast"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "bench" / "blast.c")], check=True)
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    state = tmp_path / "state"
    port = random.randrange(20000, 60000)
    with Lab() as lab:
        err = (tmp_path / "agent.log").open("w+")
        agent = subprocess.Popen(
            lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(state), "--ring-pages", "64",
                          "--backlog", str(BACKLOG), "--bulk-ratio", "0", "--metrics-port", str(port),
                          # blast.c floods candidates with no client side: only with the
                          # forgery guard off do they reach (and overload) user space
                          "--pairing", "off", "--cap", "0"),
            env=env, stderr=err, text=True)
        sock = sock_path(tmp_path / "run", lab.cli_if)
        seen: list[dict[str, Any]] = []
        done = threading.Event()

        def watch() -> None:  # status while starved: answers are slow, none may be missed
            while not done.is_set():
                with contextlib.suppress(ApiError):
                    seen.append(dict(request(sock, "status", timeout=20.0)))
                time.sleep(0.1)

        try:
            wait_ready(sock, agent)
            watcher = threading.Thread(target=watch)
            with cpu_quota(agent.pid, 0.05):
                watcher.start()
                r = subprocess.run(
                    ["ip", "netns", "exec", lab.srv_ns, str(exe), "-m", lab.srv_if, str(SECS),
                     f"src_mac={lab.srv_mac}", f"dst_mac={OTHER_MAC}", f"src={lab.srv4}", "dst=198.19.0.0",
                     f"flows={FLOWS}", "spread=1", "stall_for=1.5", "seed=3"],
                    capture_output=True, text=True, timeout=120)
                assert r.returncode == 0, r.stderr
                sent = int(dict(x.split("=") for x in r.stdout.split())["candidates"])
                poll_until(lambda: seen[-1] if seen else {}, lambda s: s.get("shed", 0) > 0, timeout=DEADLINE)
            # quota lifted: the agent catches up and every stall ends
            final = poll_until(lambda: dict(request(sock, "status", timeout=20.0)),
                               lambda s: s["candidates"] >= sent and s["flows_in_stall"] == 0
                               and s["events"] + s["shed"] + s["lost"] == s["candidates"],
                               timeout=DEADLINE * 2)
            done.set()
            watcher.join()
            # caught up: no longer behind (the last lag measured may still be over the budget)
            calm = poll_until(lambda: dict(request(sock, "status", timeout=20.0)),
                              lambda s: s["load"] == "ok")

            def ended_rows() -> list[Any]:
                with History(state, create=False) as h:
                    return [r for r in h.query(lab.cli_if) if r.state == "ended"]

            # in the history while the agent still runs (written in batches while it was behind)
            running = poll_until(ended_rows, lambda rows: len(rows) >= final["stalls_ended"])
            shed_metric, backlog_metric = (
                metric(lab, port, "iqn_shed_events_total"), metric(lab, port, "iqn_backlog"))
        finally:
            done.set()
            log = stop(agent) or ""
            err.seek(0)
            log += err.read()
    # it said so: lag over the budget, late polls, shedding, a backlog at its bound
    assert final["candidates"] == sent, final
    assert any(s["load"] == "shedding" for s in seen), [s["load"] for s in seen]
    assert calm["load"] == "ok", calm
    assert final["shed"] > 0 and final["polls_late"] > 0 and final["lag_max_ms"] > 50, final
    assert final["backlog_max"] == BACKLOG == final["backlog_limit"], final
    assert shed_metric == final["shed"] and backlog_metric == 0
    # nothing silent: every candidate counted by the kernel was fed, shed or lost in the ring
    assert final["events"] + final["shed"] + final["lost"] == final["candidates"], final
    assert "the agent is overloaded: dropping the oldest" in log
    # every stall whose end was logged is in the history as ended, and nothing else is
    ends = set(re.findall(r"stall end flow=(\S+) client=\S+ start=(\S+) ", log))
    assert len(ends) == final["stalls_ended"] > 0, (len(ends), final["stalls_ended"])
    assert {(r.flow, iso(r.start)) for r in running} == ends
    with History(state, create=False) as h:
        rows = h.query(lab.cli_if)
    assert all(r.state == "ended" for r in rows), {r.state for r in rows}
    assert {(r.flow, iso(r.start)) for r in rows} == ends


def test_history_gives_up_open_rows_before_ended_stalls(tmp_path: Path) -> None:
    """More writes held than MAX_PENDING (a failing disk under an outage): the
    oldest ``start`` writes go first, every ended stall stays and is written."""
    def rec(i: int, state: str) -> StallRecord:
        return StallRecord("eth0", f"f:{i}", "c", "s", 1.8e9 + i, 1.8e9 + i + 2, 0 if state == "open" else 8,
                           1.8e9 + i + 2.5, state=state)

    with History(tmp_path) as h:
        for i in range(MAX_PENDING, MAX_PENDING + 5):  # stalls end (the oldest writes held)
            h.stage("end", rec(i, "ended"))
        for i in range(MAX_PENDING - 5):  # then many start
            h.stage("start", rec(i, "open"))
        for i in range(MAX_PENDING + 5, MAX_PENDING + 15):  # and more end: 10 writes too many
            h.stage("end", rec(i, "ended"))
        assert (h.pending, h.dropped) == (MAX_PENDING, 10)
        assert h.flush()
        rows = h.query()
    late = range(MAX_PENDING, MAX_PENDING + 15)
    assert {r.flow for r in rows if r.state == "ended"} == {f"f:{i}" for i in late}
    # the 10 oldest open rows were given up, the rest written
    assert sorted(int(r.flow[2:]) for r in rows if r.state == "open") == list(range(10, MAX_PENDING - 5))


def test_one_round_ending_more_stalls_than_the_history_holds(tmp_path: Path) -> None:
    """An outage ends more stalls in one poll round than History holds in
    memory (MAX_PENDING), while the agent is behind (commits batched): the round
    commits every HISTORY_BATCH_ROWS writes, so no ended stall is given up and
    no open row is left behind. Fed through the agent's own event handler."""
    from iqn_ctl.engine.tracker import StallEnded, StallStarted
    from iqn_ctl.live.agent import Agent, AgentConfig

    agent = Agent(AgentConfig("lo0", state_dir=tmp_path, run_dir=tmp_path / "run"))
    agent.history = History(tmp_path)
    agent.lag = 1.0  # behind: the history is committed in batches
    count, t = MAX_PENDING + 2000, 1000.0
    agent._on_events([StallStarted(f"f{i}", t + i / 1e3, t + 0.8) for i in range(count)])
    agent._on_events([StallEnded(f"f{i}", t + i / 1e3, t + 3.0, t + 3.8, 12) for i in range(count)])
    agent.history.flush(force=True)
    rows = agent.history.query()
    assert agent.history.dropped == 0
    assert len(rows) == count and {r.state for r in rows} == {"ended"}
    agent.history.close()


def _flat(batch: Any) -> list[tuple[bytes, int]]:
    """A burst batch's candidates as (raw key, ns), record by record."""
    bid, t = batch.bursts(np.zeros(len(batch), np.int64)).candidates()
    return [(batch.keys[b], int(x)) for b, x in zip(bid.tolist(), t.tolist(), strict=True)]


def test_backlog_keeps_the_newest_records_and_counts_the_rest(tmp_path: Path) -> None:
    """The agent's backlog (Agent._take) of burst records: past --backlog the
    oldest candidates go (whole records, then the head of the next one: exactly
    the excess), counted in ``shed``; what is fed is oldest-first among those
    kept, at most CHUNK candidates a round, and nothing is lost between rounds."""
    from iqn_ctl.engine.params import BURST_MAX
    from iqn_ctl.live.agent import CHUNK, Agent, AgentConfig
    from iqn_ctl.live.bursttable import BurstBatch

    def batch(n: int, t0: int, seed: int) -> BurstBatch:
        count = np.array([1 + (i + seed) % 4 for i in range(n)], np.int64)
        off = np.zeros((n, BURST_MAX), np.int64)
        for i, c in enumerate(count.tolist()):
            off[i, :c] = np.arange(c) * 1_000_000
        first = t0 + np.arange(n, dtype=np.int64) * 10_000_000
        return BurstBatch([b"k%d" % (i % 7) for i in range(n)], first, count, off)

    agent = Agent(AgentConfig("lo0", state_dir=tmp_path, run_dir=tmp_path / "run", backlog=CHUNK + 100))
    big = batch(3500, 100 * 10**9, 1)  # 8,750 candidates: 458 over the backlog
    flat = _flat(big)
    over = len(flat) - (CHUNK + 100)
    fed = _flat(agent._take(big))
    assert agent.shed == over and agent.load() == "shedding"
    assert agent.backlog_max == CHUNK + 100  # exactly the bound: a record's head was cut
    kept = flat[over:]
    assert CHUNK - 4 < len(fed) <= CHUNK and fed == kept[:len(fed)]  # the oldest of the newest
    assert agent.snapshot()["backlog"] == len(kept) - len(fed)
    more = batch(3, 200 * 10**9, 0)
    assert _flat(agent._take(more)) == kept[len(fed):] + _flat(more)
    assert not agent._backlog and agent.snapshot()["backlog"] == 0
    assert agent.shed == over and agent.backlog_max == CHUNK + 100


def test_a_storm_of_stall_starts_logs_a_summary_and_writes_every_start(
        tmp_path: Path, caplog: Any) -> None:
    """One round starts far more stalls than START_LINES (an outage): the first
    START_LINES get their own line, the rest one summary line with their count
    (``event`` ``stall_starts``); every start is an open row of the history
    (written in one statement per run of starts), every end its own line and
    row. A round with few starts logs each, as always."""
    import logging

    from iqn_ctl.engine.tracker import StallEnded, StallStarted
    from iqn_ctl.live.agent import START_LINES, Agent, AgentConfig

    agent = Agent(AgentConfig("lo0", state_dir=tmp_path, run_dir=tmp_path / "run"))
    agent.history = History(tmp_path)
    count, t = START_LINES + 500, 1000.0
    with caplog.at_level(logging.INFO, logger="iqn"):
        agent._on_events([StallStarted(f"f{i}", t + i / 1e4, t + 0.8) for i in range(count)])
        starts = [r for r in caplog.records if getattr(r, "event", "") == "stall_start"]
        summary = [r for r in caplog.records if getattr(r, "event", "") == "stall_starts"]
        assert len(starts) == START_LINES and len(summary) == 1
        assert summary[0].count == 500 and f"{count} starts this round" in summary[0].getMessage()
        assert [r.flow for r in starts] == [f"f{i}" for i in range(START_LINES)]
        rows = agent.history.query()
        assert len(rows) == count and {r.state for r in rows} == {"open"}
        caplog.clear()
        agent._on_events([StallEnded(f"f{i}", t + i / 1e4, t + 3.0, t + 3.8, 12) for i in range(count)]
                         + [StallStarted("g", t + 4, t + 4.8)])
        ends = [r for r in caplog.records if getattr(r, "event", "") == "stall_end"]
        assert len(ends) == count
        assert [getattr(r, "event", "") for r in caplog.records if "stall" in getattr(r, "event", "")][-1] \
            == "stall_start"
    agent.history.flush(force=True)
    rows = agent.history.query()
    assert len(rows) == count + 1 and sorted(r.state for r in rows) == ["ended"] * count + ["open"]
    assert agent.stalls_started == count + 1 and agent.stalls_ended == count
    agent.history.close()
