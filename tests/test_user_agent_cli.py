"""``iqn-agent`` without a screen: bad input gives one clear line and exit 2;
layout arithmetic, calibration files and the ground-truth writer."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iqn_ctl.evaluate.traces import read_real_stalls
from user_agent.errors import AgentError
from user_agent.layout import (
    Layout,
    Point,
    Rect,
    WindowMetrics,
    element_to_screen,
    load_calibration,
    save_calibration,
    viewport_origin,
)
from user_agent.locate import layout_from_page
from user_agent.signaler import Signaler, check_n
from user_agent.truth import TruthRecorder


def agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "XAUTHORITY")}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "user_agent.cli", *args], capture_output=True, text=True, timeout=60, env=e
    )


def one_error_line(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iqn-agent: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0]


@pytest.mark.parametrize("n", [3, 1, 0, -2])
def test_odd_or_too_small_n_is_refused(n: int) -> None:
    with pytest.raises(AgentError, match="even"):
        check_n(n)
    with pytest.raises(AgentError, match="even"):
        Signaler(n, gui=object())


def test_cli_refuses_odd_n_before_touching_the_screen() -> None:
    one_error_line(agent("run", "--n", "5", "--url", "http://127.0.0.1:9/"), "--n", "even")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run"], "exactly one of --url, --calibration or --attach"),
        (["run", "--url", "http://127.0.0.1:9/", "--calibration", "x.json"], "exactly one"),
        (["run", "--p", "0", "--url", "http://127.0.0.1:9/"], "--p"),
        (["run", "--url", "http://127.0.0.1:9/"], "no X display"),
        (["truth"], "exactly one of --url or --attach"),
        (["calibrate"], "no X display"),
    ],
)
def test_cli_bad_usage_is_one_line(args: list[str], needle: str) -> None:
    one_error_line(agent(*args), needle)


def test_cli_bad_calibration_file(tmp_path: Path) -> None:
    bad = tmp_path / "cal.json"
    bad.write_text("{not json")
    one_error_line(agent("run", "--calibration", str(bad)), str(bad), "not a calibration file")
    one_error_line(agent("run", "--calibration", str(tmp_path / "none.json")), "cannot read")
    good = tmp_path / "good.json"
    save_calibration(Layout(Rect(10, 10, 640, 360), Point(600, 400)), good)
    one_error_line(agent("run", "--calibration", str(good), "--truth", str(tmp_path / "t")), "--truth")


def test_calibration_round_trip_and_checks(tmp_path: Path) -> None:
    lay = Layout(Rect(24, 173, 640, 360), Point(644, 557))
    save_calibration(lay, tmp_path / "c.json", ":5")
    assert load_calibration(tmp_path / "c.json") == lay
    assert json.loads((tmp_path / "c.json").read_text())["display"] == ":5"
    inside = Layout(Rect(0, 0, 640, 360), Point(320, 180))
    save_calibration(inside, tmp_path / "in.json")
    with pytest.raises(AgentError, match="inside the player"):
        load_calibration(tmp_path / "in.json")
    tiny = Layout(Rect(0, 0, 20, 20), Point(300, 300))
    save_calibration(tiny, tmp_path / "tiny.json")
    with pytest.raises(AgentError, match="too small"):
        load_calibration(tmp_path / "tiny.json")


def test_viewport_origin_accounts_for_chrome_and_info_bar() -> None:
    # Chromium at (50, 40), 1200x800 outside, 657 px of page: tab strip, toolbar
    # and the "controlled by automated test software" bar take the 143 px above.
    w = WindowMetrics(50, 40, 1200, 800, 1200, 657)
    assert viewport_origin(w) == (50, 183)
    assert element_to_screen(w, 100, 50, 200, 100) == Rect(150, 233, 200, 100)
    # a window manager's 4 px side borders (split evenly) and 2x device pixels
    w2 = WindowMetrics(10, 20, 808, 700, 800, 600, dpr=2.0)
    assert viewport_origin(w2) == (28, 232)
    assert element_to_screen(w2, 10.5, 0, 100, 50) == Rect(49, 232, 200, 100)


def page_answer(**over: object) -> dict[str, object]:
    info: dict[str, object] = {
        "win": [0, 0, 900, 700, 900, 557, 1],
        "player": [24, 16, 640, 360],
        "switch": [628, 393, 36, 14],
        "truth": [["S", 1000.0]],
    }
    info.update(over)
    return info


def test_layout_from_page() -> None:
    loc = layout_from_page(page_answer())
    assert loc.layout == Layout(Rect(24, 159, 640, 360), Point(646, 543))
    assert loc.truth == [["S", 1000.0]]
    gone = layout_from_page(page_answer(switch=[628, 600, 36, 14]))
    assert gone.layout is None and "switch" in gone.why
    scrolled = layout_from_page(page_answer(player=[24, -40, 640, 360]))
    assert scrolled.layout is None and "player" in scrolled.why
    missing = layout_from_page({"missing": "player", "truth": []})
    assert missing.layout is None and "no player" in missing.why


def test_truth_recorder_writes_real_stalls(tmp_path: Path) -> None:
    out = io.StringIO()
    rec = TruthRecorder(out)
    rec.feed([["E", 999.0], ["S", 1_700_000_000_123.5], ["S", 1_700_000_000_200.0]])
    rec.feed([["E", 1_700_000_002_623.25], ["S", 1_700_000_003_000.0]])
    path = tmp_path / "Real_stalls.txt"
    path.write_text(out.getvalue())
    stalls = read_real_stalls(path)  # the trailing open stall is dropped by the reader
    assert rec.stalls == 1 and len(stalls) == 1
    assert stalls[0].start == pytest.approx(1_700_000_000.1235, abs=1e-6)
    assert stalls[0].duration == pytest.approx(2.49975, abs=1e-6)
