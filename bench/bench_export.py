"""Live export benchmark (``iqn-ctl attach --export``): records/s into JetStream.

1. Throughput: stall records per second from the exporter (iqn_ctl.live.export:
   read from the history, encode, publish, await JetStream's acknowledgements,
   mark them in the history) to a real single-node nats-server, against
   baselines of bare nats-py publish loops of *the same messages* (same
   subjects, payloads and ``Nats-Msg-Id`` headers, encoded beforehand) in the
   same run: ``js.publish_async`` with all acknowledgements awaited at the end
   (nats-py's own asynchronous publishing) and ``js.publish`` awaiting each
   acknowledgement in turn. Every run starts on an empty stream (deleted
   between runs, so no run is answered from the duplicate window); the
   measurements alternate and the median of ``--repeat`` runs is reported.
2. Whether exporting costs the agent candidates: the live agent (real XDP on a
   veth testbed) under a fixed candidate load from bench/blast.c, once without
   ``--export`` and once with ``--export`` while its exporter drains a
   backlog of ``--backlog`` stall records (its busiest state), the same loads
   in the same run. The agent's event rate and the kernel's lost-record count
   are compared.

Run as root (part 2 needs XDP and namespaces):
``sudo .venv/bin/python bench/bench_export.py`` (``--quick`` for fewer records).
Writes the "## Live export" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import _results  # noqa: E402
from bench_agent import blast, build_blast, frame_file, status  # noqa: E402

from iqn_ctl.live.api import ApiError, sock_path  # noqa: E402
from iqn_ctl.live.export import STREAM, Exporter, Outbox  # noqa: E402
from iqn_ctl.live.history import History, StallRecord  # noqa: E402
from iqn_lab.jetstream import JetStream  # noqa: E402
from iqn_lab.testbed import Testbed as Lab  # noqa: E402

SECTION = "## Live export"
CMD = "sudo .venv/bin/python bench/bench_export.py"
IFACE = "eth0"


def fill(state: Path, n: int, iface: str = IFACE) -> Path:
    """A history with ``n`` ended stalls on ``iface`` (distinct flows), all waiting for export."""
    h = History(state, max_rows=max(n, 1))
    t = time.time()
    def client(i: int) -> str:
        return f"198.18.{i // 60000 % 256}.{i % 250 + 2}"

    for k in range(0, n, 50_000):
        h.add([StallRecord(iface, f"198.18.0.1:443>{client(i)}:{1024 + i % 60000}", client(i), "198.18.0.1",
                           t + i * 1e-3, t + i * 1e-3 + 2.5, 13, t + i * 1e-3 + 3.3, estimator="count")
               for i in range(k, min(k + 50_000, n))])
    path = h.path
    h.close()
    return path


async def _reset(url: str) -> None:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url)
    with_js = nc.jetstream()
    try:
        await with_js.delete_stream(STREAM)
    except NotFoundError:
        pass
    await nc.close()


async def _bare(url: str, msgs: list[tuple[str, bytes, str]], mode: str) -> tuple[float, float]:
    """Seconds (wall clock, and this process' CPU) for a bare nats-py loop to publish ``msgs``
    with acknowledgements."""
    import nats
    from nats.js.api import StreamConfig

    from iqn_ctl.live.export import DUPLICATE_WINDOW, STREAM_SUBJECTS

    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=len(msgs) + 1)
    await js.add_stream(StreamConfig(name=STREAM, subjects=list(STREAM_SUBJECTS),
                                     duplicate_window=DUPLICATE_WINDOW))
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "publish_async":
        futs = [await js.publish_async(s, p, headers={"Nats-Msg-Id": m}) for s, p, m in msgs]
        acks = await asyncio.gather(*futs)
    else:
        acks = [await js.publish(s, p, headers={"Nats-Msg-Id": m}) for s, p, m in msgs]
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert len(acks) == len(msgs) and not any(a.duplicate for a in acks)
    await nc.close()
    return took, cpu


def _exporter(url: str, db: Path, n: int, per_msg: int = 1) -> tuple[float, float]:
    """Seconds (wall clock, and this process' CPU: the exporter's thread, this loop's polls
    are negligible) for the exporter to ship (and mark) the ``n`` waiting records of ``db``
    (``per_msg`` records per message: ``--export-batch``)."""
    with sqlite3.connect(db) as con:  # every record waiting again
        con.execute("UPDATE stalls SET exported_at = NULL")
    ex = Exporter(db, IFACE, "bench", [url], records_per_msg=per_msg)
    t0, c0 = time.perf_counter(), time.process_time()
    ex.start()
    while ex.stats()["exported_stalls"] < n:
        time.sleep(0.002)
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = ex.stats()
    ex.stop()
    assert st["errors"] == 0 and st["retries"] == 0, st
    return took, cpu


def _batches(db: Path, n: int, per_msg: int) -> list[tuple[str, bytes, str]]:
    """The exporter's own messages of the ``n`` records (v1, or v2 with ``per_msg`` > 1), for the
    bare baselines."""
    ob = Outbox(db, IFACE, "bench")
    ex = Exporter(db, IFACE, "bench", ["nats://127.0.0.1:1"], records_per_msg=per_msg)
    out = [(m.subject, m.payload, m.msg_id) for m in ex._messages(ob.take(n), 1 << 20)]
    ob.close()
    return out


def bench_throughput(tmp: Path, n: int, repeat: int, per_msg: int) -> dict[str, Any]:
    db = fill(tmp / "tp", n)
    msgs = _batches(db, n, 1)
    assert len(msgs) == n
    batched = _batches(db, n, per_msg)
    times: dict[str, list[float]] = {"exporter": [], "publish_async": [], "publish": [], "exporter_v2": [],
                                     "publish_async_v2": []}
    cpus: dict[str, list[float]] = {k: [] for k in times}
    loads: list[float] = []
    with JetStream.start(1, tmp / "js-tp") as js:
        url = js.urls[0]
        for r in range(repeat):
            for mode in times:
                if mode == "publish" and r > 0 and not QUICK_SEQ:
                    continue
                asyncio.run(_reset(url))
                loads.append(os.getloadavg()[0])
                if mode == "exporter":
                    took, cpu = _exporter(url, db, n)
                elif mode == "exporter_v2":
                    took, cpu = _exporter(url, db, n, per_msg)
                elif mode == "publish_async_v2":
                    took, cpu = asyncio.run(_bare(url, batched, "publish_async"))
                else:
                    took, cpu = asyncio.run(_bare(url, msgs if mode != "publish" else msgs[: n // 5], mode))
                    if mode == "publish":  # sequential: timed on a fifth, scaled
                        took, cpu = took * 5, cpu * 5
                times[mode].append(took)
                cpus[mode].append(cpu)
                print(f"  {mode}: {n / took:,.0f} records/s, {cpu / n * 1e6:.1f} us CPU a record "
                      f"(load {loads[-1]:.1f})", flush=True)
    return {"n": n, "bytes": sum(len(p) for _, p, _ in msgs) / n, "per_msg": per_msg, "msgs_v2": len(batched),
            **{k: n / statistics.median(v) for k, v in times.items()},
            "cpu_us": {k: statistics.median(v) / n * 1e6 for k, v in cpus.items()},
            "loads": (min(loads), max(loads)),
            "runs": {k: [round(n / t) for t in v] for k, v in times.items()}}


#: the machine's 1-minute load average when the bench started (other work shares the CPUs)
LOAD_AT_START = os.getloadavg()[0]
#: the sequential js.publish baseline runs once (it is slow and only a reference)
QUICK_SEQ = False


def _agent(lab: Lab, tmp: Path, tag: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    tag = tag.replace(" ", "-")
    env = dict(os.environ, IQN_RUN_DIR=str(tmp / f"run-{tag}"))
    # blast.c's candidates have no client side: --pairing off and no cap let them into user space
    agent = subprocess.Popen(lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(tmp / f"state-{tag}"),
                                           "--pairing", "off", "--cap", "0", *extra),
                             env=env, stderr=subprocess.DEVNULL)
    sock = sock_path(tmp / f"run-{tag}", lab.cli_if)
    for _ in range(1200):
        try:
            status(sock)
            return agent, sock
        except ApiError:
            if agent.poll() is not None:
                sys.exit("bench_export: the agent did not start")
            time.sleep(0.1)
    sys.exit("bench_export: the agent did not answer")


def bench_agent_rate(tmp: Path, rates: list[float], secs: float, backlog: int) -> list[dict[str, Any]]:
    rows = []
    with Lab() as lab:
        exe = build_blast(tmp)
        frames = frame_file(tmp, lab, lab.cli4.rsplit(".", 1)[0] + ".3", 1250, 16)
        js = JetStream.start(1, tmp / "js-agent", netns=lab.cli_ns)
        try:
            for tag in ("plain", "export idle", "export draining", "export draining v2"):
                extra: list[str] = []
                if tag != "plain":
                    extra = ["--export", js.urls[0], "--router-id", "bench"]
                if tag == "export draining v2":
                    extra += ["--export-batch", "100"]
                if tag.startswith("export draining"):
                    fill(tmp / f"state-{tag.replace(' ', '-')}", backlog, lab.cli_if)
                agent, sock = _agent(lab, tmp, tag, extra)
                try:
                    for rate in rates:
                        before = status(sock)
                        sent, took = blast(lab, exe, rate, secs, frames)
                        time.sleep(0.5)
                        after = status(sock)
                        d = {k: after[k] - before[k] for k in ("events", "lost", "polls_late")}
                        ex = after.get("export") or {}
                        row = {"agent": tag, "offered": sent / took, "rate": d["events"] / took,
                               "lost": d["lost"], "late": d["polls_late"], "sent": sent,
                               "backlog": ex.get("backlog"),
                               "exported": (ex.get("exported_stalls", 0)
                                            - (before.get("export") or {}).get("exported_stalls", 0))}
                        rows.append(row)
                        print(f"  {tag}: offered {row['offered']:,.0f}/s -> {row['rate']:,.0f}/s, "
                              f"lost {d['lost']}, late polls {d['polls_late']}, "
                              f"exported during it {row['exported']}", flush=True)
                finally:
                    agent.terminate()
                    agent.wait(60)
        finally:
            js.stop()
    return rows


def report(tp: dict[str, Any], ag: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        SECTION, "",
        f"`{CMD}`{' --quick' if args.quick else ''} ({platform.node()}, {os.cpu_count()} CPUs shared "
        f"with other work, load average {LOAD_AT_START:.1f} at the start, nats-server {_server_version()}, "
        f"{time.strftime('%Y-%m-%d')}).", "",
    ]
    if tp:
        lines += _throughput_lines(tp, args)
    if ag:
        lines += _agent_lines(ag, args)
    return "\n".join(lines) + "\n"


def _throughput_lines(tp: dict[str, Any], args: argparse.Namespace) -> list[str]:
    ex, pa, seq = tp["exporter"], tp["publish_async"], tp["publish"]
    ex2, pa2, k = tp["exporter_v2"], tp["publish_async_v2"], tp["per_msg"]
    cpu, runs = tp["cpu_us"], tp["runs"]
    lo, hi = tp["loads"]
    return [
        f"Throughput: {tp['n']:,} stall records ({tp['bytes']:.0f} bytes of JSON each) from the history to a "
        f"single-node JetStream stream, every one acknowledged; median of {args.repeat} runs, each on an "
        "empty stream. Baselines: bare nats-py loops publishing the same messages (pre-encoded): the "
        f"v1 messages (one record each), and the exporter's own v2 messages (`--export-batch {k}`: "
        f"{tp['msgs_v2']:,} messages of up to {k} records). 1-minute load average {lo:.1f} to {hi:.1f} "
        "during the runs. CPU: this process' CPU time per record (the exporter's thread, or the bare "
        "client; nats-server's is not counted), less sensitive to the shared CPUs than records/s.", "",
        "| publisher | records/s | ratio to its bare publish_async | CPU us/record | runs (records/s) |",
        "|---|---:|---:|---:|---|",
        f"| **exporter, `--export-batch {k}`** (schema v2; history -> JetStream, acks, marks) | {ex2:,.0f} | "
        f"{ex2 / pa2:.2f} | {cpu['exporter_v2']:.1f} | {runs['exporter_v2']} |",
        f"| bare `js.publish_async` + gather, the same v2 messages | {pa2:,.0f} | 1.00 "
        f"| {cpu['publish_async_v2']:.1f} | {runs['publish_async_v2']} |",
        f"| exporter, default (schema v1, one record a message) | {ex:,.0f} | {ex / pa:.2f} "
        f"| {cpu['exporter']:.1f} | {runs['exporter']} |",
        f"| bare `js.publish_async` + gather, the same v1 messages | {pa:,.0f} | 1.00 "
        f"| {cpu['publish_async']:.1f} | {runs['publish_async']} |",
        f"| bare `js.publish` (one ack at a time), v1 | {seq:,.0f} | {seq / pa:.2f} "
        f"| {cpu['publish']:.1f} | {runs['publish']} |",
        "",
        f"Target >= 50,000 records/s: {'met' if ex2 >= 50_000 else 'NOT met'} with `--export-batch {k}` "
        f"({ex2:,.0f}); {'met' if ex >= 50_000 else 'not met'} with v1 messages ({ex:,.0f}).", "",
    ]


def _agent_lines(ag: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [
        "The agent's candidate rate without and with `--export`: with nothing to export (`export idle`: "
        "the steady state, a few records a second) and with the exporter draining a backlog of "
        f"{args.backlog:,} records during the load (`export draining`: its busiest state, as after a broker "
        f"outage; `v2`: with `--export-batch 100`); nats-server runs on the same 2 CPUs. {args.secs:g} s per "
        "load:", "",
        "| agent | offered/s | handled/s | lost | late polls (> 50 ms) | records exported during the load "
        "| backlog after it |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ag:
        exporting = r["agent"] != "plain"
        lines.append(f"| {r['agent']} | {r['offered']:,.0f} | {r['rate']:,.0f} | {r['lost']} | {r['late']} | "
                     f"{r['exported'] if exporting else '-'} | {r['backlog'] if exporting else '-'} |")
    lines += ["", "offered/s is what bench/blast.c achieved on the shared CPUs (it competes with the agent, "
              "the exporter and nats-server); handled/s = events the agent processed / load time."]
    return [*lines, ""]


def _server_version() -> str:
    from iqn_lab.jetstream import server_binary

    out = subprocess.run([server_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    return out.split()[-1] if out else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer records and loads")
    ap.add_argument("--records", type=int, default=None)
    ap.add_argument("--per-msg", type=int, default=100, help="--export-batch of the batched runs")
    ap.add_argument("--repeat", type=int, default=3)
    # it must outlast the loads: the v2 exporter drains ~100,000 records/s here
    ap.add_argument("--backlog", type=int, default=2_000_000)
    ap.add_argument("--secs", type=float, default=3.0)
    ap.add_argument("--rates", default="100000,200000,300000")
    ap.add_argument("--only", choices=("throughput", "agent"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    n = args.records or (50_000 if args.quick else 200_000)
    td = Path(tempfile.mkdtemp(prefix="iqn-bench-export-"))
    try:
        tp = bench_throughput(td, n, args.repeat, args.per_msg) if args.only != "agent" else {}
        ag: list[dict[str, Any]] = []
        if args.only != "throughput":
            if os.geteuid() != 0:
                sys.exit("bench_export: part 2 needs root (XDP, namespaces); --only throughput runs without")
            ag = bench_agent_rate(td, [float(r) for r in args.rates.split(",")], args.secs, args.backlog)
    finally:
        shutil.rmtree(td, ignore_errors=True)
    text = report(tp, ag, args)
    print(text)
    if not args.no_write and not args.only:
        _results.write_section(SECTION, text, args.out)


if __name__ == "__main__":
    main()
