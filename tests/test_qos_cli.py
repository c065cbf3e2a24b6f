"""``iqn-qos`` end to end, through a subprocess: infer, the store, predict, heatmap, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from iqn_qos.io import read_media_lines
from iqn_qos.lines import MediaLine, to_json
from iqn_qos.store import Store

TOPO = """\
components:
  - {id: wifi-1, kind: wireless-subnet}
  - {id: gw-1, kind: router}
  - {id: lan-1, kind: wired-subnet}
  - {id: paris, kind: city}
  - {id: lyon, kind: city}
  - {id: paris>lyon, kind: link}
  - {id: lyon>paris, kind: link}
  - {id: srv-a, kind: server}
  - {id: srv-c, kind: server}
edges:  # plain adjacency both ways; the links are directed components
  - [srv-a, paris]
  - [paris, srv-a]
  - [srv-c, lyon]
  - [lyon, srv-c]
  - [paris, gw-1]
  - [gw-1, paris]
  - [gw-1, wifi-1]
  - [wifi-1, gw-1]
  - [lyon, lan-1]
  - [lan-1, lyon]
  - {from: paris, to: lyon, via: paris>lyon}
  - {from: lyon, to: paris, via: lyon>paris}
attach:
  - {prefix: 10.1.0.0/16, node: wifi-1}
  - {prefix: 10.2.0.0/16, component: lan-1}
  - {prefix: 192.0.2.1/32, node: srv-a, role: server}
  - {prefix: 192.0.2.3/32, node: srv-c, role: server}
"""
CLIENTS = ("10.1.0.7", "10.2.3.4")
SERVERS = ("192.0.2.1", "192.0.2.3")
T0 = 1_800_000_000.0  # a slot boundary for 900 s slots


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iqn_qos", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def topo(tmp_path: Path) -> Path:
    p = tmp_path / "topo.yaml"
    p.write_text(TOPO)
    return p


def address_lines(truth_per_slot: list[dict[str, float]], topo: Path, per_slot: int = 400) -> list[str]:
    """Lines with client/server addresses only; bad units drawn through the resolved path."""
    from iqn_qos.topology import load_topology

    t = load_topology(topo)
    rng = np.random.default_rng(3)
    out = []
    for k, truth in enumerate(truth_per_slot):
        for i in range(per_slot):
            c, s = CLIENTS[i % 2], SERVERS[(i // 2) % 2]
            path = t.resolve(c, s)
            n = int(rng.integers(100, 900))
            m = int(rng.binomial(n, math.prod(1 - truth.get(x, 0.0) for x in path)))
            out.append(json.dumps({"t": T0 + k * 900 + i, "client": c, "server": s, "n": n, "m": m}))
    return out


def test_infer_json_follows_the_output_contract_and_finds_the_fault(tmp_path: Path, topo: Path) -> None:
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(address_lines([{"lyon>paris": 0.05}, {"wifi-1": 0.04}], topo)) + "\n")
    r = run("infer", str(lines), "--topology", str(topo), "--json")
    assert r.returncode == 0, r.stderr
    objs = [json.loads(x) for x in r.stdout.splitlines()]
    assert {tuple(sorted(o)) for o in objs} == {("component", "faulty", "hi", "lines", "lo", "p", "slot")}
    faulty = {(o["slot"], json.dumps(o["component"])) for o in objs if o["faulty"]}
    # wifi-1 and its gateway gw-1 always travel together: one group, its id the list of both
    assert faulty == {(T0, '"lyon>paris"'), (T0 + 900, '["gw-1", "wifi-1"]')}
    # readable table: worst first per slot
    r = run("infer", str(lines), "--topology", str(topo))
    assert r.returncode == 0, r.stderr
    body = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("  ") and "component" not in ln]
    assert body[0][0] == "lyon>paris" and body[0][-1] == "FAULTY"


def test_store_infer_is_a_query_and_predict_reads_it(tmp_path: Path, topo: Path) -> None:
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(address_lines([{"srv-c": 0.03}] * 3, topo)) + "\n")
    db = tmp_path / "qos.duckdb"
    first = run("infer", str(lines), "--topology", str(topo), "--json", "--store", str(db))
    assert first.returncode == 0, first.stderr
    lines.unlink()  # the store alone answers from now on
    again = run("infer", "--store", str(db), "--json")
    assert again.returncode == 0, again.stderr
    assert sorted(again.stdout.splitlines()) == sorted(first.stdout.splitlines())
    with Store(db) as s:
        assert s.con.execute("SELECT count(*) FROM lines").fetchone() == (1200,)
        assert s.con.execute("SELECT count(DISTINCT slot) FROM estimates").fetchone() == (3,)

    r = run(
        "predict",
        "--client",
        CLIENTS[1],
        "--server",
        SERVERS[1],
        "--topology",
        str(topo),
        "--store",
        str(db),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    fc = json.loads(r.stdout)
    assert fc["path"] == ["srv-c", "lyon", "lan-1"] and fc["slots"] == 3 and fc["unknown"] == []
    assert fc["lo"] <= 0.03 <= fc["hi"] and abs(fc["p"] - 0.03) < 0.005
    r = run("predict", "--path", "wifi-1,paris,srv-a", "--store", str(db))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wifi-1,paris,srv-a: p = 0.0")


def test_heatmap_writes_pngs(tmp_path: Path, topo: Path) -> None:
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(address_lines([{}, {"srv-c": 0.05}, {"srv-c": 0.02}], topo, 200)) + "\n")
    for extra, name in (((), "all.png"), (("--component", "srv-c"), "srv.png")):
        out = tmp_path / name
        r = run("heatmap", str(lines), "--topology", str(topo), "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    r = run(
        "heatmap",
        str(lines),
        "--topology",
        str(topo),
        "--out",
        str(tmp_path / "x.png"),
        "--component",
        "nowhere",
    )
    assert (r.returncode, r.stderr) == (2, "iqn-qos: error: component 'nowhere' is on no media line\n")


GOOD = '{"t": 1800000000, "path": ["wifi-1", "gw-1", "paris", "srv-a"], "n": 100, "m": 90}'


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            '{"t": 1800000001, "path": ["paris"], "n": 10',
            "malformed JSON (Expecting ',' delimiter at column 45)",
        ),
        ('{"t": 1800000001, "path": ["paris"], "n": -3, "m": 0}', "'n' is negative (-3)"),
        ('{"t": 1800000001, "path": ["paris"], "n": 3, "m": -1}', "'m' is negative (-1)"),
        ('{"t": 1800000001, "path": ["paris"], "n": 3, "m": 4}', "m > n (4 > 3)"),
        ('{"t": 1800000001, "path": ["paris"], "n": 0, "m": 0}', "empty measurement (n = 0)"),
        (
            '{"t": 1800000001, "path": ["paris", "mars"], "n": 3, "m": 3}',
            "unknown component 'mars' (not in the topology)",
        ),
        ('{"t": 1800000001, "path": [], "n": 3, "m": 3}', "'path' must be a non-empty list of component ids"),
        (
            '{"t": "noon", "path": ["paris"], "n": 3, "m": 3}',
            "'t' must be a number (epoch seconds), got 'noon'",
        ),
        (
            '{"t": 1800000001, "client": "172.16.0.1", "server": "192.0.2.1", "n": 3, "m": 3}',
            "address 172.16.0.1 attaches to no component (no prefix matches)",
        ),
        ("[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_bad_line_is_one_error_naming_it_and_the_store_keeps_its_data(
    tmp_path: Path, topo: Path, bad: str, message: str
) -> None:
    db = tmp_path / "qos.duckdb"
    ok = tmp_path / "ok.jsonl"
    ok.write_text(GOOD + "\n")
    with Store(db) as s:
        s.add_lines(read_media_lines(str(ok)))
    src = tmp_path / "in.jsonl"
    src.write_text(f"{GOOD}\n\n{bad}\n{GOOD}\n")
    r = run("infer", str(src), "--topology", str(topo), "--store", str(db))
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"iqn-qos: error: {src}:3: {message}\n")
    r = run("infer", "-", "--topology", str(topo), stdin=f"{bad}\n")
    assert (r.returncode, r.stderr) == (2, f"iqn-qos: error: <stdin>:1: {message}\n")
    with Store(db) as s:  # nothing of the bad file got in, nothing before it got lost
        assert s.con.execute("SELECT count(*) FROM lines").fetchone() == (1,)


def test_empty_input_and_missing_things_are_one_line_errors(tmp_path: Path, topo: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    cases = [
        (("infer", str(empty)), f"{empty}: no media lines (empty input)"),
        (("infer", str(tmp_path / "nope.jsonl")), f"{tmp_path / 'nope.jsonl'}: no such file"),
        (("infer",), "give media lines (a file or -) or --store FILE with lines already stored"),
        (
            ("predict", "--path", "a", "--store", str(tmp_path / "none.duckdb")),
            f"{tmp_path / 'none.duckdb'}: no such store (run 'iqn-qos infer LINES --store "
            f"{tmp_path / 'none.duckdb'}' first)",
        ),
        (
            ("predict", "--path", "wifi-1,mars", "--topology", str(topo), "--store", "x"),
            "--path: unknown component 'mars' (not in the topology)",
        ),
        (("infer", str(empty), "--slot", "0"), "--slot must be positive, got 0.0"),
    ]
    for args, message in cases:
        r = run(*args)
        assert (r.returncode, r.stdout, r.stderr) == (2, "", f"iqn-qos: error: {message}\n"), args


def test_lines_round_trip_and_resolution(tmp_path: Path, topo: Path) -> None:
    from iqn_qos.topology import load_topology

    ln = MediaLine(1.5, ("a", "b"), 10, 7, client="10.1.0.1", kind="video")
    assert json.loads(to_json(ln)) == {
        "t": 1.5,
        "path": ["a", "b"],
        "n": 10,
        "m": 7,
        "client": "10.1.0.1",
        "kind": "video",
    }
    src = tmp_path / "l.jsonl"
    src.write_text('{"t": 1, "client": "10.1.0.9", "server": "192.0.2.3", "n": 5, "m": 5}\n')
    (got,) = read_media_lines(str(src), load_topology(topo))
    assert got.path == ("srv-c", "lyon", "lyon>paris", "paris", "gw-1", "wifi-1")  # media direction
