"""The localisation run's record audit and stall latency (no root: plain data in, counts out)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from iqn_lab.errors import LabError
from iqn_lab.localise.audit import audit, session_latency, stall_latency, stream_messages
from iqn_lab.localise.demo import LocaliseConfig, run_localise


def _recs() -> list[dict[str, Any]]:
    return [
        {"id": "rtr-1/u/stall/1", "type": "stall", "client": "198.18.1.10", "start": 100.2, "end": 104.1,
         "detected_at": 104.6, "exported_at": 104.7},
        {"id": "rtr-1/u/stall/2", "type": "stall", "client": "198.18.1.10", "start": 110.0, "end": 112.0,
         "detected_at": 112.5, "exported_at": 112.6},
        {"id": "rtr-1/u/session/1", "type": "session", "client": "198.18.1.10", "slot": 90.0, "slot_s": 30.0,
         "recorded_at": 122.0, "exported_at": 122.1},
    ]


def test_audit_finds_lost_unknown_and_doubled_records() -> None:
    recs = _recs()
    stored = {"rtr-1/u/stall/1": 105.0, "rtr-1/u/stall/2": 113.0, "rtr-1/u/session/1": 122.3}
    lines = Counter({"rtr-1/u/session/1": 1})
    ok = audit(recs, 3, stored, lines)
    assert ok["ok"] and ok["lost"] == [] and ok["doubled"] == 0 and (ok["stalls"], ok["sessions"]) == (2, 1)
    lost = audit(recs, 3, {k: v for k, v in stored.items() if "stall/2" not in k}, lines)
    assert lost["lost"] == ["rtr-1/u/stall/2"] and not lost["ok"]
    twice = audit(recs, 4, stored, lines)  # a duplicate in the stream
    assert twice["doubled"] == 1 and not twice["ok"]
    two_lines = audit(recs, 3, stored, Counter({"rtr-1/u/session/1": 2}))
    assert two_lines["doubled"] == 1 and two_lines["multi_line"] == ["rtr-1/u/session/1"]
    stranger = audit(recs, 3, {**stored, "rtr-9/x/stall/1": 1.0}, lines)
    assert stranger["unknown"] == ["rtr-9/x/stall/1"] and not stranger["ok"]


def test_stall_latency_pairs_player_stalls_with_the_agents_records() -> None:
    logs = {"sub-a-00": [
        {"event": "start", "t": 95.0, "client": "198.18.1.10"},
        {"event": "stall", "start": 100.0, "end": 104.0, "startup": False},
        {"event": "stall", "start": 110.1, "end": 111.9, "startup": False},
        {"event": "stall", "start": 150.0, "end": 151.0, "startup": False},  # the agent missed this one
    ], "sub-b-00": [{"event": "start", "t": 95.0, "client": "198.18.2.10"},
                    {"event": "stall", "start": 130.0, "end": 131.0, "startup": False}]}
    other = {"id": "rtr-1/u/stall/3", "type": "stall", "client": "198.18.2.99", "start": 130.1, "end": 131.2,
             "detected_at": 131.5, "exported_at": 131.6}  # the same time, another client: no match
    stored = {"rtr-1/u/stall/1": 105.0, "rtr-1/u/stall/2": 113.0, "rtr-1/u/stall/3": 132.0,
              "rtr-1/u/session/1": 122.5}
    got = stall_latency(logs, [*_recs(), other], stored)
    assert (got["player_stalls"], got["matched"], got["unmatched"]) == (4, 2, 2)
    assert got["total"]["n"] == 2 and got["total"]["max_s"] == 1.1 and got["total"]["p50_s"] == 1.0
    assert got["detect"]["max_s"] == 0.6 and got["router"]["max_s"] == 0.5
    assert session_latency(_recs(), stored) == {"n": 1, "p50_s": 2.5, "p99_s": 2.5, "max_s": 2.5}


def test_stream_messages_reads_the_monitoring_answer() -> None:
    doc = {"account_details": [{"stream_detail": [{"name": "X", "state": {"messages": 9}},
                                                  {"name": "IQN", "state": {"messages": 42}}]}]}
    assert stream_messages(doc) == 42 and stream_messages({}) is None


def test_kill_node_needs_a_cluster(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="--kill-node needs a JetStream cluster"):
        run_localise(LocaliseConfig(out=tmp_path / "run", kill_node=True, nats_nodes=1), say=print)
    assert not (tmp_path / "run").exists()
