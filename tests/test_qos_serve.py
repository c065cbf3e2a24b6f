"""``iqn-qos serve`` against a real nats-server: schema-v1 messages published with
nats-py (as an agent's export does) become media lines in DuckDB once each, the
injected faulty component comes out on top (JSON API, ``iqn-qos components``,
``/metrics``, the web page in a real headless Chromium), and a service killed
with SIGKILL mid-ingest resumes from its durable consumer with every record
stored exactly once.  The sans-I/O parts (decoding, the slot planner, the
store's idempotent batch) are tested directly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pytest
from conftest import need
from hypothesis import example, given, settings
from hypothesis import strategies as st
from qos_feed import publish, scenario, session, stall

from iqn_lab.jetstream import JetStream, free_port
from iqn_qos.errors import QosError
from iqn_qos.from_agent import read_sessions
from iqn_qos.ingest import Decoder, SlotPlanner, session_line
from iqn_qos.lines import MediaLine
from iqn_qos.store import Store
from iqn_qos.topology import load_topology, topology_from_dict

IQN_QOS = str(Path(sys.executable).with_name("iqn-qos"))
DEADLINE = 60.0  # seconds to wait for anything the service must do; generous on a loaded box
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting {timeout:g} s for {what}")
        time.sleep(0.2)
    return got


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@dataclass
class Served:
    proc: subprocess.Popen[str]
    url: str
    log: Path

    def api(self) -> dict[str, Any]:
        return dict(get_json(self.url + "/api/components"))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)


def start_service(urls: list[str], topo: Path, store: Path, log: Path, *extra: str,
                  prefix: tuple[str, ...] = ()) -> Served:
    """``iqn-qos serve`` as a subprocess; returns once it prints where it listens."""
    port = free_port()
    argv = [*prefix, IQN_QOS, "serve", *[a for u in urls for a in ("--nats", u)], "--topology", str(topo),
            "--store", str(store), "--listen", f"127.0.0.1:{port}", *extra]
    with log.open("a") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the service prints this line once consuming and serving
    if "listening on" not in line:
        proc.kill()
        pytest.fail(f"iqn-qos serve did not start: {line!r}; log: {log.read_text()[-800:]}")
    m = re.search(r"http://[^/\s]+:(\d+)/", line)
    assert m is not None
    return Served(proc, f"http://127.0.0.1:{m.group(1)}", log)


# -- sans-I/O -----------------------------------------------------------------------------


TOPO = {"components": [{"id": "srv", "kind": "server"}, {"id": "core", "kind": "router"},
                       {"id": "net-a", "kind": "subnet"}],
        "edges": [["srv", "core"], ["core", "net-a"]],
        "attach": [{"prefix": "10.1.0.0/16", "node": "net-a"}, {"prefix": "192.0.2.1/32", "node": "srv"}]}


@pytest.fixture
def topo_file(tmp_path: Path) -> Path:
    p = tmp_path / "topo.json"
    p.write_text(json.dumps(TOPO))
    return p


def test_session_message_makes_the_same_line_as_from_agent(topo_file: Path, tmp_path: Path) -> None:
    """One mapping: a sessions row read by ``from-agent`` and the same record as an export
    message decoded by the service give the same media line."""
    import sqlite3

    db = tmp_path / "stalls.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE sessions (id INTEGER PRIMARY KEY, v INTEGER, router TEXT, iface TEXT,"
                " client TEXT, server TEXT, slot REAL, slot_s REAL, watched_s REAL, stalled_s REAL,"
                " recorded_at REAL)")
    con.execute("INSERT INTO sessions VALUES (1, 1, 'r0', 'eth0', '10.1.2.3', '192.0.2.1', 1800, 900,"
                " 612.4, 37.6, 2702)")
    con.commit()
    con.close()
    topo = load_topology(topo_file)
    (row_line,) = read_sessions(db, None, topo)
    msg = session("r0", 1, "10.1.2.3", "192.0.2.1", 1800.0, 900.0, 612.4, 37.6)
    d = Decoder(topo).decode(json.dumps(msg).encode())
    assert d.error is None and d.id == "r0/h0/session/1"
    assert d.line == row_line == MediaLine(1800.0, ("srv", "core", "net-a"), 612, 574, "10.1.2.3",
                                           "192.0.2.1", "r0", "iqn")


def test_bad_messages_are_rejected_with_a_reason(topo_file: Path) -> None:
    dec = Decoder(load_topology(topo_file))
    good = session("r0", 1, "10.1.2.3", "192.0.2.1", 0.0, 900.0, 10.0, 1.0)
    cases = {
        b"{not json": "not JSON",
        b"[1, 2]": "not a JSON object",
        json.dumps({**good, "v": 3}).encode(): "newer than this iqn-qos reads",
        json.dumps({**good, "v": 2}).encode(): "a schema-v2 message is a 'batch' of v1 records",
        json.dumps({**good, "iqn.stalled_s": 11.0}).encode(): "bad watched/stalled",
        json.dumps({**good, "client.address": "172.31.0.1"}).encode(): "attaches to no component",
        json.dumps({**good, "type": "gossip"}).encode(): "unknown message type",
        json.dumps({k: v for k, v in good.items() if k != "id"}).encode(): "no 'id'",
    }
    for raw, why in cases.items():
        d = dec.decode(raw, "IQN/seq/7")
        assert d.error is not None and why in d.error, (raw, d)
        assert d.id in ("IQN/seq/7", good["id"])
    quiet = dec.decode(json.dumps({**good, "iqn.watched_s": 0.4, "iqn.stalled_s": 0.0}).encode())
    assert quiet.error is None and quiet.line is None  # under half a second watched: no line
    st = dec.decode(json.dumps(stall("r0", 3, "10.1.2.3", "192.0.2.1", 100.0, 102.5)).encode())
    assert st.error is None and st.stall is not None and st.stall.duration_s == 2.5


_ODD_VALUES = [0, 1, 2, -1, 0.4, 0.5, 1.5, 2.5, 900, 1e308, 1.7976931348623157e308, True, False, None, "7",
               "", [], {}, "10.1.2.3", "192.0.2.1", "172.31.0.1", "r0", 2]
_FIELDS = ["v", "type", "id", "router", "client.address", "server.address", "iqn.slot", "iqn.watched_s",
           "iqn.stalled_s", "iqn.recorded_at"]


@settings(max_examples=300, deadline=None)
@example([[("type", "<del>")]], True)  # a batch's record without a type (found by this test once)
@example([[("type", "<del>")]], False)
@example([[("iqn.slot", 1e308), ("iqn.watched_s", 1e308)]], True)  # finite numbers, an infinite sum
@example([[("iqn.stalled_s", 900)]], True)  # stalled > watched
@example([[("v", True)]], False)
@given(st.lists(st.lists(st.tuples(st.sampled_from(_FIELDS), st.sampled_from(_ODD_VALUES) | st.just("<del>")),
                         max_size=2), min_size=1, max_size=4),
       st.booleans())
def test_fast_decode_accepts_and_rejects_what_the_general_path_does(
        edits: list[list[tuple[str, object]]], batched: bool) -> None:
    """The msgspec fast path (a message of well-formed session records) and the general path
    (orjson, record by record) give the same records, lines, rejections and reasons, whatever
    odd values (bools, strings, huge or negative numbers, missing fields) the records carry."""
    import iqn_qos.ingest as ingest

    topo = topology_from_dict(TOPO)
    recs = []
    for i, ed in enumerate(edits):
        r: dict[str, object] = session("r0", i, "10.1.2.3", "192.0.2.1", 1800.0, 900.0, 612.4, 37.6)
        for k, v in ed:
            if v == "<del>":
                r.pop(k, None)
            else:
                r[k] = v
        recs.append(r)
    data = (json.dumps({"v": 2, "type": "batch", "id": "b", "router": "r0", "records": recs}).encode()
            if batched else json.dumps(recs[0]).encode())
    fast = Decoder(topo).decode_message(data, "IQN/seq/1")
    saved = ingest._fast_decoder
    try:
        ingest._fast_decoder = None
        general = Decoder(topo).decode_message(data, "IQN/seq/1")
    finally:
        ingest._fast_decoder = saved
    assert fast == general
    if not any(ed for ed in edits):  # untouched records do take the fast path
        assert not Decoder(topo).decode_columns([data], ["IQN/seq/1"]).others


def test_addresses_are_read_as_ipaddress_reads_them() -> None:
    """The decoder's fast address parser (inet_pton) takes only canonical dotted quads and
    hands everything else to ipaddress: same values, same refusals."""
    import ipaddress

    from iqn_qos.topology import _parse_ip

    for a in ("10.1.2.3", "0.0.0.0", "255.255.255.255", "::1", "2001:db8::7", "::ffff:10.1.2.3"):
        ip = ipaddress.ip_address(a)
        assert _parse_ip(a) == (ip.version, int(ip)), a
    for bad in ("010.1.2.3", "10.1.2", "10.1.2.256", "1", " 10.1.2.3", "10.1.2.3\x00", ""):
        with pytest.raises(QosError, match="bad address"):
            _parse_ip(bad)


def test_slot_planner_infers_closed_dirty_slots_once() -> None:
    pl = SlotPlanner(slot_s=60, grace_s=5)
    ln = [MediaLine(t, ("a",), 10, 9) for t in (0.0, 30.0, 61.0)]
    pl.added(ln)
    assert pl.due(64.9) == []  # slot 0 ends at 60, closes at 65
    assert pl.due(65.0) == [0.0]
    assert pl.due(66.0) == []  # inferred: no longer dirty
    assert pl.next_due(66.0) == pytest.approx(59.0)  # slot 60 closes at 125
    pl.added([MediaLine(10.0, ("a",), 5, 5)])  # a late line re-opens slot 0
    assert pl.due(200.0) == [0.0, 60.0]
    with pytest.raises(QosError):
        SlotPlanner(slot_s=0, grace_s=1)


def test_store_ingest_is_idempotent_on_ids(topo_file: Path) -> None:
    dec = Decoder(load_topology(topo_file))
    msgs = [json.dumps(session("r0", i, "10.1.2.3", "192.0.2.1", 0.0, 900.0, 100.0, 3.0)).encode()
            for i in range(5)]
    raw = [*msgs, msgs[1], b"oops"]  # a duplicate inside the batch and a bad message
    with Store(":memory:") as st:
        got = st.ingest([dec.decode(r, f"IQN/seq/{i}") for i, r in enumerate(raw)], raw, 1.0)
        assert (len(got.lines), len(got.rejected), got.duplicates, got.types) == (5, 1, 1, {"session": 5})
        again = st.ingest([dec.decode(r, f"IQN/seq/{i}") for i, r in enumerate(raw)], raw, 2.0)
        assert (len(again.lines), len(again.rejected), again.duplicates) == (0, 0, 7)
        assert st.counts()["records"] == 6 and st.counts()["lines"] == 5 and st.counts()["rejected"] == 1


def _mixed_messages() -> list[bytes]:
    """Messages of every kind the service meets: v2 batches of well-formed sessions (the fast
    way), one with a bad record and one with an unplaceable address (the general way, record by
    record), v1 sessions (one with nothing watched), a stall, a record twice in the batch (alone
    and inside a batch), not JSON."""
    def s(i: int, watched: float = 900.0, client: str = "10.1.2.3") -> dict[str, Any]:
        return session("r0", i, client, "192.0.2.1", 1800.0 + 900 * (i % 3), 900.0, watched,
                       min(watched, 3.0 * (i % 4)))

    def batch(bid: str, recs: list[dict[str, Any]]) -> bytes:
        return json.dumps({"v": 2, "type": "batch", "id": bid, "router": "r0", "records": recs}).encode()

    bad = {**s(21), "iqn.watched_s": "lots"}
    return [batch("b1", [s(i) for i in range(10)]), batch("b2", [s(i) for i in range(10, 15)] + [bad]),
            json.dumps(s(30)).encode(), json.dumps(s(31, watched=0.2)).encode(),
            json.dumps(stall("r0", 40, "10.1.2.3", "192.0.2.1", 100.0, 103.5)).encode(),
            json.dumps(s(3)).encode(),  # a record of b1 again
            batch("b3", [s(50), s(51, client="172.16.0.1")]),  # 172.16/12 attaches nowhere
            batch("b4", [s(60), s(60)]),  # twice in one message
            b"oops"]


def test_columns_store_what_records_store(topo_file: Path) -> None:
    """A batch decoded into columns (the service's path) and stored with ``ingest_columns`` leaves
    the same rows and the same counts as the record-by-record path, also when the batch comes
    again (a re-delivery: every record a duplicate) and after a part of it was stored."""
    topo = load_topology(topo_file)
    msgs = _mixed_messages()
    ids = [f"IQN/seq/{i}" for i in range(len(msgs))]
    tables = ("SELECT id, type, router FROM records ORDER BY id",
              "SELECT l.t, p.path, l.n, l.m, l.client, l.server, l.router, l.kind, l.id FROM lines l"
              " JOIN paths p ON p.id = l.path_id ORDER BY l.id",
              "SELECT * FROM stalls ORDER BY id",
              "SELECT id, type, router, reason, raw FROM rejected ORDER BY id")

    def summary(got: Any) -> tuple[Any, ...]:
        return (got.nlines, sorted(d.id for d in got.rejected), got.empty, got.duplicates, got.types,
                got.stalls)

    with Store(":memory:") as by_rows, Store(":memory:") as by_cols:
        dec = Decoder(topo)
        cols = Decoder(topo).decode_columns(msgs, ids)
        assert len(cols.id) == 10 + 1 + 1 + 1 + 2  # b1, s(30), s(31), s(3) again, b4 (general: b2, b3)
        assert len(cols) == sum(len(dec.decode_message(m, i)) for m, i in zip(msgs, ids, strict=True))
        batches = [msgs, msgs, msgs[2:6]]
        for k, part in enumerate(batches):
            pids = ids[:len(part)]
            recs = [(d, m) for m, i in zip(part, pids, strict=True) for d in dec.decode_message(m, i)]
            a = by_rows.ingest([d for d, _ in recs], [m for _, m in recs], float(k))
            b = by_cols.ingest_columns(Decoder(topo).decode_columns(part, pids), float(k))
            assert summary(a) == summary(b), k
            if k == 0:
                assert b.duplicates == 2 and b.types == {"session": 19, "stall": 1} and b.empty == 1
                assert {d.id for d in b.rejected} == {"r0/h0/session/21", "r0/h0/session/51", "IQN/seq/8"}
            else:
                assert b.nlines == 0 and b.duplicates == len(recs)
        for q in tables:
            assert by_rows.con.execute(q).fetchall() == by_cols.con.execute(q).fetchall(), q
        assert by_cols.counts()["lines"] == 18


def test_store_keeps_paths_exactly(tmp_path: Path) -> None:
    """Each distinct path is stored once (``paths``) and named by id from the lines: every line
    comes back with its own path (also ids holding odd characters, and the same components in
    another order, which is another path), after reopening the file too; a batch that failed
    leaves no path numbered that is not in the table."""
    from iqn_qos.ingest import Decoded, StallRow

    paths = [("srv", "a>b", "net-a"), ("odd\x1fid", "net-a"), ("net-a", "a>b", "srv"),
             ("srv", "a>b", "net-a")]
    lines = [MediaLine(float(i), p, 10 + i, 9, "10.1.2.3", "192.0.2.1", "r0", "iqn")
             for i, p in enumerate(paths)]
    db = tmp_path / "paths.duckdb"
    with Store(db) as st:
        got = st.ingest([Decoded(f"r0/h/session/{i}", "session", "r0", line=ln)
                         for i, ln in enumerate(lines)], [b"{}"] * len(lines), 1.0)
        assert got.lines == lines
        assert st.lines_in(0.0, 900.0) == lines
        assert st.con.execute("SELECT count(*) FROM paths").fetchone() == (3,)
        st.con.execute("DROP TABLE stalls")  # the next batch fails at its stall (reopening makes it again)
        stall_row = StallRow("r0", "eth0", "10.1.2.3", "192.0.2.1", 1.0, 2.0, 1.0, 3, "stalled", 2.0)
        bad = MediaLine(5.0, ("never", "stored"), 1, 1)
        with pytest.raises(QosError, match="cannot store a batch"):
            st.ingest([Decoded("r0/h/session/9", "session", "r0", line=bad),
                       Decoded("r0/h/stall/1", "stall", "r0", stall=stall_row)], [b"{}", b"{}"], 2.0)
        assert st.lines_in(0.0, 900.0) == lines
        st.add_lines([bad])  # numbered anew after the failed batch, in the table this time
        assert st.lines_in(0.0, 900.0) == [*lines, bad]
    with Store(db) as st:
        assert st.lines_in(0.0, 900.0) == [*lines, bad]
        assert st.con.execute("SELECT count(*), max(id) FROM paths").fetchone() == (4, 3)


def test_store_from_before_paths_is_migrated(tmp_path: Path) -> None:
    """A store written with a list column per line (before ``paths``) opens with its lines
    unchanged and the same answer for its slot."""
    import random

    rnd = random.Random(3)
    comps = ["s1", "s2", "a", "b", "c", "n1", "n2", "n3"]
    lines = [MediaLine(float(i), (rnd.choice(comps[:2]), rnd.choice(comps[2:5]), rnd.choice(comps[5:])),
                       100, rnd.choice([100, 100, 100, 90]), "10.1.2.3", "192.0.2.1", "r0", "iqn")
             for i in range(300)]
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE lines (t DOUBLE NOT NULL, path VARCHAR[] NOT NULL, n BIGINT NOT NULL,"
                " m BIGINT NOT NULL, client VARCHAR, server VARCHAR, router VARCHAR, kind VARCHAR)")
    con.executemany("INSERT INTO lines VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(ln.t, list(ln.path), ln.n, ln.m, ln.client, ln.server, ln.router, ln.kind)
                     for ln in lines])
    con.close()
    with Store(":memory:") as fresh:
        fresh.add_lines(lines)
        want = fresh.infer(0.0, 900.0, l1=1e-4)
    with Store(db) as st:
        assert sorted(st.lines_in(0.0, 900.0), key=lambda ln: ln.t) == lines
        assert st.infer(0.0, 900.0, l1=1e-4) == want
        assert st.con.execute("SELECT count(*) FROM paths").fetchone() == (len({ln.path for ln in lines}),)
        q = ("SELECT column_name FROM information_schema.columns WHERE table_name = 'lines'"
             " ORDER BY ordinal_position")
        cols = [r[0] for r in st.con.execute(q).fetchall()]
        assert cols == ["t", "path_id", "n", "m", "client", "server", "router", "kind", "id"]


def test_session_line_rejects_nonsense() -> None:
    with pytest.raises(QosError, match="bad watched/stalled"):
        session_line("r", "10.1.2.3", "192.0.2.1", 0.0, 5.0, 6.0)
    with pytest.raises(QosError, match="bad slot"):
        session_line("r", "10.1.2.3", "192.0.2.1", float("nan"), 5.0, 1.0)


# -- the live service ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One broker, a relay-bug scenario (two relays at 5 %) published with nats-py, one service."""
    base = tmp_path_factory.mktemp("serve")
    topo, msgs, injected = scenario(base, "relay-bug", slots=2, lines_per_slot=1500)
    assert len(injected) == 2
    c0, s0 = msgs[0]["client.address"], msgs[0]["server.address"]
    extra: list[Any] = [stall("r0", i, c0, s0, 1700006500.0 + i, 1700006502.0 + i) for i in range(3)]
    extra.append(b'{"v": 1, "type": "session"')  # truncated JSON: rejected, kept, acknowledged
    with JetStream.start(1, base / "js") as js:
        svc = start_service(js.urls, topo, base / "qos.duckdb", base / "serve.log")
        try:
            asyncio.run(publish(js.urls, [*msgs, *extra]))
            asyncio.run(publish(js.urls, msgs[:500]))  # re-sent within the dedup window: not stored twice
            api = wait_for(lambda: (a := svc.api())["ingest"]["records"]["session"] >= len(msgs)
                           and len(a["slots"]) == 2 and a, "every session stored and both slots inferred")
            yield {"svc": svc, "msgs": msgs, "injected": injected, "api": api, "topo": topo, "base": base}
        finally:
            svc.stop()


def test_service_ranks_the_injected_faults_first(served: dict[str, Any]) -> None:
    api, injected = served["api"], served["injected"]
    top = [c["name"] for c in api["components"][:2]]
    assert set(top) == injected, api["components"][:4]
    assert all(c["faulty"] for c in api["components"][:2])
    assert not any(c["faulty"] for c in api["components"][2:]), [c["name"] for c in api["components"] if
                                                                 c["faulty"]]
    assert api["ingest"]["records"] == {"session": len(served["msgs"]), "stall": 3}
    assert api["ingest"]["rejected"] == 1
    # the command line against the running service
    out = subprocess.run([IQN_QOS, "components", "--service", served["svc"].url, "--json", "--top", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert {json.loads(x)["component"] for x in out.stdout.splitlines()} == injected


def test_predict_against_the_service(served: dict[str, Any]) -> None:
    bad = next(iter(sorted(served["injected"])))
    m = next(m for m in served["msgs"] if bad in load_topology(served["topo"]).resolve(
        m["client.address"], m["server.address"]))
    out = subprocess.run([IQN_QOS, "predict", "--service", served["svc"].url, "--client", m["client.address"],
                          "--server", m["server.address"], "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    fc = json.loads(out.stdout)
    assert bad in fc["path"] and fc["p"] > 0.03, fc
    miss = subprocess.run([IQN_QOS, "predict", "--service", served["svc"].url, "--path", "no-such-thing"],
                          capture_output=True, text=True, timeout=60)
    assert miss.returncode == 2 and "unknown component 'no-such-thing'" in miss.stderr


def test_metrics_name_the_faulty_component(served: dict[str, Any]) -> None:
    with urllib.request.urlopen(served["svc"].url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for bad in served["injected"]:
        pat = r'^iqn_qos_component_faulty\{component="' + re.escape(bad) + r'",kind="relay-server"\} (\S+)$'
        m = re.search(pat, text, re.M)
        assert m is not None and float(m.group(1)) == 1.0, bad
    n = len(served["msgs"])
    assert re.search(r'^iqn_qos_ingest_records_total\{type="session"\} ' + f"{n}" + r"\.0$", text, re.M)
    assert re.search(r"^iqn_qos_ingest_rejected_total 1\.0$", text, re.M)
    assert re.search(r"^iqn_qos_last_slot_inferred_timestamp_seconds ", text, re.M)
    promtool = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    need(promtool.returncode != 127, "needs promtool (Debian's prometheus)")
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr


def test_web_page_in_chromium_shows_the_fault_on_top(served: dict[str, Any]) -> None:
    """The page, loaded by a real headless Chromium: its table's first rows are the injected
    components, and the heat map image loaded."""
    need(Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists(),
         "needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    from user_agent.browser import CHROMEDRIVER, chromium_options

    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER),
                              options=chromium_options(["--headless=new", "--disable-gpu"]))
    try:
        driver.get(served["svc"].url + "/")
        rows = wait_for(lambda: driver.execute_script(
            "return Array.from(document.querySelectorAll('#components tbody tr'))"
            ".map(r => [r.dataset.component, r.className])") or None, "the components table to fill")
        assert {r[0] for r in rows[:2]} == served["injected"], rows[:4]
        assert all(r[1] == "faulty" for r in rows[:2])
        wait_for(lambda: driver.execute_script(
            "const i = document.getElementById('heat'); return i.complete && i.naturalWidth > 100"),
            "the heat map to load")
    finally:
        driver.quit()


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{d}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
    return out


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.parametrize("pullers", ["0", "3"])
def test_service_resumes_after_sigkill_and_stores_each_record_once(tmp_path: Path, pullers: str) -> None:
    """SIGKILL the service while it ingests, start it again on the same store and durable
    consumer: every record is stored exactly once (counted by id); pulling in the service's
    process and with puller processes (their batches in hand, stored or not, die with it)."""
    topo, msgs, _ = scenario(tmp_path, "healthy", slots=3, lines_per_slot=8000, components=400, seed=5)
    store = tmp_path / "qos.duckdb"
    with JetStream.start(1, tmp_path / "js") as js:
        asyncio.run(publish(js.urls, msgs))  # the backlog waits in the stream
        svc = start_service(js.urls, topo, store, tmp_path / "serve.log", "--batch", "500",
                            "--pullers", pullers)
        mid = wait_for(lambda: 0 < (n := svc.api()["ingest"]["records"]["session"]) < len(msgs) and n,
                       "ingestion to be under way", timeout=120)
        workers = children(svc.proc.pid)
        assert len(workers) >= 1 + int(pullers)  # the solver process and the pullers, started with it
        assert svc.stop(signal.SIGKILL) == -signal.SIGKILL
        # and it does not outlive the killed service
        try:
            wait_for(lambda: not any(proc_state(w) not in ("gone", "Z") for w in workers),
                     "the killed service's solver and puller processes to end", timeout=30)
        finally:
            for w in workers:  # what a failure left behind
                with contextlib.suppress(OSError):
                    os.kill(w, signal.SIGKILL)
        svc2 = start_service(js.urls, topo, store, tmp_path / "serve.log", "--batch", "500",
                             "--pullers", pullers)
        try:
            # the restarted service counts only what it stored itself (the rest of the stream):
            # wait until the consumer has nothing left and the count stands still
            # (the batch the killed service had in hand is re-delivered after the ack wait, 10 s)
            wait_for(lambda: (a := svc2.api()["ingest"])["lag"] == 0 and a["ack_pending"] == 0
                     and a["records"]["session"] > 0, "the rest of the stream to be acknowledged",
                     timeout=120)
            last = [-1]

            def settled() -> bool:
                n = svc2.api()["ingest"]["records"]["session"]
                done, last[0] = n == last[0], n
                time.sleep(1.0)
                return done

            wait_for(settled, "the stored count to settle")
        finally:
            assert svc2.stop() == 0
    con = duckdb.connect(str(store), read_only=True)
    ids = {m["id"] for m in msgs}
    rec = con.execute("SELECT count(*), count(DISTINCT id) FROM records").fetchone()
    lines = con.execute("SELECT count(*), count(DISTINCT id) FROM lines").fetchone()
    stored = {r[0] for r in con.execute("SELECT id FROM lines").fetchall()}
    con.close()
    assert rec == (len(ids), len(ids))
    assert lines == (len(ids), len(ids))
    assert stored == ids
    assert mid < len(msgs)
    assert os.path.getsize(tmp_path / "serve.log") > 0


def test_several_pullers_store_each_record_once(tmp_path: Path) -> None:
    """Three puller processes on one durable consumer: v2 batches and, sent again as v1 messages
    under other message ids (so JetStream does not drop them), every seventh record: each record
    is stored exactly once and the re-sent ones are counted as duplicates. How the work was
    shared between the pullers is not asserted."""
    topo, msgs, _ = scenario(tmp_path, "healthy", slots=2, lines_per_slot=6000, components=300, seed=11)
    batches = [json.dumps({"v": 2, "type": "batch", "id": f"r0/b/{k}", "router": "r0",
                           "records": msgs[k:k + 50]}).encode() for k in range(0, len(msgs), 50)]
    again = msgs[::7]
    store = tmp_path / "qos.duckdb"
    with JetStream.start(1, tmp_path / "js") as js:
        asyncio.run(publish(js.urls, [*batches, *again]))
        svc = start_service(js.urls, topo, store, tmp_path / "serve.log", "--batch", "20", "--pullers", "3")
        try:
            assert len(children(svc.proc.pid)) >= 4  # three pullers and the solver
            got = wait_for(lambda: (a := svc.api()["ingest"])["lag"] == 0 and a["ack_pending"] == 0
                           and a["records"].get("session", 0) == len(msgs) and a, "the stream to be stored")
            assert got["duplicates"] == len(again) and got["lines"] == len(msgs) and got["rejected"] == 0
        finally:
            assert svc.stop() == 0
    con = duckdb.connect(str(store), read_only=True)
    rec = con.execute("SELECT count(*), count(DISTINCT id) FROM records").fetchone()
    lines = con.execute("SELECT count(*), count(DISTINCT id) FROM lines").fetchone()
    stored = {r[0] for r in con.execute("SELECT id FROM lines").fetchall()}
    con.close()
    assert rec == (len(msgs), len(msgs)) and lines == (len(msgs), len(msgs))
    assert stored == {m["id"] for m in msgs}


def test_a_killed_puller_stops_the_service(tmp_path: Path) -> None:
    """A puller process that dies (SIGKILL) stops the service with a one-line error (a supervisor
    restarts it; what the puller held unacknowledged is re-delivered), and the service's other
    processes end with it."""
    topo, msgs, _ = scenario(tmp_path, "healthy", slots=1, lines_per_slot=500, components=200, seed=5)
    with JetStream.start(1, tmp_path / "js") as js:
        asyncio.run(publish(js.urls, msgs))
        svc = start_service(js.urls, topo, tmp_path / "qos.duckdb", tmp_path / "serve.log", "--pullers", "2")
        try:
            kids = children(svc.proc.pid)
            pullers = [k for k in kids if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text()]
            assert len(pullers) >= 3  # the solver and the two pullers
            wait_for(lambda: svc.api()["ingest"]["records"].get("session", 0) == len(msgs),
                     "the records stored")
            os.kill(max(pullers), signal.SIGKILL)  # a puller: started after the solver
            assert svc.proc.wait(30) == 2
        finally:
            svc.stop(signal.SIGKILL)
        log = (tmp_path / "serve.log").read_text()
        why = rf"iqn-qos: error: puller process [01] ended \(exit code -{int(signal.SIGKILL)}\)"
        assert re.search(why, log), log
        wait_for(lambda: all(proc_state(k) in ("gone", "Z") for k in kids), "the service's processes to end",
                 timeout=30)


def _requests_in(js: JetStream, seconds: float) -> int:
    """Messages the server's clients published in ``seconds`` (its /connz in_msgs, summed)."""
    n = js.nodes[0]

    def total() -> int:
        conns = get_json(f"http://{n.host}:{n.monitor_port}/connz?limit=1000").get("connections", [])
        return sum(int(c.get("in_msgs", 0)) for c in conns)

    before = total()
    time.sleep(seconds)
    return total() - before


@pytest.mark.parametrize("pullers", ["0", "2"])
def test_pulls_wait_while_the_consumer_has_no_leader(tmp_path: Path, pullers: str) -> None:
    """With no consumer to answer (its leader's node killed in a cluster, here: the durable
    consumer deleted) a pull request is answered at once with 503 No Responders. The service
    (each puller) then waits out the pull's expiry before the next one: it spun, sending tens of
    thousands of requests a second, and with 2 pullers took both CPUs of the box from the
    JetStream servers electing a new leader and from the agents' export (the localisation
    test's node kill: the last slot's lines came after it closed). Its pulls resume once the
    consumer is back."""
    import nats

    topo, msgs, _ = scenario(tmp_path, "healthy", slots=1, lines_per_slot=200, components=100, seed=3)
    store, log = tmp_path / "qos.duckdb", tmp_path / "serve.log"
    with JetStream.start(1, tmp_path / "js") as js:
        svc = start_service(js.urls, topo, store, log, "--pullers", pullers)
        try:
            idle = _requests_in(js, 2.0)  # pulls of 0.1 s each, and the idle consumer-info requests

            async def delete() -> None:
                nc = await nats.connect(js.urls)
                await nc.jetstream().delete_consumer("IQN", "iqn-qos")
                await nc.close()

            asyncio.run(delete())
            time.sleep(0.5)
            leaderless = _requests_in(js, 2.0)
            # a pull each expiry (0.1 s) per puller, as when idle: not one per round trip
            assert leaderless <= 2 * idle + 40, (idle, leaderless)
            assert svc.proc.poll() is None
        finally:
            assert svc.stop() == 0
        assert "no consumer iqn-qos answers pull requests (503" in log.read_text()
        # started again, the service makes the consumer again and stores what came meanwhile
        asyncio.run(publish(js.urls, msgs))
        svc = start_service(js.urls, topo, store, log, "--pullers", pullers)
        try:
            wait_for(lambda: svc.api()["ingest"]["records"].get("session", 0) == len(msgs), "the records")
        finally:
            assert svc.stop() == 0


def test_on_demand_inference_endpoint(served: dict[str, Any]) -> None:
    req = urllib.request.Request(served["svc"].url + "/api/infer", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=60) as r:
        got = json.loads(r.read())
    assert isinstance(got["inferred"], int) and got["inferred"] >= 0  # slots with new lines, if any
    assert got["last_slot"] == max(served["api"]["slots"])


def test_bad_serve_flags_are_one_line_errors(topo_file: Path, tmp_path: Path) -> None:
    cases = [
        (["--durable", "a.b"], "--durable must match"),
        (["--listen", "localhost:http"], "--listen: expected HOST:PORT"),
    ]
    for extra, why in cases:
        r = subprocess.run([IQN_QOS, "serve", "--nats", "nats://127.0.0.1:1", "--topology", str(topo_file),
                            "--store", str(tmp_path / "q.duckdb"), *extra], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("iqn-qos: error: ") and why in r.stderr, (extra, r)
        assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([IQN_QOS, "serve", "--nats", "nats://127.0.0.1:1", "--topology",
                        str(tmp_path / "none.yaml"), "--store", str(tmp_path / "q.duckdb")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "none.yaml" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([IQN_QOS, "components", "--service", f"http://127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach the service" in r.stderr


def test_a_slow_inference_does_not_hold_up_storing(tmp_path: Path) -> None:
    """Records arriving while a slot is being inferred (late records for a closed slot) are
    stored and acknowledged meanwhile: inference runs on its own thread, on a snapshot.  The
    inference here waits for the test's go, so storing that needed it would never finish."""
    import threading

    from iqn_qos.serve import ServeConfig, Service, run

    topo, msgs, _ = scenario(tmp_path, "relay-bug", slots=1, lines_per_slot=600, components=200, seed=7)
    first, late = msgs[:300], msgs[300:]
    started, release = threading.Event(), threading.Event()
    stored: set[str] = set()

    class HeldInference(Service):
        def infer_slots(self, due: Any, *args: Any) -> Any:
            started.set()
            release.wait(2 * DEADLINE)
            return super().infer_slots(due, *args)

    cfg = ServeConfig(nats=[], topology=topo, store=tmp_path / "qos.duckdb", port=0, batch=100)
    with JetStream.start(1, tmp_path / "js") as js:
        cfg = ServeConfig(**{**cfg.__dict__, "nats": js.urls})
        svc = HeldInference(cfg, on_stored=lambda batch, now: stored.update(batch.ids()))
        box: dict[str, Any] = {}

        def serve() -> None:
            async def main() -> None:
                box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
                await run(cfg, stop=box["stop"], service=svc)
            try:
                asyncio.run(main())
            except BaseException as e:  # reported by the assertions below
                box["error"] = e

        th = threading.Thread(target=serve, daemon=True)
        try:
            asyncio.run(publish(js.urls, first))
            th.start()
            wait_for(started.is_set, "the closed slot's inference to start")
            asyncio.run(publish(js.urls, late))  # late records for the slot being inferred
            wait_for(lambda: stored >= {m["id"] for m in msgs}, "the late records to be stored while the "
                     "inference is held")
            assert not release.is_set() and svc.counters.inferences == 0
            release.set()
            # the late lines dirtied the slot again: it is inferred again, and its stored
            # estimates are fresh for every line
            wait_for(lambda: svc.counters.inferences >= 2 and not svc.planner.dirty, "the slot re-inferred")
        finally:
            release.set()
            if "loop" in box:
                box["loop"].call_soon_threadsafe(box["stop"].set)
            th.join(DEADLINE)
        assert "error" not in box, box.get("error")
        slot = svc.store.slot_starts(cfg.slot_s)[0]
        assert svc.store.cached(slot, cfg.slot_s, cfg.threshold, cfg.l1) is not None  # fresh for all lines
        assert svc.store.counts()["lines"] == len(msgs)
        svc.close()
