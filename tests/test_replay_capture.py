"""`iqn-ctl replay CAPTURE` end to end, as a user runs it (a subprocess).

The capture holds what a router between OTT servers and clients would see: a
synthetic IQN signal on one flow, bulk video just outside the size band on
another, and non-candidate noise; the replay must find exactly the stalls that
were signalled, on the right flow.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import need, need_root

from iqn_ctl.capture.pcap import read_candidates
from iqn_ctl.capture.pcapwrite import SignalFlow, router_traffic, write_pcap, write_pcapng
from iqn_ctl.engine.params import SignalParams
from iqn_ctl.engine.synth import SignalModel, random_stalls, signal_times
from iqn_lab.testbed import Testbed as Lab

T0 = 1_700_000_000.0
FLOW = "198.18.0.10:443>198.18.1.2:50000"
PRM = SignalParams()  # what the replay assumes by default: p = 0.2 s, n = 4
P = PRM.p
#: the synthetic path: a fixed delay plus up to JITTER per packet
MODEL = SignalModel(PRM, delay=0.02, jitter=0.004)


def _capture(path: Path, fmt: str, rng_seed: int = 3) -> list[tuple[float, float]]:
    rng = np.random.default_rng(rng_seed)
    # long enough for at least two bursts each, so every stall is detectable
    stalls = random_stalls(6, rng, t0=T0, min_len=1.0, max_len=5.0, min_gap=3.0, max_gap=8.0)
    signal = SignalFlow("198.18.0.10", "198.18.1.2", 50000, stalls)
    end = stalls[-1][1] + 5
    pk = router_traffic([signal], 20000, T0, end, rng, MODEL)
    if fmt == "pcap":
        write_pcap(path, pk)
    else:
        write_pcapng(path, pk, big_endian=True)
    return stalls


def _run(cli: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("estimator", ["count", "paper"])
def test_replay_finds_exactly_the_signalled_stalls(
    tmp_path: Path, cli_python: list[str], fmt: str, estimator: str
) -> None:
    path = tmp_path / f"cap.{fmt}"
    truth = _capture(path, fmt)
    res = _run(cli_python, "replay", str(path), "--json", "--estimator", estimator)
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(got) == len(truth)
    # The agent signals on screenshots p apart, the first in (start, start + p),
    # skipped half the time, the last in (end - p, end); each burst is n toggles
    # `spacing` apart, and the path adds DELAY plus up to JITTER to each.
    delay, jit, lag = MODEL.delay, MODEL.jitter, (PRM.n - 1) * MODEL.spacing
    for i, (rec, (start, end)) in enumerate(zip(got, truth, strict=True)):
        assert rec["flow"] == FLOW and rec["client"] == "198.18.1.2"
        d_start, d_dur = rec["start"] - start, rec["duration"] - (end - start)
        if estimator == "count":
            # start: the first arrival less p; duration from the signal count,
            # within 1.5p (the bound tests/test_tracker.py checks)
            assert -P + delay <= d_start <= P + delay + jit, (i, rec, start)
            assert abs(d_dur) < 1.5 * P, (i, rec, start, end)
        else:
            # The paper's edges are arrivals: the first burst's n-th packet (up to
            # 2p late) and the last burst's (up to p early), so it underestimates by
            # at most 3p (0.6 s; test_tracker's ..._underestimates_by_at_most_3p),
            # and never overestimates, but for jitter. The capture ends with the
            # last stall open: no arrival closes it, so it ends w_end + p after
            # its last arrival, as the paper's polling would have given up.
            open_end = PRM.w_end + P if i == len(truth) - 1 else 0.0
            assert delay + lag <= d_start <= 2 * P + delay + lag + jit, (i, rec, start)
            assert -3 * P - jit < d_dur - open_end < jit, (i, rec, start, end)
        assert rec["end"] - rec["start"] == pytest.approx(rec["duration"])


def test_replay_human_output_and_filter_flags(tmp_path: Path, cli_python: list[str]) -> None:
    path = tmp_path / "cap.pcap"
    truth = _capture(path, "pcap", rng_seed=5)
    res = _run(cli_python, "replay", str(path))
    assert res.returncode == 0, res.stderr
    assert FLOW in res.stdout and f"{len(truth)} stall(s)" in res.stdout
    # The signal lives on port 443 within 1,180-1,288 bytes. Other filters miss it
    # and instead see (random, dense) in-band port-8443 noise, or the bulk flow's
    # 1,292-byte frames as one long "stall": the flags really change the filter.
    cases = {
        ("--port", "8444"): set(),
        ("--port", "8443"): {"198.18.0.30:8443>198.18.1.4:50012"},
        ("--min-size", "1289", "--max-size", "1300"): {"198.18.0.20:443>198.18.1.3:50010"},
    }
    for flags, flows in cases.items():
        res = _run(cli_python, "replay", str(path), "--json", *flags)
        assert res.returncode == 0, res.stderr
        assert {json.loads(line)["flow"] for line in res.stdout.splitlines()} == flows, flags


def _assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iqn-ctl: error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_damaged_captures_give_one_line_and_exit_2(tmp_path: Path, cli_python: list[str]) -> None:
    path = tmp_path / "cap.pcap"
    _capture(path, "pcap")
    data = path.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) - 700])
    _assert_one_line_error(
        _run(cli_python, "replay", str(cut)), str(cut), "truncated record at byte", "(record "
    )
    garbled = tmp_path / "garbled.pcap"
    garbled.write_bytes(b"\x00\x01\x02\x03" + data[4:])
    _assert_one_line_error(_run(cli_python, "replay", str(garbled)), "not a pcap or pcapng capture")
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    _assert_one_line_error(_run(cli_python, "replay", str(empty)), "empty file")
    sll = tmp_path / "sll.pcap"
    write_pcap(sll, [(T0, bytes(60))], linktype=105)
    _assert_one_line_error(_run(cli_python, "replay", str(sll)), "link type 105")


def _await_stderr(proc: subprocess.Popen[bytes], needle: bytes, timeout: float = 30.0) -> None:
    """Read ``proc``'s stderr until ``needle``: the tool's own word that it is capturing."""
    assert proc.stderr is not None
    fd, seen = proc.stderr.fileno(), b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{proc.args!r}: no {needle!r} in {timeout} s; stderr {seen!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"{proc.args!r} closed stderr (exit {proc.poll()}) before {needle!r}: {seen!r}"
            seen += chunk


def test_replay_of_real_tcpdump_and_dumpcap_captures(tmp_path: Path, cli_python: list[str]) -> None:
    """Real packets on a real veth, captured by the real tools (tcpdump writes
    pcap, dumpcap pcapng with its own interface options): the replay must see
    every candidate the sender sent, at the time it was sent, and the stalls."""
    need_root()
    need(bool(shutil.which("tcpdump") and shutil.which("dumpcap")), "tcpdump and dumpcap (setup.sh)")
    rng = np.random.default_rng(1)
    # offsets from the sender's start; the bulk flow ends first, so the last
    # packet sent is a candidate and the tools' exit closely bounds its time
    stall4, stall6 = (0.0, 1.6), (0.3, 1.2)
    times = {
        "v4": signal_times([stall4], rng=rng),
        "v6": signal_times([stall6], rng=rng),
        "bulk": np.arange(0.0, 1.5, 1 / 300),
    }
    frames = sum(t.size for t in times.values())
    with Lab() as lab:
        pcap, pcapng = tmp_path / "td.pcap", tmp_path / "dc.pcapng"
        # Only the sender's packets (its bulk flow stays in as noise), so that
        # each tool stops by itself, flushed, once it has seen every one of them.
        only, count = "udp src port 443", str(frames)
        procs = [
            subprocess.Popen(["ip", "netns", "exec", lab.cli_ns, "tcpdump", "-Z", "root", "-i", lab.cli_if,
                              "-s", "0", "-U", "--immediate-mode", "-c", count, "-w", str(pcap), only],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
            subprocess.Popen(["ip", "netns", "exec", lab.cli_ns, "dumpcap", "-q", "-i", lab.cli_if,
                              "-f", only, "-c", count, "-w", str(pcapng)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
        ]
        try:
            # tcpdump says "listening on" once its socket is bound; dumpcap's
            # "Capturing on" comes before it opens the interface, its "File:"
            # after the interface is open and the file header written
            _await_stderr(procs[0], b"listening on ")
            _await_stderr(procs[1], b"File: ")
            spec = {"lead": 0.3, "flows": [
                {"name": "v4", "src": lab.srv4, "dst": lab.cli4, "dport": 40001, "frame": 1250,
                 "times": times["v4"].tolist()},
                {"name": "v6", "src": lab.srv6, "dst": lab.cli6, "dport": 40002, "frame": 1188,
                 "times": times["v6"].tolist()},
                {"name": "bulk", "src": lab.srv4, "dst": lab.cli4, "dport": 40003, "frame": 1292,
                 "times": times["bulk"].tolist()},
            ]}
            snd = lab.send(spec)
            out, err = snd.communicate(timeout=30)
            assert snd.returncode == 0, err
            for p in procs:
                rc = p.wait(timeout=30)
                assert rc == 0, (p.args, rc, p.stderr.read() if p.stderr else b"")
            done = time.time()
        finally:
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGINT)
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
        res_send = json.loads(out)
        t0, sent = res_send["t0"], res_send["sent"]
        labels = {
            "v4": f"{lab.srv4}:443>{lab.cli4}:40001",
            "v6": f"[{lab.srv6}]:443>[{lab.cli6}]:40002",
        }
        seen: dict[Path, dict[str, np.ndarray]] = {}
        for path in (pcap, pcapng):
            c = read_candidates(path)
            assert (c.packets, c.candidates) == (frames, times["v4"].size + times["v6"].size), path
            by_flow = {lab_: c.times[c.flow_ids == i] for i, (lab_, _) in enumerate(c.labels)}
            assert sorted(by_flow) == sorted(labels.values()), path
            for name, label in labels.items():
                got = by_flow[label]
                assert got.size == len(sent[name]) == times[name].size, (path, name)
                # Bounds from cause and effect, not from how fast anything ran: the
                # sender sleeps until a packet's time before sending it, and the tools
                # stamped every packet before they exited. Files keep microseconds.
                assert np.all(got >= t0 + times[name] - 2e-6), (path, name, got - t0 - times[name])
                assert got[-1] <= done, (path, name, got[-1] - done)
            seen[path] = by_flow
            res = _run(cli_python, "replay", str(path), "--json")
            assert res.returncode == 0, res.stderr
            stalls = {json.loads(line)["flow"]: json.loads(line) for line in res.stdout.splitlines()}
            assert sorted(stalls) == sorted(labels.values()), (path, res.stdout)
            for name, (a, b) in (("v4", stall4), ("v6", stall6)):
                rec = stalls[labels[name]]
                assert rec["client"] == (lab.cli4 if name == "v4" else lab.cli6)
                # the default estimator counts signals, so a late send cannot move it
                assert abs(rec["duration"] - (b - a)) < 1.5 * P, (path, name, rec)
        # Both tools stamp a packet in the same kernel receive pass (measured 1-2 us
        # apart), so the two readers must agree on every packet: a pcap- or
        # pcapng-only error in the time fields shows here even when it is small.
        for label in labels.values():
            assert np.abs(seen[pcap][label] - seen[pcapng][label]).max() < 0.01, label
