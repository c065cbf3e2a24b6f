"""Timestamp files that are not clean arrival logs, through ``iqn-ctl replay``.

Behaviour pinned here (docs/replay.md, "Timestamp files"):

- the order of distinct lines never matters: a shuffled file gives the stalls
  of the sorted one;
- a file out of time order is read as repeated dumps of one arrival log (the
  paper's agent wrote ``operational_example`` that way): exact repeats are
  dropped, with one ``iqn-ctl: warning:`` line saying how many, so a list
  dumped twice gives the stalls of the list;
- a file in time order is an arrival log: two lines with the same time are two
  packets (the paper's news and music traces have 5 such pairs and its figures
  count both), kept without a warning.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from iqn_ctl.engine.params import SignalParams
from iqn_ctl.engine.synth import SignalModel, random_stalls, signal_times
from iqn_ctl.evaluate.replay import infer_times

PRM = SignalParams(0.2, 4)


@pytest.fixture
def iqn_ctl() -> list[str]:
    """The installed console script, as users run it."""
    exe = Path(sys.executable).with_name("iqn-ctl")
    assert exe.exists(), f"{exe} missing: run scripts/setup.sh"
    return [str(exe)]


@pytest.fixture(scope="module")
def times() -> np.ndarray:
    """Candidates of 12 stalls on a jittery path, sorted, all distinct."""
    rng = np.random.default_rng(5)
    real = random_stalls(12, rng, min_len=0.6, max_len=6.0, min_gap=3.0, max_gap=10.0)
    t = signal_times(real, SignalModel(PRM, delay=0.03, jitter=0.05), rng)
    assert np.unique(t).size == t.size
    return t


def write(path: Path, values: np.ndarray) -> Path:
    path.write_text("".join(f"{v!r}\n" for v in values.tolist()))
    return path


def replay(cli: list[str], path: Path, *extra: str) -> tuple[list[tuple[float, float]], list[str]]:
    r = subprocess.run(
        [*cli, "replay", str(path), "--json", *extra], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    stalls = [(json.loads(x)["start"], json.loads(x)["end"]) for x in r.stdout.splitlines()]
    return stalls, r.stderr.splitlines()


def dropped(warning: list[str]) -> int:
    assert len(warning) == 1 and warning[0].startswith("iqn-ctl: warning: "), warning
    m = re.search(r"dropped (\d+) repeated", warning[0])
    assert m, warning[0]
    return int(m.group(1))


@pytest.mark.parametrize("estimator", ["count", "paper"])
def test_unsorted_file_gives_the_stalls_of_the_sorted_one(
    iqn_ctl: list[str], times: np.ndarray, tmp_path: Path, estimator: str
) -> None:
    ordered, warn1 = replay(iqn_ctl, write(tmp_path / "sorted.txt", times), "--estimator", estimator)
    shuffled = np.random.default_rng(1).permutation(times)
    assert (np.diff(shuffled) < 0).sum() > times.size // 3  # far beyond the reorder tolerance
    got, warn2 = replay(iqn_ctl, write(tmp_path / "shuffled.txt", shuffled), "--estimator", estimator)
    assert len(ordered) >= 10
    assert got == ordered
    assert warn1 == warn2 == []  # nothing was dropped: no warning


def test_list_dumped_twice_counts_once(iqn_ctl: list[str], times: np.ndarray, tmp_path: Path) -> None:
    once, _ = replay(iqn_ctl, write(tmp_path / "once.txt", times))
    twice, warning = replay(iqn_ctl, write(tmp_path / "twice.txt", np.concatenate((times, times))))
    assert twice == once
    assert dropped(warning) == times.size
    # the case matters: counting every copy doubles the signal count, and the
    # default estimator's stalls grow until its end cap (the end window) stops them
    inflated = [(e.start, e.end) for e in infer_times(np.concatenate((times, times)), PRM, "count")]
    assert len(inflated) == len(once)
    growth = sum(b - a for a, b in inflated) - sum(b - a for a, b in once)
    assert growth > 2 * PRM.p * len(once)


def test_growing_dumps_read_as_the_last_one(iqn_ctl: list[str], times: np.ndarray, tmp_path: Path) -> None:
    # as the paper's agent wrote operational_example: the list so far, again and again
    cuts = np.linspace(3, times.size, 7).astype(int)
    dumps = np.concatenate([times[:k] for k in cuts])
    once, _ = replay(iqn_ctl, write(tmp_path / "once.txt", times))
    got, warning = replay(iqn_ctl, write(tmp_path / "dumps.txt", dumps))
    assert got == once
    assert dropped(warning) == dumps.size - times.size


def test_paper_operational_example(iqn_ctl: list[str], tmp_path: Path) -> None:
    raw = DATA / "operational_example" / "timestamp_of_candidate.txt"
    lines = [x for x in raw.read_text().splitlines() if x.strip()]
    distinct = sorted(set(lines), key=float)  # `sort -u -n`
    assert (len(lines), len(distinct)) == (4903, 309)
    want, none = replay(iqn_ctl, write(tmp_path / "sort_u.txt", np.array([float(x) for x in distinct])))
    got, warning = replay(iqn_ctl, raw)
    assert none == []
    assert got == want and len(got) >= 5
    assert dropped(warning) == 4903 - 309
    assert "kept 309 distinct" in warning[0]


def test_ties_in_an_arrival_log_are_two_packets(iqn_ctl: list[str], tmp_path: Path) -> None:
    # one stall: 10 bursts of 4, p = 0.2 s; then the same with one packet's
    # time on two lines (sorted, as a capture stamps two packets alike)
    t0 = 1.7e9
    bursts = t0 + np.round(0.2 * np.arange(10)[:, None] + 0.002 * np.arange(4)[None, :], 6).ravel()
    base, warn1 = replay(iqn_ctl, write(tmp_path / "log.txt", bursts))
    tied = np.sort(np.append(bursts, bursts[17]))
    got, warn2 = replay(iqn_ctl, write(tmp_path / "tied.txt", tied))
    assert warn1 == warn2 == []
    assert len(base) == len(got) == 1
    # one more candidate: the count estimate grows by p/n
    assert (got[0][1] - got[0][0]) - (base[0][1] - base[0][0]) == pytest.approx(0.2 / 4, abs=1e-6)


@pytest.mark.parametrize("genre", ["news", "music"])
def test_paper_arrival_logs_replay_without_warning(iqn_ctl: list[str], genre: str) -> None:
    stalls, warning = replay(iqn_ctl, DATA / genre / "timestamp_of_candidate.txt")
    assert warning == []
    assert len(stalls) >= 90
