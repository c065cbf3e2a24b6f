"""The on-disk stall history: persisted, bounded, filterable, crash-safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iqn_ctl.live.history import History, HistoryError, StallRecord, db_path


def rec(i: int, iface: str = "eth0", start: float = 1.7e9) -> StallRecord:
    return StallRecord(iface, f"198.18.0.1:443>198.18.0.2:{1000 + i}", "198.18.0.2", "198.18.0.1",
                       start + 10 * i, start + 10 * i + 1.5 + i / 100, 4 * (i + 1), start + 10 * i + 2.3)


def test_round_trip_and_json_shape(tmp_path: Path) -> None:
    with History(tmp_path) as h:
        assert h.add([rec(0), rec(1, "eth1")]) == 2
        got = h.query()
    assert got == [rec(0), rec(1, "eth1")]
    d = got[1].as_json()
    for k in ("flow", "client", "start", "end", "duration", "iface", "server", "candidates"):
        assert k in d
    assert d["duration"] == pytest.approx(1.51)
    json.dumps(d)  # JSON-able


def test_filters(tmp_path: Path) -> None:
    with History(tmp_path) as h:
        h.add([rec(i, "eth0" if i % 2 else "eth1") for i in range(6)])
        assert [r.iface for r in h.query(iface="eth0")] == ["eth0"] * 3
        # since keeps stalls that end at/after it: rec(3) ends at +31.53
        assert [r.candidates for r in h.query(since=1.7e9 + 31.5)] == [16, 20, 24]
        assert h.query(iface="eth0", since=1.7e9 + 41.6) == [rec(5)]
        assert h.query(iface="nope") == []


def test_bounded_keeps_newest(tmp_path: Path) -> None:
    with History(tmp_path, max_rows=50) as h:
        for i in range(0, 300, 30):
            h.add([rec(j) for j in range(i, i + 30)])
        got = h.query()
    assert len(got) == 50
    assert [r.candidates for r in got] == [4 * (j + 1) for j in range(250, 300)]


def test_persists_across_reopen_and_kill(tmp_path: Path) -> None:
    """A writer killed with SIGKILL right after a commit loses nothing."""
    code = (
        f"import os, sys; from pathlib import Path; sys.path.insert(0, {str(Path(__file__).parent)!r});"
        "from test_history import rec; from iqn_ctl.live.history import History;"
        f"h = History(Path({str(tmp_path)!r})); h.add([rec(i) for i in range(5)]); os.kill(os.getpid(), 9)"
    )
    p = subprocess.run([sys.executable, "-c", code])
    assert p.returncode == -9
    with History(tmp_path, create=False) as h:
        assert h.count() == 5
        assert h.query()[4] == rec(4)


def test_private_and_missing(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="no stall history"):
        History(tmp_path / "none", create=False)
    d = tmp_path / "state"
    History(d).close()
    assert (d.stat().st_mode & 0o777) == 0o700
    assert (db_path(d).stat().st_mode & 0o077) == 0
    assert os.path.exists(db_path(d))
