"""The move back to XDP (issue 20 follow-up): with ``--hook auto`` beside a
foreign XDP program the agent runs at TC ingress; once that program is gone
the attach watchdog attaches XDP first and then removes the TC classifier.
While both are attached a frame passes both entries; the kernel's handover
flag (iqn_xdp.c) makes iqn_tc skip every frame once the XDP entry has run, so
the overlap counts no candidate twice. Only the move entry (iqn_xdp_move,
attached under the name iqn_xdp) reads the flag; once TC is gone it is
swapped for iqn_xdp, which does not (the steady state's per-frame cost,
bench_xdp.py). Real veths, real traffic: the overlap is held open while
candidates flow (and, as the control, the same overlap with the flag off
counts every one twice); the agent moves within its watchdog period while
candidates keep coming, none lost, none counted twice; an agent on an
explicit ``--hook tc`` never moves."""

from __future__ import annotations

import json
import os
import random
import subprocess
import textwrap
from pathlib import Path
from typing import Any

from test_agent_live import cli, need_xdp, poll_until, settled, stop, wait_ready
from test_hooks_live import _tc_names  # IQN's (and other_*) classifiers at the client veth's TC ingress

from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import PY
from iqn_lab.testbed import Testbed as Bed

# Holds the move half-done (XDP and TC both attached) while the test sends.
# Line protocol on stdin/stdout: each command answers one JSON line.
HALVES = textwrap.dedent("""
    import json, sys
    from iqn_ctl.engine.params import CandidateFilter
    from iqn_ctl.live import datapath as d
    from iqn_ctl.live.bpf_testrun import prog_id_by_fd
    dp = d.Datapath(sys.argv[1], CandidateFilter(), hook="auto")
    out = lambda **kw: print(json.dumps({**kw, **dp.counters(), "hook": dp.hook, "beside": dp.beside_foreign,
                                         "handover": dp.handover_state(), "prog_id": dp.prog_id,
                                         "plain_id": prog_id_by_fd(dp.prog_fd),
                                         "xdp": d.xdp_program_on(sys.argv[1])}), flush=True)
    dp.attach()
    out()
    mode = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "begin":
            mode = dp.begin_move_to_xdp()
        elif cmd == "off":  # the control: both attached, no handover
            dp._handover(d.HANDOVER_OFF)
        elif cmd == "foreign":  # another tool replaces the move entry (same mode) before finish
            from bcc import BPF
            other = BPF(text=b"int other_xdp(struct xdp_md *c) { return XDP_PASS; }")
            flags = d.XDP_FLAGS_DRV_MODE if mode == "native" else d.XDP_FLAGS_SKB_MODE
            BPF.attach_xdp(sys.argv[1].encode(), other.load_func(b"other_xdp", BPF.XDP), flags)
        elif cmd == "finish":
            dp.finish_move_to_xdp(mode)
        elif cmd == "quit":
            break
        for _ in range(3):
            dp.poll(20)  # drain the ring: the counters are the kernel's either way
        out(mode=mode)
    dp.close()
""")


def _candidates(bed: Bed, n: int, dport: int) -> list[float]:
    """Send ``n`` candidate datagrams (1250-byte frames from port 443) to the client; their send times."""
    times = [0.01 * i for i in range(n)]
    out, err = bed.send({"lead": 0.2, "flows": [
        {"name": "x", "src": bed.srv4, "dst": bed.cli4, "dport": dport, "frame": 1250, "times": times,
         "request": False}]}).communicate(timeout=60)
    assert out, err
    return list(json.loads(out)["sent"]["x"])


def halves_beside_foreign(bed: Bed) -> subprocess.Popen[str]:
    """A foreign XDP program on the client interface, and the HALVES driver started
    beside it (on TC) in the client's namespace, its pipes open."""
    bed.attach_foreign_xdp("other_prog")
    p = subprocess.Popen(["ip", "netns", "exec", bed.cli_ns, PY, "-c", HALVES, bed.cli_if],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None
    return p


def test_overlap_counts_each_candidate_once_and_the_control_twice() -> None:
    need_xdp()
    with Bed() as bed:
        p = halves_beside_foreign(bed)

        def say(cmd: str) -> dict[str, Any]:
            p.stdin.write(cmd + "\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
            line = p.stdout.readline()  # type: ignore[union-attr]
            assert line, p.stderr.read()  # type: ignore[union-attr]
            return dict(json.loads(line))

        try:
            st = json.loads(p.stdout.readline() or "{}")
            assert st["hook"] == "tc" and st["beside"] is True, st
            n = 40
            sent = _candidates(bed, n, 40041)
            tc_only = say("tick")
            assert tc_only["candidates"] == len(sent) == n  # on TC: each once
            bed.remove_foreign_xdp()
            begun = say("begin")
            assert begun["hook"] == "tc" and begun["mode"] in ("native", "skb"), begun
            assert bed.xdp_on_client() == "iqn_xdp" and _tc_names(bed) == ["iqn_tc"]  # both attached
            # the move entry, under the name iqn_xdp, is the one attached (not the steady-state entry)
            assert begun["xdp"] == [begun["prog_id"], "iqn_xdp"] and begun["prog_id"] != begun["plain_id"]
            sent = _candidates(bed, n, 40042)
            both = say("tick")
            assert both["handover"] == 2  # iqn_xdp ran; iqn_tc skips from then on
            assert both["candidates"] - tc_only["candidates"] == len(sent)  # once, not twice
            # the control: the same overlap with the handover off counts every candidate twice
            say("off")
            sent = _candidates(bed, n, 40043)
            naive = say("tick")
            assert naive["candidates"] - both["candidates"] == 2 * len(sent)
            assert naive["packets"] - both["packets"] >= 2 * len(sent)
            done = say("finish")
            assert done["hook"] == "xdp" and _tc_names(bed) == [] and bed.xdp_on_client() == "iqn_xdp"
            assert done["xdp"] == [done["plain_id"], "iqn_xdp"] == [done["prog_id"], "iqn_xdp"]  # swapped
            sent = _candidates(bed, n, 40044)
            after = say("tick")
            assert after["candidates"] - done["candidates"] == len(sent)
            p.stdin.write("quit\n")
            p.stdin.close()
            p.wait(timeout=30)
            assert bed.xdp_on_client() is None and _tc_names(bed) == []
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_finish_never_replaces_a_program_attached_during_the_move() -> None:
    """The swap to iqn_xdp names the program it replaces (XDP_FLAGS_REPLACE):
    if another tool put its program there during the move, the swap fails and
    that program stays; the data plane still names the move entry as its own,
    so the watchdog finds IQN's program replaced and acts as it would on any
    foreign program. Closing removes none of it."""
    need_xdp()
    with Bed() as bed:
        p = halves_beside_foreign(bed)
        try:
            assert json.loads(p.stdout.readline() or "{}")["hook"] == "tc"
            bed.remove_foreign_xdp()
            replies = []
            for cmd in ("begin", "foreign", "finish"):
                p.stdin.write(cmd + "\n")
                p.stdin.flush()
                line = p.stdout.readline()
                assert line, p.stderr.read()
                replies.append(json.loads(line))
            begun, foreign, done = replies
            assert begun["xdp"] == [begun["prog_id"], "iqn_xdp"]
            assert foreign["xdp"][1] == "other_xdp"
            assert done["hook"] == "xdp" and done["xdp"] == foreign["xdp"]  # not replaced
            assert done["prog_id"] == begun["prog_id"] != done["plain_id"]  # so the watchdog sees "replaced"
            p.stdin.write("quit\n")
            p.stdin.close()
            p.wait(timeout=30)
            assert "the move entry stays attached" in p.stderr.read()
            assert bed.xdp_on_client() == "other_xdp" and _tc_names(bed) == []
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_only_the_move_entry_reads_the_handover() -> None:
    """BPF_PROG_TEST_RUN of both XDP entries on one armed flag: iqn_xdp (the
    steady state) counts the candidate and leaves the flag alone; the move
    entry counts it the same and flips the flag; it is loaded under the name
    iqn_xdp and shares the maps (one counter)."""
    need_xdp()
    from iqn_ctl.capture.frames import udp_frame
    from iqn_ctl.engine.params import CandidateFilter
    from iqn_ctl.live import bpf_testrun
    from iqn_ctl.live import datapath as d

    frame = udp_frame("198.18.0.1", "198.18.0.2", 443, 51234, frame_len=1234)
    dp = d.Datapath("lo", CandidateFilter())  # never attached
    try:
        dp._handover(d.HANDOVER_ARMED)
        assert bpf_testrun.run(dp.prog_fd, frame)[0] == 2
        assert (dp.handover_state(), dp.counters()["candidates"]) == (d.HANDOVER_ARMED, 1)
        dp._load_move_entry()
        assert dp._move is not None
        fd, pid = dp._move
        assert bpf_testrun.prog_name_by_id(pid) == "iqn_xdp" and pid != dp.prog_id
        assert bpf_testrun.run(fd, frame)[0] == 2
        assert (dp.handover_state(), dp.counters()["candidates"]) == (d.HANDOVER_XDP, 2)
    finally:
        dp.close()
    assert dp._move is None  # closed with the data plane


def _stream(bed: Bed, seconds: float, dport: int) -> subprocess.Popen[str]:
    """Candidates every 10 ms for ``seconds`` (with the client's requests before each, for pairing)."""
    times = [0.01 * i for i in range(int(seconds * 100))]
    return bed.send({"lead": 0.3, "flows": [
        {"name": "x", "src": bed.srv4, "dst": bed.cli4, "dport": dport, "frame": 1250, "times": times}]})


def _metrics(bed: Bed, port: int) -> list[str]:
    return subprocess.run(
        ["ip", "netns", "exec", bed.cli_ns, PY, "-c",
         f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"],
        capture_output=True, text=True, timeout=30).stdout.splitlines()


def _agent(bed: Bed, tmp_path: Path, env: dict[str, str], hook: str, port: int) -> subprocess.Popen[str]:
    agent = subprocess.Popen(
        bed.agent_cmd("attach", bed.cli_if, "--hook", hook, "--watchdog", "0.2", "--state-dir",
                      str(tmp_path / "s"), "--metrics-port", str(port)),
        env=env, stderr=subprocess.PIPE, text=True)
    wait_ready(sock_path(tmp_path / "run", bed.cli_if), agent)
    return agent


def test_auto_moves_back_to_xdp_while_candidates_flow(tmp_path: Path) -> None:
    need_xdp()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    port = random.randrange(20000, 60000)
    with Bed() as bed:
        bed.attach_foreign_xdp("other_prog")
        agent = _agent(bed, tmp_path, env, "auto", port)
        sock = sock_path(tmp_path / "run", bed.cli_if)
        try:
            st = request(sock, "status")
            assert (st["hook"], st["direction"], st["moves_to_xdp"]) == ("tc", "ingress", 0), st
            assert _tc_names(bed) == ["iqn_tc"] and bed.xdp_on_client() == "other_prog"
            sender = _stream(bed, 4.0, 40051)
            before = poll_until(lambda: request(sock, "status"), lambda st: st["candidates"] >= 30)
            assert before["hook"] == "tc"
            bed.remove_foreign_xdp()
            moved = poll_until(lambda: request(sock, "status"), lambda st: st["hook"] == "xdp")
            out, err = sender.communicate(timeout=60)
            assert out, err
            sent = json.loads(out)["sent"]["x"]
            assert moved["hook"] == "xdp" and moved["moves_to_xdp"] == 1, moved
            assert before["candidates"] < moved["candidates"] < len(sent)  # moved mid-stream
            st = poll_until(lambda: request(sock, "status"), settled(len(sent)))
            # every candidate counted exactly once: none lost in the swap, none seen by both hooks
            assert st["candidates"] == len(sent) and st["lost"] == 0 and st["events"] == len(sent), st
            assert (st["hook"], st["xdp_mode"], st["attach_state"], st["reattaches"]) == (
                "xdp", moved["xdp_mode"], "attached", 0), st
            assert "moved from TC ingress to XDP" in st["attach_note"]
            assert _tc_names(bed) == [] and bed.xdp_on_client() == "iqn_xdp"
            table = cli(bed, env, "status").stdout
            assert f" xdp/{st['xdp_mode']} " in table, table
            metrics = _metrics(bed, port)
            info = [ln for ln in metrics if ln.startswith("iqn_dataplane_info{")]
            assert len(info) == 1 and 'hook="xdp"' in info[0], info
            assert f'iqn_moves_to_xdp_total{{iface="{bed.cli_if}"}} 1.0' in metrics
            assert f'iqn_attach_state{{iface="{bed.cli_if}",state="attached"}} 1.0' in metrics
        finally:
            err = stop(agent)
        lines = [ln for ln in err.splitlines() if "moved from TC ingress to XDP" in ln]
        assert len(lines) == 1 and "INFO" in lines[0], err[-3000:]


def test_explicit_tc_never_moves(tmp_path: Path) -> None:
    need_xdp()
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    with Bed() as bed:
        bed.attach_foreign_xdp("other_prog")
        agent = _agent(bed, tmp_path, env, "tc", random.randrange(20000, 60000))
        sock = sock_path(tmp_path / "run", bed.cli_if)
        try:
            bed.remove_foreign_xdp()
            sender = _stream(bed, 2.0, 40052)  # 2 s: ten watchdog periods with a free XDP hook
            out, err = sender.communicate(timeout=60)
            assert out, err
            sent = json.loads(out)["sent"]["x"]
            st = poll_until(lambda: request(sock, "status"), settled(len(sent)))
            assert (st["hook"], st["moves_to_xdp"], st["attach_state"]) == ("tc", 0, "attached"), st
            assert st["candidates"] == len(sent)
            assert _tc_names(bed) == ["iqn_tc"] and bed.xdp_on_client() is None
        finally:
            stop(agent)
