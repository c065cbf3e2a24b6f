"""The data plane's BPF ring buffer: loss is counted in the kernel, exactly and
never silently (in candidates, a burst record carrying n of them), and the
reader is woken in batches of burst records.

Direct tests load the real program with :class:`Datapath` and drive it with
BPF_PROG_TEST_RUN; the agent test runs ``iqn-ctl attach`` on a real veth with a
one-page ring and a burst of real candidates while the agent is stopped.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from conftest import need_root
from test_agent_live import burst_while_stopped, cli, need_xdp, poll_until, stop, wait_ready

from iqn_ctl.capture.frames import udp_frame
from iqn_ctl.engine.params import CandidateFilter
from iqn_ctl.live import bpf_testrun
from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import PY
from iqn_lab.testbed import Testbed as Lab

FILT = CandidateFilter()
CAND = udp_frame("198.18.0.1", "198.18.0.2", FILT.port, 51234, frame_len=1200)
#: a one-page ring (4096 bytes) holds this many 128-byte burst records: the
#: kernel refuses a reservation once unread data would exceed size - 1 bytes
ONE_PAGE_RECORDS = (4096 - 1) // 128
N = 4  # candidates per burst record (the default --n)


def test_full_ring_counts_every_lost_record_in_the_kernel() -> None:
    """No reader, a one-page ring, 1000 candidates (250 burst records): the
    ring keeps the first 31 records and the kernel counts the candidates of
    each of the others as lost at once, with no later event needed to reveal it."""
    need_xdp()
    from iqn_ctl.live.datapath import Datapath

    with Datapath("lo", FILT, ring_pages=1) as dp:
        runner = bpf_testrun.TestRunner(dp.prog_fd)
        burst = 1000
        runner.run(CAND, repeat=burst)
        c = dp.counters()
        assert c["candidates"] == burst
        assert c["lost"] == burst - N * ONE_PAGE_RECORDS
        assert c["bursts"] == ONE_PAGE_RECORDS
        got = dp.poll(0)
        assert len(got) == N * ONE_PAGE_RECORDS
        # the ring has room again: the next burst is delivered and nothing more is lost
        runner.run(CAND, repeat=N)
        assert len(dp.poll(0)) == N and dp.counters()["lost"] == burst - N * ONE_PAGE_RECORDS


def test_reader_is_woken_once_enough_records_wait() -> None:
    """wakeup_events=k: a reader asleep on the ring with a long timeout stays
    asleep for k-1 burst records and wakes for the k-th, with all k."""
    need_xdp()
    from iqn_ctl.live.datapath import Datapath

    k = 6
    with Datapath("lo", FILT, wakeup_events=k) as dp:
        runner = bpf_testrun.TestRunner(dp.prog_fd)
        got: list[int] = []
        woke = threading.Event()

        def reader() -> None:
            keys, _ts = dp.poll_batch(60_000)
            got.append(len(keys))
            woke.set()

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        time.sleep(0.2)  # let it fall asleep on the empty ring
        runner.run(CAND, repeat=N * (k - 1))
        assert not woke.wait(1.0), f"woken by {got} candidates, before the k-th record"
        t0 = time.monotonic()
        runner.run(CAND, repeat=N)
        assert woke.wait(30.0), "not woken by the k-th record"
        th.join(5)
        assert got == [N * k]
        assert time.monotonic() - t0 < 30.0


def test_reader_draining_while_the_kernel_writes_loses_nothing() -> None:
    """2 M candidates into a roomy ring while a thread drains it, as the agent
    does: every record arrives once, in time order, none is counted lost. (A
    consumer position written byte by byte once let the kernel see a torn,
    too large value now and then and refuse records while the ring was nearly
    empty.)"""
    need_xdp()
    import numpy as np

    from iqn_ctl.live.datapath import Datapath

    calls, per_call = 200, 10_000
    with Datapath("lo", FILT, ring_pages=4096) as dp:
        runner = bpf_testrun.TestRunner(dp.prog_fd)
        done = threading.Event()
        got: list[np.ndarray] = []

        def reader() -> None:
            while not done.is_set() or dp.counters()["candidates"] > sum(map(len, got)):
                _keys, ts = dp.poll_batch(3)
                if len(ts):
                    got.append(ts)
                if done.is_set() and not len(ts):
                    break

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        # The order asserted below is the ring's order on one CPU: records of two
        # CPUs interleave in reserve order, and a burst left open on the CPU this
        # thread left is taken when its gap passes, after the other CPU's later
        # records (the engine takes that as late arrivals). So the writer stays on one CPU.
        mask = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(mask)})  # this thread only (Linux: 0 is the caller)
        try:
            for _ in range(calls):
                runner.run(CAND, repeat=per_call)
        finally:
            os.sched_setaffinity(0, mask)
        done.set()
        th.join(60)
        c = dp.counters()
    assert c["candidates"] == calls * per_call
    assert c["lost"] == 0
    ts = np.concatenate(got)
    assert len(ts) == calls * per_call
    assert bool((np.diff(ts.astype(np.int64)) >= 0).all())


def test_agent_with_too_small_ring_counts_lost_in_status_and_metrics(tmp_path: Path) -> None:
    """A stopped agent with a one-page ring (--ring-pages 1) and a burst of 600
    candidates: every candidate is delivered or counted lost, status, the
    `status` table and the metrics show the same loss, the log says so; and
    --n reaches the data plane as the burst size."""
    need_xdp()
    need_root()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    port = 20000 + os.getpid() % 30000
    with Lab() as lab:
        agent = subprocess.Popen(lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(tmp_path / "s"),
                                               "--ring-pages", "1", "--n", "5", "--cap", "0",
                                               "--metrics-port", str(port)),
                                 env=env, stderr=subprocess.PIPE, text=True)
        try:
            sock = sock_path(tmp_path / "run", lab.cli_if)
            wait_ready(sock, agent)
            st = request(sock, "status")
            assert (st["ring_pages"], st["burst_n"], st["n"]) == (1, 5, 5)
            burst_while_stopped(lab, agent, 600)
            st = poll_until(lambda: request(sock, "status"),
                            lambda st: st["candidates"] == 600 and st["events"] + st["lost"] >= 600)
            assert st["candidates"] == 600
            # the ring held at most one page of records, and the last burst (cut short if a
            # sender hiccup split the bursts) may wait in the kernel's table, read from there
            assert st["lost"] >= 600 - 5 * ONE_PAGE_RECORDS - 4, st
            assert st["events"] + st["lost"] == 600, (st["events"], st["lost"])
            shown = cli(lab, env, "status")
            assert f" {st['lost']} " in shown.stdout
            assert f"{st['lost']} candidate events lost" in shown.stdout + shown.stderr
            metrics = subprocess.run(
                ["ip", "netns", "exec", lab.cli_ns, PY, "-c",
                 f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics')"
                 ".read().decode())"], capture_output=True, text=True, timeout=30).stdout
            lines = [ln for ln in metrics.splitlines() if ln.startswith("iqn_lost_events_total")]
            assert len(lines) == 1, metrics
            assert float(lines[0].split()[-1]) == st["lost"], lines
        finally:
            log = stop(agent)
    assert f"candidate events lost (total {st['lost']})" in log
