"""Schema-v2 batch messages (``iqn-ctl attach --export-batch N``, docs/export.md): many v1
records in one NATS message, read by ``iqn-qos serve`` next to v1 messages.

Batching must lose nothing and count nothing twice: a batch is acknowledged (by JetStream to
the exporter, by the service to JetStream) as a whole, and a record can reach the stream in
two different batches (an exporter killed between JetStream's acknowledgement and its marks
sends it again, grouped differently, under another batch id that JetStream does not
de-duplicate), so the service stays idempotent on each record's own id.  The end-to-end test
SIGKILLs both the exporter and the service in the middle and counts every record in DuckDB.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
from test_export import read_stream, stall, unmarked, wait_for, wanted
from test_qos_serve import start_service

from iqn_ctl.engine.watch import WatchRecord
from iqn_ctl.live.export import Exporter, Outbox, Waiting
from iqn_ctl.live.history import History
from iqn_ctl.live.sessions import SessionStore
from iqn_lab.jetstream import JetStream
from iqn_lab.testbed import PY
from iqn_qos.ingest import Decoder
from iqn_qos.store import Store
from iqn_qos.topology import load_topology

#: the addresses of test_export's records: clients 198.18.1.x behind net-a, server 198.18.0.1
TOPO = {"components": [{"id": "srv", "kind": "server"}, {"id": "core", "kind": "router"},
                       {"id": "net-a", "kind": "subnet"}],
        "edges": [["srv", "core"], ["core", "net-a"]],
        "attach": [{"prefix": "198.18.1.0/24", "node": "net-a"}, {"prefix": "198.18.0.1/32", "node": "srv"}]}

#: an exporter in a process of its own (so that it can be SIGKILLed): argv db, urls, records/msg;
#: told that the agent's loop is late after every batch, it pauses 0.2 s between batches, so
#: the test finds it in the middle
EXPORTER = r"""
import itertools, json, sys, time
from pathlib import Path
from iqn_ctl.live.export import Exporter
urls, per_msg = json.loads(sys.argv[2]), int(sys.argv[3])
Exporter(Path(sys.argv[1]), "eth0", "edge-v2", urls, records_per_msg=per_msg,
         late=itertools.count().__next__).start()
print("started", flush=True)
time.sleep(600)
"""


def history(tmp: Path, stalls: int, sessions: int) -> Path:
    with History(tmp / "s", max_rows=stalls) as h:
        for i in range(0, stalls, 5000):
            h.add([stall(i + k) for k in range(min(5000, stalls - i))])
        path = h.path
    ss = SessionStore(path)
    # three slots of many clients (test_export's records have a slot each: thousands of inferences)
    ss.add([WatchRecord("host", "eth0", f"198.18.1.{i % 200 + 2}", "198.18.0.1", 900.0 * (1_000_000 + i % 3),
                        900.0, 600.0, 12.5) for i in range(sessions)], time.time())
    ss.close()
    Outbox(path, "eth0", "edge-v2").close()  # the outbox columns and uuid, as the exporter adds them
    return path


def test_batch_messages_group_records_of_one_subject(tmp_path: Path) -> None:
    """The exporter's v2 messages: consecutive records of one subject, at most N each, the
    records byte for byte their v1 messages, an id that names exactly the records it holds."""
    path = history(tmp_path, 250, 30)
    ob = Outbox(path, "eth0", "edge-v2")
    waiting = ob.take(1000)
    ob.close()
    ex = Exporter(path, "eth0", "edge-v2", ["nats://127.0.0.1:1"], records_per_msg=100)
    msgs = ex._messages(waiting, 1 << 20)
    text = {(w.table, r): p for w in waiting for r, p in zip(w.rows, w.payloads, strict=True)}
    assert [len(m.rows) for m in msgs] == [100, 100, 50, 30]  # stalls, then sessions
    assert [m.subject for m in msgs] == ["iqn.stalls.edge-v2"] * 3 + ["iqn.sessions.edge-v2"]
    for m in msgs:
        body = json.loads(m.payload)
        assert (body["v"], body["type"], body["id"], body["router"]) == (2, "batch", m.msg_id, "edge-v2")
        records = ",".join(text[m.table, r] for r in m.rows)
        assert m.payload.endswith(f'"records":[{records}]}}'.encode())
        assert body["records"] == [json.loads(text[m.table, r]) for r in m.rows]
        kind = body["records"][0]["type"]
        assert m.msg_id.startswith(f"edge-v2/{ob.uuid}/{kind}/{m.rows[0]}-{m.rows[-1]}/")
    # the same records give the same id (a re-send is de-duplicated by JetStream) ...
    assert [m.msg_id for m in ex._messages(waiting, 1 << 20)] == [m.msg_id for m in msgs]
    stalls = waiting[0]

    def some(keep: range | list[int]) -> list[Waiting]:
        return [Waiting(stalls.table, stalls.kind, stalls.subject, stalls.prefix,
                        [stalls.rows[i] for i in keep], [stalls.payloads[i] for i in keep])]

    # ... other records between the same first and last row another one
    assert ex._messages(some([0, *range(2, 100)]), 1 << 20)[0].msg_id != msgs[0].msg_id
    # a message stays under half the server's max_payload
    small = ex._messages(some(range(250)), 4000)
    assert all(len(m.payload) <= 2000 + 600 for m in small) and sum(len(m.rows) for m in small) == 250
    one = Exporter(path, "eth0", "edge-v2", ["nats://127.0.0.1:1"])._messages(some(range(3)), 1 << 20)
    assert [(m.msg_id, m.payload) for m in one] == [(stalls.msg_id(i), stalls.payloads[i].encode())
                                                    for i in range(3)]  # v1: as before


def test_service_decodes_batches_record_by_record(tmp_path: Path) -> None:
    """A v2 batch gives one decoded record per element; a bad element is rejected alone (its own
    JSON kept), a bad batch as a whole; a batch's records go into the store idempotently, also
    when a re-send regroups them."""
    topo = tmp_path / "topo.json"
    topo.write_text(json.dumps(TOPO))
    dec = Decoder(load_topology(topo))
    good = [json.loads(json.dumps({"v": 1, "type": "session", "id": f"r/h/session/{i}", "router": "r",
                                   "interface": "eth0", "client.address": "198.18.1.7",
                                   "server.address": "198.18.0.1", "iqn.slot": 900.0, "iqn.slot_s": 900.0,
                                   "iqn.watched_s": 100.0, "iqn.stalled_s": 4.0, "iqn.recorded_at": 1000.0}))
            for i in range(4)]
    bad = {**good[0], "id": "r/h/session/99", "client.address": "10.9.9.9"}  # no prefix matches

    def batch(bid: str, recs: list[object]) -> bytes:
        return json.dumps({"v": 2, "type": "batch", "id": bid, "router": "r", "records": recs}).encode()

    got = dec.decode_message(batch("b1", [good[0], good[1], bad, 7]), "IQN/seq/1")
    assert [d.id for d in got] == ["r/h/session/0", "r/h/session/1", "r/h/session/99", "b1#3"]
    assert [d.error is None for d in got] == [True, True, False, False]
    assert "attaches to no component" in (got[2].error or "") and json.loads(got[2].raw or b"") == bad
    assert got[0].line is not None and got[0].line.path == ("srv", "core", "net-a") and got[0].line.m == 96
    for raw, why in [(batch("b2", []), "'records' must be a non-empty list"),
                     (json.dumps({"v": 2, "type": "batch", "records": good}).encode(), "no 'id'"),
                     (batch("b3", [{**good[0], "v": 2}]), "a record inside a batch must be v1")]:
        (d,) = dec.decode_message(raw, "IQN/seq/2")
        assert d.error is not None and why in d.error, (raw, d)
    assert dec.decode(batch("b4", good[:2]), "IQN/seq/3").error is not None  # decode(): one record only
    with Store(":memory:") as st:
        first = dec.decode_message(batch("b5", [good[0], good[1], bad]))
        a = st.ingest(first, [b""] * len(first), 1.0)
        # a re-send after a crash, grouped differently: two old records, two new
        second = dec.decode_message(batch("b6", good[1:] + [good[0]]))
        b = st.ingest(second, [b""] * len(second), 2.0)
        assert (len(a.lines), len(a.rejected), len(b.lines), b.duplicates) == (2, 1, 2, 2)
        assert st.counts()["records"] == 5 and st.counts()["lines"] == 4 and st.counts()["rejected"] == 1
        (raw,) = st.con.execute("SELECT raw FROM rejected").fetchone() or (None,)
        assert json.loads(raw) == bad


def test_batched_export_and_service_sigkilled_each_record_once(tmp_path: Path) -> None:
    """History -> exporter (v2 batches of 50) -> JetStream -> ``iqn-qos serve`` -> DuckDB, with
    the exporter SIGKILLed mid-export, half of what it had marked unmarked again (what a kill
    between JetStream's acknowledgement and the marks leaves), a new exporter with batches of 37
    (so those records reach the stream again in other batches), then the service SIGKILLed in
    the middle of the stream and restarted: every record is in DuckDB exactly once."""
    n_stalls, n_sessions = 12_000, 1_500
    path = history(tmp_path, n_stalls, n_sessions)
    want = wanted(path, "edge-v2")
    assert len(want) == n_stalls + n_sessions
    topo = tmp_path / "topo.json"
    topo.write_text(json.dumps(TOPO))
    store = tmp_path / "qos.duckdb"
    with JetStream.start(1, tmp_path / "js") as js:
        exp = subprocess.Popen([PY, "-c", EXPORTER, str(path), json.dumps(js.urls), "50"],
                               stdout=subprocess.PIPE, text=True)
        svc = svc2 = None
        try:
            wait_for("the exporter to be under way", lambda: 0 < unmarked(path) <= len(want) - 1024,
                     timeout=120)
            exp.kill()
            assert exp.wait(30) == -signal.SIGKILL
            with sqlite3.connect(path) as con:  # marked, but as if the kill came before the marks
                con.execute("UPDATE stalls SET exported_at = NULL"
                            " WHERE id % 2 = 0 AND exported_at IS NOT NULL")
            ex = Exporter(path, "eth0", "edge-v2", js.urls, records_per_msg=37).start()
            try:
                wait_for("the new exporter to drain the history", lambda: unmarked(path) == 0, timeout=120)
            finally:
                ex.stop()
            # one message (<= 50 records) a pull: the service is found in the middle of the stream
            svc = start_service(js.urls, topo, store, tmp_path / "serve.log", "--batch", "1")
            wait_for("the service to be under way",
                     lambda: 0 < svc.api()["ingest"]["records"].get("stall", 0) < n_stalls // 2, timeout=120)
            assert svc.stop(signal.SIGKILL) == -signal.SIGKILL
            svc2 = start_service(js.urls, topo, store, tmp_path / "serve.log", "--batch", "100")
            # everything acknowledged (what the killed service held is re-delivered after the ack wait)
            wait_for("the stream to be consumed and the count to settle", settled(svc2), timeout=120)
        finally:
            if exp.poll() is None:
                exp.kill()
                exp.wait(30)
            if svc2 is not None:
                assert svc2.stop() == 0
            elif svc is not None:
                svc.stop(signal.SIGKILL)
        got = read_stream(js)
    in_stream = [r["id"] for _, _, body in got["msgs"] for r in body["records"]]
    assert all(body["v"] == 2 for _, _, body in got["msgs"])
    assert set(in_stream) == want
    assert len(in_stream) > len(want)  # some records did reach the stream twice, in other batches
    con = duckdb.connect(str(store), read_only=True)
    rec = con.execute("SELECT count(*), count(DISTINCT id) FROM records").fetchone()
    stalls = con.execute("SELECT count(*), count(DISTINCT id) FROM stalls").fetchone()
    lines = con.execute("SELECT count(*), count(DISTINCT id) FROM lines").fetchone()
    ids = {r[0] for r in con.execute("SELECT id FROM records").fetchall()}
    rejected = con.execute("SELECT count(*) FROM rejected").fetchone()
    con.close()
    assert rec == (len(want), len(want)) and ids == want
    assert stalls == (n_stalls, n_stalls) and lines == (n_sessions, n_sessions)
    assert rejected == (0,)


def settled(svc: Any) -> Callable[[], bool]:
    """A check for ``wait_for``: the consumer has nothing pending and the stored count stood
    still over a second."""
    last = [-1]

    def check() -> bool:
        a = svc.api()["ingest"]
        n = sum(a["records"].values())
        done = a["lag"] == 0 and a["ack_pending"] == 0 and n == last[0]
        last[0] = n
        time.sleep(1.0)
        return bool(done)

    return check
