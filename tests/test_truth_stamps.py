"""Issue 15's ground-truth stamps: the spinner's change at the DOM and after
the next paint, the recorder's choice of truth, the demo's scores against both
truths, and the screen witness's reading of its grab log. The page's side (the
observer in a real Chromium) is in tests/test_user_agent_browser.py."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from iqn_ctl.evaluate.traces import Stall, read_real_stalls
from iqn_lab.demo.report import dom_truth, edge_lags, scores_against
from iqn_lab.demo.witness import ScreenStall, boxes, edge_table, screen_edges
from user_agent.errors import AgentError
from user_agent.truth import STAMPS_HEADER, TruthRecorder, read_stamps

T0 = 1_700_000_000_000.0  # epoch ms, as the page gives them


def events() -> list[list[float | str | None]]:
    """Two stalls: painted 8 ms after the DOM change at the starts, 12 ms at the
    ends; the second end never painted (a hidden page runs no frames)."""
    return [
        ["S", T0, T0 + 8, T0 - 30],
        ["E", T0 + 2000, T0 + 2012, T0 + 2001],
        ["S", T0 + 5000, T0 + 5008, None],
        ["E", T0 + 6000, None, None],
    ]


def test_the_recorder_writes_the_painted_moment_and_keeps_every_stamp(tmp_path: Path) -> None:
    out, stamps = io.StringIO(), io.StringIO()
    rec = TruthRecorder(out, stamps=stamps)
    rec.feed(events())
    truth = tmp_path / "Real_stalls.txt"
    truth.write_text(out.getvalue())
    a, b = read_real_stalls(truth)
    assert a.start == pytest.approx((T0 + 8) / 1000, abs=1e-6)
    assert a.end == pytest.approx((T0 + 2012) / 1000, abs=1e-6)
    assert b.end == pytest.approx((T0 + 6000) / 1000, abs=1e-6)  # no paint stamp: the DOM's
    assert rec.stalls == 2 and rec.fallbacks == 1
    path = tmp_path / "truth_stamps.tsv"
    path.write_text(stamps.getvalue())
    assert stamps.getvalue().startswith(STAMPS_HEADER)
    rows = read_stamps(path)
    assert [r[0] for r in rows] == ["S", "E", "S", "E"]
    assert rows[0][1:] == pytest.approx((T0 / 1000, (T0 + 8) / 1000, (T0 - 30) / 1000), abs=1e-6)
    assert rows[2][3] is None and rows[3][2:] == (None, None)


def test_the_dom_stamp_stays_available_as_the_truth() -> None:
    out = io.StringIO()
    rec = TruthRecorder(out, stamp="dom")
    rec.feed(events()[:2])
    assert out.getvalue() == f"S-{T0 / 1000:.6f}\nE-{(T0 + 2000) / 1000:.6f}\n"
    assert rec.fallbacks == 0
    with pytest.raises(AgentError, match="stamp"):
        TruthRecorder(io.StringIO(), stamp="screen")


def test_old_pages_events_without_paint_stamps_still_record() -> None:
    out = io.StringIO()
    rec = TruthRecorder(out)
    rec.feed([["S", T0], ["E", T0 + 1500]])
    assert rec.stalls == 1 and rec.fallbacks == 2
    assert out.getvalue().splitlines()[1] == f"E-{(T0 + 1500) / 1000:.6f}"


def stamps_file(tmp_path: Path) -> Path:
    stamps = io.StringIO()
    TruthRecorder(io.StringIO(), stamps=stamps).feed(events())
    path = tmp_path / "truth_stamps.tsv"
    path.write_text(stamps.getvalue())
    return path


def test_the_report_scores_against_the_dom_truth_and_gives_the_paint_lag(tmp_path: Path) -> None:
    path = stamps_file(tmp_path)
    dom = dom_truth(path, tmp_path / "Real_stalls_dom.txt")
    s0 = T0 / 1000
    assert [(d.start, d.end) for d in dom] == [
        pytest.approx((s0, s0 + 2.0), abs=1e-6), pytest.approx((s0 + 5.0, s0 + 6.0), abs=1e-6)
    ]
    assert read_real_stalls(tmp_path / "Real_stalls_dom.txt") == dom
    lags = edge_lags(path)
    assert lags["paint_S"] == {"mean": 8.0, "median": 8.0, "max": 8.0, "n": 2}
    assert lags["paint_E"]["n"] == 1 and lags["paint_E"]["mean"] == pytest.approx(12.0)
    assert lags["video_S"]["mean"] == pytest.approx(-30.0) and lags["video_E"]["mean"] == pytest.approx(1.0)
    # an inferred stall 100 ms longer than the DOM truth at both stalls
    inferred = [Stall(s0 - 0.05, s0 + 2.05), Stall(s0 + 4.95, s0 + 6.05)]
    got = scores_against(dom, [], inferred)
    assert got["matched"] == 2 and got["false_positives"] == 0
    assert got["mae_ms"] == pytest.approx(100.0, abs=1e-3)
    assert got["bias_ms"] == pytest.approx(100.0, abs=1e-3)
    assert got["user_mae_ms"] is None


def test_the_witness_reads_the_screens_edges() -> None:
    centre, picture = boxes(24, 159, 640, 360)
    assert (centre.left, centre.top, centre.width) == (24 + 320 - 32, 159 + 180 - 32, 64)
    assert picture.left > 24 and picture.top > 159
    # grabs every 5 ms: the picture changes every 40 ms until 10.000 (its last
    # frame), the spinner's box from 10.030 (it shows) to 12.005 (it goes),
    # the picture again from 12.010
    rows: list[tuple[float, bool, bool]] = []
    for i in range(1600):
        t = 9.0 + i * 0.005
        playing = t <= 10.0 + 1e-9 or t >= 12.010 - 1e-9
        frame = playing and round((t - 9.0) * 1000) % 40 == 0
        spin = 10.030 - 1e-9 <= t <= 12.005 + 1e-9
        rows.append((t, spin or frame, frame))
    (st,) = screen_edges(rows, [(10.02, 12.0)])
    assert st.froze == pytest.approx(10.0) and st.spinner_on == pytest.approx(10.030)
    assert st.spinner_off == pytest.approx(12.005) and st.moved == pytest.approx(12.040)
    (none,) = screen_edges([], [(10.02, 12.0)])
    assert none == ScreenStall(None, None, None, None)


def test_the_edge_table_sets_each_edge_against_the_dom_stamp(tmp_path: Path) -> None:
    stamps = read_stamps(stamps_file(tmp_path))
    s0 = T0 / 1000
    agent = [(s0 + 4.97, s0 + 6.02), (s0 - 0.03, s0 + 2.02), (s0 + 100.0, s0 + 101.0)]
    screen = [ScreenStall(s0 - 0.024, s0 + 0.007, None, s0 + 2.009), ScreenStall(None, None, None, None)]
    first, second = edge_table(stamps, agent, screen)
    assert first["S_agent"] == pytest.approx(-30.0) and first["E_agent"] == pytest.approx(20.0)
    assert first["S_paint"] == pytest.approx(8.0) and first["E_paint"] == pytest.approx(12.0)
    assert first["S_screen_froze"] == pytest.approx(-24.0) and first["E_screen_moved"] == pytest.approx(9.0)
    assert first["agent_s"] == pytest.approx(2.05) and first["dom_s"] == pytest.approx(2.0)
    assert second["S_agent"] == pytest.approx(-30.0) and second["E_paint"] is None
    assert second["S_screen_froze"] is None
    (alone,) = edge_table(stamps[:2], [], None)
    assert alone["S_agent"] is None and alone["paint_s"] == pytest.approx(2.004)
