"""What the localisation run's records did on their way: counted, and timed.

Two questions the run answers besides the ranking (issue 13):

* **Nothing lost, nothing doubled** (also when a JetStream node is SIGKILLed mid-run):
  every record the agents' histories hold (finished stalls, watched-time sessions) is in
  the stream once and stored once by the QoS service. :func:`audit` compares the three
  counts by message id (``<router>/<history uuid>/stall|session/<row id>``, docs/export.md).
* **How soon the service knows**: :func:`stall_latency` pairs each stall a player logged
  (ground truth) with the stall record the agent wrote for that client and times the way
  from the stall's end at the player to the record stored by the service, in stages (the
  agent noticing the end, the export's acknowledgement, the store); all clocks are the one
  machine's wall clock.

The pure functions take plain data; :func:`history_records` and :func:`store_records` read
the agent's SQLite history and the service's DuckDB store.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: a player's stall and the agent's record of it overlap, give or take this (s): the agent
#: dates a stall by the first and last answers it saw, a look (p) or two from the player's edges
MATCH_SLACK = 1.0


def history_records(db: Path, iface: str, router: str) -> list[dict[str, Any]]:
    """The records the agent on ``iface`` exports from its history ``db`` (finished stalls and
    sessions), with the id each message carries, read-only."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)
    try:
        uuid = con.execute("SELECT value FROM meta WHERE key = 'history_uuid'").fetchone()[0]
        out: list[dict[str, Any]] = []
        for row, client, start, end, detected, exported in con.execute(
                'SELECT id, client, start, "end", detected_at, exported_at FROM stalls '
                "WHERE iface = ? AND state != 'open' ORDER BY id", (iface,)):
            out.append({"id": f"{router}/{uuid}/stall/{row}", "type": "stall", "client": client,
                        "start": start, "end": end, "detected_at": detected, "exported_at": exported})
        for row, client, slot, slot_s, recorded, exported in con.execute(
                "SELECT id, client, slot, slot_s, recorded_at, exported_at FROM sessions WHERE iface = ? "
                "ORDER BY id", (iface,)):
            out.append({"id": f"{router}/{uuid}/session/{row}", "type": "session", "client": client,
                        "slot": slot, "slot_s": slot_s, "recorded_at": recorded, "exported_at": exported})
        return out
    finally:
        con.close()


def store_records(store: Path) -> tuple[dict[str, float], Counter[str]]:
    """The service's store: ``{id: stored_at}`` of every record, and media lines per record id."""
    import duckdb

    con = duckdb.connect(str(store), read_only=True)
    try:
        stored = {str(i): float(t) for i, t in con.execute("SELECT id, stored_at FROM records").fetchall()}
        q = "SELECT id FROM lines WHERE id IS NOT NULL AND id != ''"
        lines = Counter(str(i) for (i,) in con.execute(q).fetchall())
        return stored, lines
    finally:
        con.close()


def stream_messages(jsz: Mapping[str, Any], stream: str = "IQN") -> int | None:
    """Messages in ``stream`` by a node's ``/jsz?streams=true`` answer (None: not there)."""
    for acc in jsz.get("account_details") or []:
        for st in acc.get("stream_detail") or []:
            if st.get("name") == stream:
                return int(st.get("state", {}).get("messages", 0))
    return None


def stream_replicas(jsz: Mapping[str, Any], stream: str = "IQN") -> int | None:
    """Replicas of ``stream`` by a node's ``/jsz?streams=true&config=true`` answer."""
    for acc in jsz.get("account_details") or []:
        for st in acc.get("stream_detail") or []:
            if st.get("name") == stream:
                return int(st.get("config", {}).get("num_replicas", 0))
    return None


def audit(records: Sequence[Mapping[str, Any]], stream: int | None, stored: Mapping[str, float],
          lines: Mapping[str, int]) -> dict[str, Any]:
    """The agents' records against the stream and the store, by id.

    ``lost``: in an agent's history, not stored; ``unknown``: stored, in no history;
    ``doubled``: stream messages beyond one per record (a duplicate that JetStream's
    de-duplication let through), plus records with more than one media line in the store.
    ``unexported``: records the agents have not had acknowledged (none, once drained).
    One message per record: the lab's agents export schema-v1 messages (the default; with
    batch messages the stream count would be of batches, not records)."""
    ids = [str(r["id"]) for r in records]
    uniq = set(ids)
    lost = sorted(uniq - set(stored))
    unknown = sorted(set(stored) - uniq)
    multi = sorted(i for i, k in lines.items() if k > 1)
    return {
        "agents": len(uniq), "stalls": sum(1 for r in records if r["type"] == "stall"),
        "sessions": sum(1 for r in records if r["type"] == "session"),
        "unexported": sum(1 for r in records if r.get("exported_at") is None),
        "stream": stream, "stored": len(stored),
        "lost": lost, "unknown": unknown,
        "doubled": (0 if stream is None else max(0, stream - len(uniq))) + len(multi),
        "multi_line": multi,
        "ok": not lost and not unknown and not multi and stream == len(uniq) and len(ids) == len(uniq),
    }


def _pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``: p99 of 100 values is the 99th smallest."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


def summary(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50_s": None, "p99_s": None, "max_s": None}
    return {"n": len(values), "p50_s": round(_pct(values, 0.50), 3), "p99_s": round(_pct(values, 0.99), 3),
            "max_s": round(max(values), 3)}


def stall_latency(logs: Mapping[str, Sequence[Mapping[str, Any]]], records: Iterable[Mapping[str, Any]],
                  stored: Mapping[str, float]) -> dict[str, Any]:
    """From each player's stall end to the service storing the agent's record of it.

    A player stall matches the agent's stall record of the same client that overlaps it
    (within :data:`MATCH_SLACK`), the one ending nearest; each record matches once. Stages:
    ``detect`` (player's end -> the agent's ``detected_at``), ``export`` (-> the broker's
    acknowledgement, ``exported_at``), ``store`` (-> ``stored_at`` in the service),
    ``total`` (player's end -> stored) and ``router`` (the agent's ``detected_at`` -> stored:
    the way from the router on, issue 13's "end-to-end delay")."""
    by_client: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r["type"] == "stall":
            by_client.setdefault(str(r["client"]), []).append(r)
    used: set[str] = set()
    stages: dict[str, list[float]] = {"detect": [], "export": [], "store": [], "total": [], "router": []}
    player_stalls = unmatched = unstored = 0
    for events in logs.values():
        start = next((e for e in events if e.get("event") == "start"), None)
        if start is None:
            continue
        client = str(start.get("client"))
        for e in events:
            if e.get("event") != "stall":
                continue
            player_stalls += 1
            a, b = float(e["start"]), float(e["end"])
            cands = [r for r in by_client.get(client, []) if str(r["id"]) not in used
                     and float(r["start"]) <= b + MATCH_SLACK and float(r["end"]) >= a - MATCH_SLACK]
            if not cands:
                unmatched += 1
                continue
            r = min(cands, key=lambda r: abs(float(r["end"]) - b))
            used.add(str(r["id"]))
            got = stored.get(str(r["id"]))
            if got is None:
                unstored += 1
                continue
            stages["total"].append(got - b)
            stages["detect"].append(float(r["detected_at"]) - b)
            stages["router"].append(got - float(r["detected_at"]))
            if r.get("exported_at") is not None:
                stages["export"].append(float(r["exported_at"]) - float(r["detected_at"]))
                stages["store"].append(got - float(r["exported_at"]))
    return {"player_stalls": player_stalls, "matched": len(stages["total"]) + unstored,
            "unmatched": unmatched, "unstored": unstored, **{k: summary(v) for k, v in stages.items()}}


def session_latency(records: Iterable[Mapping[str, Any]], stored: Mapping[str, float]) -> dict[str, Any]:
    """From a slot's end to the service storing each watched-time record of it (the agents
    write a slot's records 2 s after it ends, by design)."""
    vals = [stored[str(r["id"])] - (float(r["slot"]) + float(r["slot_s"])) for r in records
            if r["type"] == "session" and str(r["id"]) in stored]
    return summary(vals)
