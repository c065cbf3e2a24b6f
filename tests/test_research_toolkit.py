"""The researcher's toolkit: `evaluate` over many runs (pooled = the sum of
the runs), the `--pairs` export against the summary, `--significant` /
`--tolerance`, `synth` round-tripping its parameters through replay and
evaluate, and a small `sweep`.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iqn_ctl.evaluate.research import pair_rows
from iqn_ctl.evaluate.scoring import pool, score
from iqn_ctl.evaluate.traces import Stall, read_real_stalls, read_stall_lines

T0 = 1_700_000_000.0
EXE = str(Path(sys.executable).with_name("iqn-ctl"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120)


def write_case(
    d: Path, real: list[tuple[float, float]], inferred: list[tuple[float, float]]
) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    truth, inf = d / "Real_stalls.txt", d / "inferred.json"
    truth.write_text("".join(f"S-{T0 + a!r}\nE-{T0 + b!r}\n" for a, b in real))
    inf.write_text("".join(json.dumps({"start": T0 + a, "end": T0 + b}) + "\n" for a, b in inferred))
    return truth, inf


# a hand-scored pair of runs (offsets from T0):
# run A: R 100-102 / I 100.5-102.4 matched (error -0.1); I 125-126 matches nothing: FP
# run B: R 10-13 / I 9.2-12 matched (error -0.2, start 0.8 s early); R 20-20.3 too short, unmatched
RUN_A = ([(100.0, 102.0)], [(100.5, 102.4), (125.0, 126.0)])
RUN_B = ([(10.0, 13.0), (20.0, 20.3)], [(9.2, 12.0)])


intervals = st.lists(
    st.tuples(st.floats(0, 200), st.floats(0.01, 5)).map(lambda t: (T0 + t[0], T0 + t[0] + t[1])),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(intervals, intervals), min_size=1, max_size=5))
def test_pooled_is_sum_of_runs(
    runs: list[tuple[list[tuple[float, float]], list[tuple[float, float]]]],
) -> None:
    scores = [score([Stall(*r) for r in real], [Stall(*i) for i in inf]) for real, inf in runs]
    pooled = pool(scores)
    for k in ("real", "significant", "inferred", "matched", "false_positives"):
        assert getattr(pooled, k) == sum(getattr(s, k) for s in scores), k
    assert pooled.matched == len(pooled.pairs)
    errs = [abs(p.error) for s in scores for p in s.pairs]
    if errs:
        assert pooled.mae == pytest.approx(sum(errs) / len(errs))
    rows = pair_rows([(str(i), s) for i, s in enumerate(scores)])
    assert sum(r["kind"] == "matched" for r in rows) == pooled.matched
    assert sum(r["kind"] == "false_positive" for r in rows) == pooled.false_positives


def test_many_runs_cli_pooled_and_pairs(tmp_path: Path) -> None:
    ta, ia = write_case(tmp_path / "a", *RUN_A)
    tb, ib = write_case(tmp_path / "b", *RUN_B)
    pairs_csv, pairs_jsonl = tmp_path / "pairs.csv", tmp_path / "pairs.jsonl"
    r = run(
        "evaluate",
        "--truth",
        str(ta),
        "--truth",
        str(tb),
        str(ia),
        str(ib),
        "--json",
        "--pairs",
        str(pairs_csv),
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    per = {x["run"]: x for x in got["runs"]}
    assert [per[str(ia)]["matched"], per[str(ib)]["matched"]] == [1, 1]
    pooled = got["pooled"]
    for k in ("real", "significant", "inferred", "matched", "false_positives"):
        assert pooled[k] == per[str(ia)][k] + per[str(ib)][k], k
    assert pooled == pytest.approx(
        {
            **pooled,
            "real": 3,
            "significant": 2,
            "inferred": 3,
            "matched": 2,
            "false_positives": 1,
            "mae_ms": 150.0,
        }
    )
    # the export: one row per pair and per FP, agreeing with the summary
    with open(pairs_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    matched = [x for x in rows if x["kind"] == "matched"]
    fps = [x for x in rows if x["kind"] == "false_positive"]
    assert (len(matched), len(fps)) == (pooled["matched"], pooled["false_positives"])
    mae = 1000 * np.mean([abs(float(x["error"])) for x in matched])
    assert mae == pytest.approx(pooled["mae_ms"])
    for x in matched:
        assert float(x["error"]) == pytest.approx(float(x["inferred_duration"]) - float(x["real_duration"]))
    assert fps[0]["real_start"] == "" and float(fps[0]["inferred_start"]) == pytest.approx(T0 + 125.0)
    r = run("evaluate", "--truth", str(ta), "--truth", str(tb), str(ia), str(ib), "--pairs", str(pairs_jsonl))
    assert r.returncode == 0, r.stderr
    assert "pooled" in r.stdout and "150.0 ms" in r.stdout
    recs = [json.loads(x) for x in pairs_jsonl.read_text().splitlines()]
    assert [(x["run"], x["kind"]) for x in recs] == [(x["run"], x["kind"]) for x in rows]


def test_single_pair_json_unchanged_and_overrides(tmp_path: Path) -> None:
    tb, ib = write_case(tmp_path / "b", *RUN_B)
    r = run("evaluate", "--truth", str(tb), str(ib), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert list(got) == [
        "real",
        "significant",
        "inferred",
        "matched",
        "false_positives",
        "precision",
        "recall",
        "mae_ms",
        "rmse_ms",
    ]
    assert (got["significant"], got["matched"]) == (1, 1)
    # the match starts 0.8 s early: out of reach with --tolerance 0.5
    got = json.loads(run("evaluate", "--truth", str(tb), str(ib), "--json", "--tolerance", "0.5").stdout)
    assert (got["matched"], got["false_positives"]) == (0, 1)
    # the 0.3 s stall becomes significant with --significant 0.3
    got = json.loads(run("evaluate", "--truth", str(tb), str(ib), "--json", "--significant", "0.3").stdout)
    assert (got["significant"], got["matched"]) == (2, 1)
    r = run("evaluate", "--truth", str(tb), "--truth", str(tb), str(ib))
    assert r.returncode == 2 and r.stderr.startswith("iqn-ctl: error: ") and r.stderr.count("\n") == 1


def test_synth_round_trip(tmp_path: Path) -> None:
    durations = [0.6, 1.0, 2.5, 4.0, 7.5, 12.0] * 3
    params = tmp_path / "params.toml"
    params.write_text(f"durations = {durations}\np = 0.25\nn = 3\ndelay = 0.05\nseed = 7\n")
    out = tmp_path / "run"
    r = run("synth", str(out), "--params", str(params), "--jitter", "0.01", "--pcap", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stalls"] == len(durations)
    saved = json.loads((out / "params.json").read_text())
    assert (saved["p"], saved["n"], saved["jitter"], saved["durations"]) == (0.25, 3, 0.01, durations)
    real = read_real_stalls(out / "Real_stalls.txt")
    assert [s.duration for s in real] == pytest.approx(durations, abs=1e-6)
    clicks = (out / "Detected_clicks_0.25.txt").read_text().split()
    assert clicks and all(c.startswith("S-") for c in clicks)
    # the generated signal has the asked-for n (toggles per signal, no loss) and p (screenshot period)
    cands = (out / "timestamp_of_candidate.txt").read_text().split()
    assert len(cands) == 3 * len(clicks)
    gaps = np.diff([float(c[2:]) for c in clicks])
    assert float(np.median(gaps)) == pytest.approx(0.25, abs=1e-6)
    # replay (both sources) with the generated p and n, then evaluate: durations track
    inferred = {}
    for src in ("timestamp_of_candidate.txt", "candidates.pcap"):
        rep = run("replay", str(out / src), "--p", "0.25", "--n", "3", "--json")
        assert rep.returncode == 0, rep.stderr
        inferred[src] = read_stall_lines(rep.stdout.splitlines())
    assert [t for s in inferred["candidates.pcap"] for t in (s.start, s.end)] == pytest.approx(
        [t for s in inferred["timestamp_of_candidate.txt"] for t in (s.start, s.end)], abs=1e-5
    )
    sc = score(real, inferred["timestamp_of_candidate.txt"])
    assert (sc.matched, sc.false_positives) == (len(durations), 0)
    assert all(abs(p.error) < 2 * 0.25 for p in sc.pairs), [p.error for p in sc.pairs]
    assert sc.mae < 0.25
    # a clock offset shifts the candidates only: starts move by it, durations do not
    r = run("synth", str(tmp_path / "off"), "--params", str(params), "--jitter", "0.01", "--offset", "30")
    assert r.returncode == 0, r.stderr
    rep = run(
        "replay", str(tmp_path / "off" / "timestamp_of_candidate.txt"), "--p", "0.25", "--n", "3", "--json"
    )
    shifted = read_stall_lines(rep.stdout.splitlines())
    base = inferred["timestamp_of_candidate.txt"]
    assert [s.start - b.start for s, b in zip(shifted, base, strict=True)] == pytest.approx(
        [30.0] * len(base)
    )
    assert score(real, shifted).matched == 0


def test_synth_bad_params_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text('{"jitterr": 1}')
    for args in (
        ["--params", str(bad)],
        ["--loss", "1.5"],
        ["--jitter-dist", "pareto"],
        ["--durations", "1,x"],
    ):
        r = run("synth", str(tmp_path / "o"), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("iqn-ctl: error: ") and r.stderr.count("\n") == 1, r.stderr


def test_sweep_table_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    r = run(
        "sweep",
        "--out",
        str(out),
        "--plot",
        str(png),
        "--p",
        "0.2",
        "--n",
        "2,4",
        "--jitter",
        "0,0.5",
        "--loss",
        "0",
        "--stalls",
        "15",
    )
    assert r.returncode == 0, r.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 * 2 * 2 * 1 * 2
    assert {x["estimator"] for x in rows} == {"count", "paper"}
    assert {(x["n"], x["jitter"]) for x in rows} == {("2", "0.0"), ("4", "0.0"), ("2", "0.5"), ("4", "0.5")}
    assert all(int(x["significant"]) == 15 for x in rows)
    clean = [x for x in rows if x["jitter"] == "0.0"]
    # on a clean path every stall is found and the count estimator beats the paper's
    assert all(int(x["matched"]) == 15 for x in clean)
    by = {(x["n"], x["estimator"]): float(x["mae_ms"]) for x in clean}
    assert by[("4", "count")] < by[("4", "paper")]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
