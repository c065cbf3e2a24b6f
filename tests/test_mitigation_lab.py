"""The mitigation lab's set-up for real (``iqn_lab/mitigation/lab.py``): its
namespaces, the OTT service's page and media hosts (two daemons,
``iqn_lab/ott/daemons.py``) and the bulk server in the server namespace, a
signal player behind the router fetching the video through it, and a ``down``
that leaves nothing. The experiment itself is ``iqn-lab demo --mitigation``
(docs/lab.md); its plan and measures are tests/test_mitigation_report.py."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from conftest import need, need_root

from iqn_lab import netns, procs
from iqn_lab.mitigation.lab import MitigationLab
from iqn_lab.player import read_log
from iqn_lab.testbed import run_prefix


def test_up_serves_a_player_and_down_leaves_nothing(tmp_path: Path) -> None:
    need_root()
    need(shutil.which("ffmpeg") is not None, "needs ffmpeg (bash scripts/setup.sh)")
    prefix = run_prefix()
    lab = MitigationLab(prefix, state_root=tmp_path / "state")
    try:
        lab.up(viewers=1, downloaders=1)
        assert all(procs.pid_of(lab.state, d) for d in ("ott-www", "ott-media", "bulk-server"))
        assert all((lab.state / f"{d}.ready").exists() for d in ("ott-www", "ott-media"))
        pid = lab.start_players(1, duration=6.0, log_dir=tmp_path / "players", seed=1)
        deadline = time.monotonic() + 90
        while procs.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not procs.alive(pid), "the player did not finish"
        (log,) = (tmp_path / "players").glob("*.jsonl")
        recs = read_log(log)
        assert not [r for r in recs if r.get("event") == "error"], recs
        (end,) = [r for r in recs if r.get("event") == "end"]
        assert end["segments"] > 0 and end["watched_s"] > 0, end
    finally:
        removed = lab.down()
    assert sorted(removed) == sorted([*(f"namespace {prefix}-{r}" for r in ("srv", "rtr", "cli")),
                                      f"state {lab.state}"])
    assert not [n for n in netns.names() if n.startswith(f"{prefix}-")]
    assert not lab.state.exists()
