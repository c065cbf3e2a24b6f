"""The localisation report (sans-I/O): final estimates against what was shown at a slot's close."""

from __future__ import annotations

from typing import Any

from iqn_lab.localise import report as R


def _est(slot: float, comp: str, p: float, lines: int) -> dict[str, Any]:
    return {"slot": slot, "component": comp, "p": p, "lo": 0.0, "hi": p + 0.1, "lines": lines,
            "faulty": p > 0.05}


def _logs() -> dict[str, list[dict[str, Any]]]:
    return {"a1": [{"event": "start", "t": 0.0, "client": "c1", "media": "m1"},
                   {"event": "stall", "start": 12.0, "end": 14.0},
                   {"event": "end", "t": 20.0}]}


def test_a_slot_shown_before_its_late_lines_is_marked_revised() -> None:
    final = R.per_slot([_est(0, "srv", 0.0, 3), _est(10, "sub-a", 0.2, 9), _est(10, "srv", 0.01, 9)],
                       0.0, 2, 10.0)
    shown = R.per_slot([_est(0, "srv", 0.0, 3), _est(10, "srv", 0.02, 2)], 0.0, 2, 10.0)
    rep = R.build("sub-a", 10.0, final, _logs(), lambda c, m: ["sub-a", "srv"], ["sub-a", "srv"], shown)
    first, second = rep["slots"]
    assert not first["revised"] and first["at_close"]["ranking"] == ["srv"]
    assert second["revised"] and second["ranking"] == ["sub-a", "srv"]
    assert second["at_close"] == {"ranking": ["srv"], "lines": {"srv": 2}}
    assert rep["target"]["met"]  # judged on the final estimates
    assert rep["slots"][1]["actual"]["sub-a"]["fraction"] == 0.2
    text = R.summary(rep)
    assert "at close: srv (revised by records stored after the close)" in text
    assert text.count("at close") == 1


def test_without_at_close_rows_carry_no_revision() -> None:
    final = R.per_slot([_est(10, "sub-a", 0.2, 9)], 0.0, 2, 10.0)
    rep = R.build("sub-a", 10.0, final, _logs(), lambda c, m: ["sub-a"], ["sub-a"])
    assert all("revised" not in r and "at_close" not in r for r in rep["slots"])
    assert "at close" not in R.summary(rep)
