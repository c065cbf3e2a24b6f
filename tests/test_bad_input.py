"""Bad input to ``replay`` and ``evaluate`` (issue 10): every case ends as one
``iqn-ctl: error:`` line and exit 2, or as a readable result with a warning -
never a traceback, a hang, or memory in proportion to a file's size.

Big files are sparse (``truncate``): 2 GiB of zeros cost no disk. The CLI runs
in a child whose address space is capped (``RLIMIT_AS``), so a regression that
grows with the file's size fails here instead of eating the shared machine;
the child reports its peak resident memory for the checks that need it.
"""

from __future__ import annotations

import inspect
import json
import os
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from iqn_ctl.capture.frames import udp_frame
from iqn_ctl.capture.pcapwrite import Interface, Packet, write_pcap, write_pcapng
from iqn_ctl.engine.params import DEFAULT_MAX_FLOWS, MAX_N, SignalParams
from iqn_ctl.evaluate.replay import replay_flows

T0 = 1_700_000_000.0
GIB = 1 << 30
FRAME = udp_frame("198.18.0.10", "198.18.1.2", 443, 50000, 1200)
FLOW = "198.18.0.10:443>198.18.1.2:50000"

#: the CLI in this interpreter, in-process in a child that caps its address
#: space first and prints its exit status and peak RSS (KiB) as the last line
_CHILD = """
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from iqn_ctl.cli import app
try:
    app(sys.argv[2:], prog_name="iqn-ctl")
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
print(json.dumps({"code": code, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _env() -> dict[str, str]:
    # one BLAS thread: each extra thread reserves address space the cap would count
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def capped(args: list[str], limit: int, timeout: float = 120) -> tuple[int, str, int]:
    """(exit status, stderr, peak RSS in bytes) of ``iqn-ctl ARGS`` under an address-space cap."""
    r = subprocess.run([sys.executable, "-c", _CHILD, str(limit), *args], capture_output=True,
                       text=True, timeout=timeout, env=_env())  # fmt: skip
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert last.startswith("{"), f"child died (rc {r.returncode}): {r.stderr[-2000:]}"
    rep = json.loads(last)
    return rep["code"], r.stderr, rep["maxrss_kib"] * 1024


def cli(*args: str, timeout: float = 60, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iqn_ctl", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=_env())  # fmt: skip


def one_line_error(code: int, stderr: str, *needles: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iqn-ctl: error: "), stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("iqn-ctl: warning: ")]


def signal(t0: float = T0, count: int = 40) -> list[Packet]:
    """A burst train that infers one stall of about 2 s."""
    return [Packet(t0 + 0.05 * i, FRAME) for i in range(count)]


# --- big files -------------------------------------------------------------------


def _sparse(path: Path, head: bytes, size: int) -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


@pytest.mark.parametrize("records", [0, 1])
def test_pcap_header_then_2gib_of_zeros_fails_at_the_first_zero_record(tmp_path: Path, records: int) -> None:
    """The zeros are no records (nothing on the wire): the walk stops at the first,
    in memory bounded by the cap (mapping + 1 GiB), without a traceback."""
    one = tmp_path / "one.pcap"
    write_pcap(one, signal(count=records))
    path = _sparse(tmp_path / "zeros.pcap", one.read_bytes(), 2 * GIB)
    code, err, _rss = capped(["replay", str(path)], limit=2 * GIB + GIB)
    at = 24 + records * (16 + len(FRAME))
    one_line_error(code, err, str(path), f"byte {at} (record {records + 1})", "original length 0")


def test_2gib_of_zeros_is_refused_by_its_magic_before_it_is_mapped(tmp_path: Path) -> None:
    path = _sparse(tmp_path / "zeros.bin", b"", 2 * GIB)
    code, err, rss = capped(["replay", str(path)], limit=2 * GIB + GIB)
    one_line_error(code, err, "not a pcap or pcapng capture (magic 0x00000000 at byte 0)")
    # mapped and populated, the file alone would make the peak 2 GiB
    assert rss < 512 << 20, f"peak RSS {rss >> 20} MiB: the file was read or mapped"


# --- times no calendar holds ------------------------------------------------------


def test_times_beyond_year_9999_are_shown_as_epoch_seconds_with_a_warning(tmp_path: Path) -> None:
    ts = tmp_path / "ts.txt"
    ts.write_text("".join(f"{1e15 + 0.05 * i!r}\n" for i in range(40)))
    off = 2**40  # if_tsoffset: seconds added to every timestamp (year 36812)
    ng = tmp_path / "off.pcapng"
    write_pcapng(ng, [Packet(off + 0.05 * i, FRAME) for i in range(40)],
                 interfaces=(Interface(tsresol=None, tsoffset=off),))  # fmt: skip
    for path, epoch in ((ts, "1000000000000001."), (ng, f"{off + 1}.")):
        r = cli("replay", str(path))
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert any("after year 9999" in w for w in warnings(r.stderr)), r.stderr
        assert "1 stall(s)" in r.stdout and epoch in r.stdout and "s epoch" in r.stdout, r.stdout
        js = cli("replay", "--json", str(path))
        assert js.returncode == 0 and json.loads(js.stdout)["start"] > 253402300799, js.stderr


def test_negative_epochs_are_warned_about(tmp_path: Path) -> None:
    ts = tmp_path / "neg.txt"
    ts.write_text("".join(f"{-1000 + 0.05 * i!r}\n" for i in range(40)))
    r = cli("replay", str(ts))
    assert r.returncode == 0 and "1 stall(s)" in r.stdout, r.stderr
    assert [w for w in warnings(r.stderr) if "40 before 1970 of 40" in w], r.stderr
    assert "1969-12-31 23:43:19" in r.stdout


# --- evaluate's JSON ----------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        '{"start": 1' + "0" * 400 + ', "end": 2}',  # an int no float holds: OverflowError
        '{"start": 1, "end": ' + "[" * 100_000 + "]" * 100_000 + "}",  # RecursionError
        "[" * 100_000,
        '{"start": ' + "9" * 5000 + ', "end": 1}',  # past int_max_str_digits
    ],
    ids=["huge-int", "deep-list", "deep-unclosed", "long-int"],
)
def test_evaluate_rejects_absurd_json_in_one_line(tmp_path: Path, line: str) -> None:
    truth = tmp_path / "Real_stalls.txt"
    truth.write_text(f"S-{T0!r}\nE-{T0 + 1!r}\n")
    inferred = tmp_path / "inferred.json"
    inferred.write_text(line + "\n")
    r = cli("evaluate", "--truth", str(truth), str(inferred))
    one_line_error(r.returncode, r.stderr, f"{inferred}:1: expected a JSON stall")
    r = cli("evaluate", "--truth", str(truth), "-", stdin=line + "\n")
    one_line_error(r.returncode, r.stderr, "<stdin>:1: expected a JSON stall")


# --- numeric flags -----------------------------------------------------------------

HUGE = "99999999999999999999"


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--n", HUGE, f"--n must be in 1..{MAX_N}"),
        ("--n", str(MAX_N + 1), f"--n must be in 1..{MAX_N}"),
        ("--n", "-" + HUGE, "--n must be in"),
        ("--p", "1e400", "--p must be"),
        ("--p", "nan", "--p must be"),
        ("--port", HUGE, "--port must be in 1..65535"),
        ("--min-size", HUGE, "larger than --max-size"),
        ("--max-size", HUGE, "sizes must lie in"),
        ("--min-size", "-" + HUGE, "sizes must lie in"),
    ],
)
def test_every_numeric_flag_of_replay_is_bounded(tmp_path: Path, flag: str, value: str, needle: str) -> None:
    path = tmp_path / "c.pcap"
    write_pcap(path, signal())
    r = cli("replay", f"{flag}={value}", str(path))
    one_line_error(r.returncode, r.stderr, needle)


def test_the_largest_n_still_runs(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    write_pcap(path, signal())
    r = cli("replay", f"--n={MAX_N}", str(path))
    assert r.returncode == 0 and "no stalls inferred" in r.stdout, r.stderr


# --- FIFOs ---------------------------------------------------------------------------


def test_fifos_are_refused_not_waited_on(tmp_path: Path) -> None:
    """Nobody writes to the FIFO: opening it for reading would block forever."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    ok = tmp_path / "inferred.json"
    ok.write_text(json.dumps({"start": T0, "end": T0 + 1}) + "\n")
    truth = tmp_path / "Real_stalls.txt"
    truth.write_text(f"S-{T0!r}\nE-{T0 + 1!r}\n")
    for args in (
        ["replay", str(fifo)],
        ["evaluate", "--truth", str(fifo), str(ok)],
        ["evaluate", "--truth", str(truth), str(fifo)],
        ["evaluate", "--truth", str(truth), str(ok), "--plot", str(tmp_path / "p.png"),
         "--candidates", str(fifo)],
    ):  # fmt: skip
        try:
            r = cli(*args, timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"iqn-ctl {' '.join(args)} waited on the FIFO")
        one_line_error(r.returncode, r.stderr, str(fifo), "not a regular file")


def test_capture_reader_refuses_a_fifo_without_opening_it(tmp_path: Path) -> None:
    from iqn_ctl.capture.pcap import CaptureError, read_candidates

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CaptureError, match="not a regular file"):
        read_candidates(fifo)  # a hang here is the regression (pytest's run would never end)


# --- what is wrong with a text file -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("1700000000.1\nnan\n", ":2: time is not finite: 'nan'"),
        ("nan\n1700000000.1\n", ":1: time is not finite: 'nan'"),
        ("1700000000.1\n-inf\n", ":2: time is not finite"),
        ("1700000000.1\nhello\n", ":2: expected an epoch time in seconds, got 'hello'"),
        ("# arrivals\n1700000000.1\n", ":1: expected an epoch time in seconds, got '# arrivals'"),
    ],
)
def test_a_bad_timestamp_file_is_told_what_is_wrong(tmp_path: Path, text: str, needle: str) -> None:
    ts = tmp_path / "timestamps.txt"
    ts.write_text(text)
    r = cli("replay", str(ts))
    line = one_line_error(r.returncode, r.stderr, f"{ts}{needle}")
    assert "pcap" not in line


# --- accepted, but said ---------------------------------------------------------------


def test_pcap_fraction_of_a_whole_second_or_more_is_warned(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    write_pcap(path, signal())
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 24 + 4, 1_500_000)  # first record: 1.5 s in microseconds
    path.write_bytes(bytes(data))
    r = cli("replay", str(path))
    assert r.returncode == 0 and "1 stall(s)" in r.stdout, r.stderr
    assert [w for w in warnings(r.stderr) if "1 record(s) have a timestamp fraction" in w
            and "1500000 us in record 1 at byte 24" in w], r.stderr  # fmt: skip


def test_a_time_resolution_of_2_to_the_minus_63_is_warned(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    write_pcapng(path, [Packet(0.04 * i, FRAME) for i in range(40)],
                 interfaces=(Interface(tsresol=0x80 | 63),))  # fmt: skip
    r = cli("replay", str(path))
    assert r.returncode == 0 and "1 stall(s)" in r.stdout, r.stderr
    assert [w for w in warnings(r.stderr) if "if_tsresol of 9.22e+18" in w], r.stderr
    # the ordinary resolutions say nothing
    ok = tmp_path / "ok.pcapng"
    write_pcapng(ok, signal(), interfaces=(Interface(tsresol=9),))
    r = cli("replay", str(ok))
    assert r.returncode == 0 and not warnings(r.stderr), r.stderr


def test_undecodable_capture_is_warned_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "junk.pcap"
    write_pcap(path, [Packet(T0 + 0.01 * i, bytes(60)) for i in range(1000)])
    r = cli("replay", str(path))
    assert r.returncode == 0 and "no stalls inferred" in r.stdout, r.stderr
    assert f"iqn-ctl: {path}: 1000 packet(s) read, 0 decoded, 0 candidate(s) in 0 flow(s)" in r.stderr
    assert [w for w in warnings(r.stderr) if "1000 of 1000 packet(s) could not be decoded" in w], r.stderr
    # a good capture: counted, no warning
    good = tmp_path / "good.pcap"
    write_pcap(good, signal() + [Packet(T0 + 10, bytes(60))])
    r = cli("replay", str(good))
    assert r.returncode == 0 and not warnings(r.stderr), r.stderr
    assert f"{good}: 41 packet(s) read, 40 decoded, 40 candidate(s) in 1 flow(s)" in r.stderr


# --- replay's flow table ---------------------------------------------------------------


def test_replay_keeps_a_bounded_number_of_flows() -> None:
    """One-packet flows (a tracker is ~1.3 KB; 300,000 of them kept 415 MB) stay
    within the table's bound (the live agent's by default; smaller here, so the
    test is quick): memory follows the bound, not the number of flows."""
    flows, bound = 10_000, 100
    ids = np.arange(flows, dtype=np.int64)
    times = T0 + ids * 1e-3
    labels = [(f"f{i}", f"c{i}") for i in range(flows)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = replay_flows(ids, times, labels, SignalParams(), "count", max_flows=bound)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert out == []
    # unbounded, the 10,000 trackers alone take ~13 MB
    assert peak < 4 << 20, f"replay of {flows} one-packet flows peaked at {peak / 2**20:.1f} MiB"
    assert inspect.signature(replay_flows).parameters["max_flows"].default == DEFAULT_MAX_FLOWS


def test_a_bounded_replay_infers_what_an_unbounded_one_does() -> None:
    rng = np.random.default_rng(3)
    ids, ts = [], []
    for f in range(6):  # six flows, each with stalls, interleaved in time
        for k in range(3):
            start = T0 + 30 * k + rng.uniform(0, 5)
            for b in range(int(rng.integers(4, 12))):
                for j in range(4):
                    ids.append(f)
                    ts.append(start + 0.2 * b + 0.01 * j)
    fid, t = np.asarray(ids, np.int64), np.asarray(ts)
    labels = [(f"f{i}", f"c{i}") for i in range(6)]
    full = replay_flows(fid, t, labels, SignalParams(), "count")
    assert len(full) >= 12
    assert replay_flows(fid, t, labels, SignalParams(), "count", max_flows=1) == full
