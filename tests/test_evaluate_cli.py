"""`iqn-ctl evaluate` as a user runs it: the scoring table and JSON, stdin,
the figure, and one-line errors for bad input.

The small case below is scored by hand from docs/contracts.md's rules, so the expected
numbers come from the rules, not from a previous run.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from iqn_ctl.evaluate.plots import C_MATCHED, C_MISSED, C_REAL, plot_evaluation
from iqn_ctl.evaluate.scoring import score
from iqn_ctl.evaluate.traces import Stall

T0 = 1_700_000_000.0

# real stalls (offsets from T0)          inferred stalls
#   R1 100.0-102.0 (2 s)                   I1 100.5-102.4  matches R1: error -0.1 s
#   R2 110.0-110.3 (0.3 s, too short)      I2 110.2-110.6  matches R2, not scored, not a FP
#   R3 120.0-121.0 (1 s)                   I5 121.5-122.0  starts 1.5 s late: FP, R3 missed
#   R4 130.0-133.0 (3 s)                   I4 129.2-132.0  matches R4: error -0.2 s
#                                          I3 125.0-126.0  matches nothing: FP
REAL = [(100.0, 102.0), (110.0, 110.3), (120.0, 121.0), (130.0, 133.0)]
INFERRED = [(100.5, 102.4), (110.2, 110.6), (125.0, 126.0), (129.2, 132.0), (121.5, 122.0)]
EXPECTED = {
    "real": 4,
    "significant": 3,
    "inferred": 5,
    "matched": 2,
    "false_positives": 2,
    "precision": 3 / 5,
    "recall": 2 / 3,
    "mae_ms": 150.0,
    "rmse_ms": 1000 * math.sqrt((0.1**2 + 0.2**2) / 2),
}


@pytest.fixture
def iqn_ctl() -> list[str]:
    """The installed console script: what users run (``python -m iqn_ctl.cli``
    would load cli.py twice, as __main__ and as iqn_ctl.cli)."""
    exe = Path(sys.executable).with_name("iqn-ctl")
    assert exe.exists(), f"{exe} missing: run scripts/setup.sh"
    return [str(exe)]


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, Path]:
    truth = tmp_path / "Real_stalls.txt"
    truth.write_text("".join(f"S-{T0 + a!r}\nE-{T0 + b!r}\n" for a, b in REAL))
    inferred = tmp_path / "inferred.json"
    rec = [{"flow": "trace", "client": "trace", "start": T0 + a, "end": T0 + b, "duration": b - a}
           for a, b in INFERRED]
    inferred.write_text("".join(json.dumps(x) + "\n" for x in rec))
    return truth, inferred


def run(cmd: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)


def test_json_fields(iqn_ctl: list[str], case: tuple[Path, Path]) -> None:
    truth, inferred = case
    r = run([*iqn_ctl, "evaluate", "--truth", str(truth), "--json", str(inferred)])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert set(EXPECTED) <= set(got)
    for k, v in EXPECTED.items():
        assert got[k] == pytest.approx(v, abs=1e-3), k


def test_table_from_stdin(iqn_ctl: list[str], case: tuple[Path, Path]) -> None:
    truth, inferred = case
    r = run([*iqn_ctl, "evaluate", "--truth", str(truth), "-"], stdin=inferred.read_text())
    assert r.returncode == 0, r.stderr
    rows = dict(line.rsplit("  ", 1) for line in r.stdout.splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["real stalls"] == "4"
    assert rows["significant (>= 0.4 s)"] == "3"
    assert rows["inferred stalls"] == "5"
    assert rows["significant matched"] == "2"
    assert rows["false positives"] == "2"
    assert rows["precision"] == "0.600"
    assert rows["recall"] == "0.667"
    assert rows["MAE"] == "150.0 ms"
    assert rows["RMSE"] == f"{EXPECTED['rmse_ms']:.1f} ms"


def test_nothing_inferred(iqn_ctl: list[str], case: tuple[Path, Path]) -> None:
    truth, _ = case
    r = run([*iqn_ctl, "evaluate", "--truth", str(truth), "--json", "-"], stdin="")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["matched"], got["false_positives"], got["recall"]) == (0, 0, 0.0)
    assert got["mae_ms"] is None and got["rmse_ms"] is None and got["precision"] is None


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iqn-ctl: error: "), r.stderr
    for n in needles:
        assert n in lines[0]


@pytest.mark.parametrize(
    "content,needle",
    [
        ("S-1700000100.0\nE-1700000102.0\nS-1700000110.0\nE-", ":4:"),  # truncated mid-line
        ("S-1700000100.0\nE-17000", ":2:"),  # truncated number: ends before it starts
        ("S-1700000100.0\nX-1700000102.0\n", ":2:"),  # garbled tag
        ("S-1700000100.0\nE-17000abc\n", ":2:"),  # garbled number
        ("S-1700000100.0\nS-1700000102.0\n", ":2:"),  # two starts
        ("E-1700000100.0\n", ":1:"),  # end without start
        ("\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a text file"),  # binary
    ],
)
def test_bad_truth_file(iqn_ctl: list[str], case: tuple[Path, Path], content: str, needle: str) -> None:
    truth, inferred = case
    truth.write_bytes(content.encode("latin-1"))
    r = run([*iqn_ctl, "evaluate", "--truth", str(truth), str(inferred)])
    assert_one_line_error(r, str(truth), needle)


def test_missing_inputs(iqn_ctl: list[str], case: tuple[Path, Path], tmp_path: Path) -> None:
    truth, inferred = case
    missing = tmp_path / "nope.txt"
    assert_one_line_error(run([*iqn_ctl, "evaluate", "--truth", str(missing), str(inferred)]), "nope.txt")
    assert_one_line_error(run([*iqn_ctl, "evaluate", "--truth", str(truth), str(missing)]), "nope.txt")
    assert_one_line_error(run([*iqn_ctl, "evaluate", "--truth", str(tmp_path), str(inferred)]))
    # inferred stalls that are not replay's JSON
    assert_one_line_error(
        run([*iqn_ctl, "evaluate", "--truth", str(truth), "-"], stdin='{"start": 1}\n'), "<stdin>:1"
    )


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    w, h = struct.unpack(">II", head[16:24])
    return w, h


def pixels(path: Path, hex_colour: str) -> int:
    """Pixels of this colour: a legend patch has a few hundred, bars thousands."""
    from matplotlib.image import imread

    img = imread(str(path))[..., :3]
    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(axis=-1) < 0.02).sum())


def test_plot_of_a_paper_trace(iqn_ctl: list[str], tmp_path: Path) -> None:
    d = DATA / "news"
    replay = run([*iqn_ctl, "replay", str(d / "timestamp_of_candidate.txt"), "--json"])
    assert replay.returncode == 0, replay.stderr
    png = tmp_path / "news.png"
    r = run(
        [*iqn_ctl, "evaluate", "--truth", str(d / "Real_stalls.txt"), "-", "--plot", str(png),
         "--candidates", str(d / "timestamp_of_candidate.txt")],
        stdin=replay.stdout,
    )
    assert r.returncode == 0, r.stderr
    assert f"plot written to {png}" in r.stdout
    w, h = png_size(png)
    assert 1000 <= w <= 3000 and 700 <= h <= 2500
    assert 30_000 < png.stat().st_size < 2_000_000
    # the bars are drawn: actual stalls and matched inferred stalls both appear
    assert pixels(png, C_REAL) > 5000 and pixels(png, C_MATCHED) > 5000


def test_plot_errors_are_one_line(iqn_ctl: list[str], case: tuple[Path, Path], tmp_path: Path) -> None:
    truth, inferred = case
    base = [*iqn_ctl, "evaluate", "--truth", str(truth), str(inferred), "--plot"]
    assert_one_line_error(run([*base, str(tmp_path / "no" / "dir.png")]), "cannot write")
    assert_one_line_error(run([*base, str(tmp_path / "fig.xyz")]), "format")
    bad = tmp_path / "cand.txt"
    bad.write_text("1700000100.0\nnot-a-time\n")
    assert_one_line_error(run([*base, str(tmp_path / "ok.png"), "--candidates", str(bad)]), "cand.txt:2")


def test_plot_with_nothing_to_match(tmp_path: Path) -> None:
    # no inferred stalls at all: the timeline and empty CDF panels still render
    real = [Stall(T0 + a, T0 + b) for a, b in REAL]
    png = tmp_path / "empty.png"
    plot_evaluation(score(real, []), real, [], png)
    assert png_size(png)[0] >= 1000
    assert pixels(png, C_MATCHED) < 1000  # the legend's patch only
    assert pixels(png, C_MISSED) > 500  # three missed stalls, hatched outlines
