"""The end-to-end demo: real stalls, seen on screen, signalled in band, inferred
on the router - and scored against the page's own spinner.

Order matters for a clean teardown, so everything is entered on one
``ExitStack`` and undone in reverse, on success, on error and on Ctrl-C (or
SIGTERM, turned into the same ``KeyboardInterrupt``):

1. the lab (three namespaces, OpenVPN, the HTTP/3 OTT emulator);
2. an Xvfb screen (the user agent watches real pixels);
3. the ISP agent, ``iqn-ctl attach`` on the router's OTT-facing interface
   inside the router namespace (real XDP), with its own run and state dirs;
4. a frame capture on the same interface, only to save the candidate arrival
   times the agent counted (the agent keeps counts, not arrival lists);
5. headful Chromium in the client namespace playing the emulator's video over
   h3 through the tunnel;
6. the end-user agent (``user_agent.agent.run_agent``) with the ground-truth
   recorder, in a thread of this process;
7. the bottleneck schedule (:mod:`iqn_lab.demo.plan`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iqn_ctl.engine import params as P
from iqn_lab import topology as T
from iqn_lab.capture import Capture, Frame, candidates
from iqn_lab.demo.plan import TARGETS, Plan, plan
from iqn_lab.demo.report import (
    FILES,
    build_report,
    detected_clicks_name,
    dom_truth,
    edge_lags,
    evaluate,
    mean_error,
    scores_against,
    signalled_stalls,
    stall_table,
    write_stalls,
    write_times,
)
from iqn_lab.demo.shaping import MediaSqueeze
from iqn_lab.demo.witness import Witness, boxes, edge_table, screen_edges
from iqn_lab.lab import Lab, LabError
from iqn_lab.ott.media import MediaSpec
from iqn_lab.procs import last_line
from iqn_lab.shaping import format_rate
from iqn_lab.topology import Names
from iqn_lab.xvfb import xvfb

Say = Callable[[str], None]
AGENT_READY_TIMEOUT = 90.0  # bcc compiles the XDP program at attach (seconds on a busy box)
PLAY_TIMEOUT = 45.0


@dataclass
class DemoConfig:
    out: Path
    prefix: str = "iqndemo"
    stalls: int = 24
    p: float = P.DEFAULT_P
    n: int = P.DEFAULT_N
    protocol: str = "edges"  # the end-user agent's signal protocol (user_agent.protocol)
    #: the ground truth's moment: the spinner as painted (what the viewer sees) or its DOM change
    truth_stamp: str = "paint"
    #: grab the spinner's box and a patch of the picture at 200/s (a diagnostic
    #: of when the screen shows the edges: iqn_lab.demo.witness)
    witness: bool = False
    starve_rate: str = "100kbit"
    video_kbit: int = 1200
    seed: int = 1
    release: float = 5.0
    targets: tuple[float, ...] = TARGETS
    min_size: int = P.DEFAULT_MIN_SIZE
    max_size: int = P.DEFAULT_MAX_SIZE


@dataclass
class UserSide:
    """What the user-agent thread shares with the progress display."""

    clicks: list[float] = field(default_factory=list)
    bursts: int = 0
    truth: Any = None
    stats: Any = None
    error: BaseException | None = None


def _ctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "iqn_ctl", *args]


class IspAgent:
    """``iqn-ctl attach`` in the router namespace with a private run/state dir."""

    def __init__(self, lab: Lab, out: Path, cfg: DemoConfig) -> None:
        self.lab = lab
        self.iface = lab.router_ott_iface
        self.run_dir = Path("/run/iqn-demo") / lab.prefix
        self.state_dir = out / "isp-agent"
        self.env = dict(os.environ, IQN_RUN_DIR=str(self.run_dir), IQN_STATE_DIR=str(self.state_dir))
        self.log = out / "isp_agent.log"
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from iqn_ctl.live.api import ApiError, request, sock_path

        argv = _ctl("attach", self.iface, "--p", str(self.cfg.p), "--n", str(self.cfg.n),
                    "--min-size", str(self.cfg.min_size), "--max-size", str(self.cfg.max_size),
                    "--state-dir", str(self.state_dir))  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = self.lab.popen("router", argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + AGENT_READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"the ISP agent exited while attaching: {last_line(self.log)}")
            try:
                request(sock_path(self.run_dir, self.iface), "status")
                return
            except ApiError:
                time.sleep(0.2)
        why = last_line(self.log)
        raise LabError(f"the ISP agent did not attach within {AGENT_READY_TIMEOUT:.0f} s: {why}")

    def flows(self) -> list[dict[str, Any]]:
        from iqn_ctl.live.api import ApiError, request, sock_path

        try:
            got: list[dict[str, Any]] = request(sock_path(self.run_dir, self.iface), "flows")
            return got
        except ApiError:
            return []

    def stop(self) -> None:
        """SIGTERM: the agent closes open stalls, records them and removes its XDP program."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.lab.health().namespaces.get("router"):  # also after a kill: no program left behind
            self.lab.exec("router", _ctl("detach", self.iface), env=self.env, capture_output=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.run_dir.parent.rmdir()  # only if no other demo uses it

    def stalls(self) -> list[dict[str, Any]]:
        argv = _ctl("stalls", "--json", "--iface", self.iface, "--state-dir", str(self.state_dir))
        r = subprocess.run(argv, capture_output=True, text=True, env=self.env)
        if r.returncode != 0:
            raise LabError(f"iqn-ctl stalls failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM tears down like Ctrl-C does. Only in this process: pyroute2 forks
    helpers that inherit the handler, and a helper must just die, not unwind a
    copy of the demo (whose teardown would remove the lab under our feet)."""
    me = os.getpid()

    def handler(_sig: int, _frame: object) -> None:
        if os.getpid() != me:
            os._exit(128 + signal.SIGTERM)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _video_time(driver: Any) -> float:
    t = driver.execute_script(
        "const v = document.querySelector('#movie_player video'); return v?.currentTime;"
    )
    return float(t or 0.0)


def _start_user_agent(driver: Any, cfg: DemoConfig, out: Path, side: UserSide, stop: threading.Event,
                      stack: contextlib.ExitStack) -> threading.Thread:  # fmt: skip
    from user_agent.agent import run_agent
    from user_agent.locate import SeleniumLocator
    from user_agent.truth import TruthRecorder

    log = stack.enter_context(open(out / detected_clicks_name(cfg.p), "w", buffering=1))
    truth_f = stack.enter_context(open(out / FILES["truth"], "w", buffering=1))
    stamps_f = stack.enter_context(open(out / FILES["stamps"], "w", buffering=1))
    side.truth = TruthRecorder(truth_f, stamp=cfg.truth_stamp, stamps=stamps_f)
    locator = SeleniumLocator(driver, truth=True)

    def on_verdict(_verdict: Any, burst: Any) -> None:
        if burst is not None:
            side.clicks.extend(burst.clicks)
            side.bursts += 1

    def body() -> None:
        try:
            side.stats = run_agent(locator, stop, p=cfg.p, n=cfg.n, log=log, truth=side.truth,
                                   on_verdict=on_verdict, protocol=cfg.protocol)  # fmt: skip
        except BaseException as e:  # reported by the main thread
            side.error = e

    th = threading.Thread(target=body, name="user-agent", daemon=True)
    th.start()
    stack.callback(th.join, 10)  # before the files close (callbacks run last-in, first-out)
    stack.callback(stop.set)
    return th


def _progress(say: Say, t: float, pl: Plan, side: UserSide, isp: IspAgent) -> None:
    squeezes = sum(1 for s in pl.steps if s.rate is not None and s.at <= t)
    page = [f for f in isp.flows() if f.get("server") == T.OTT_WWW]
    isp_stalls = sum(int(f.get("stalls", 0)) for f in page)
    in_stall = any(f.get("state") == "stall" for f in page)
    actual = side.truth.stalls if side.truth is not None else 0
    say(
        f"[{t:5.0f}/{pl.end:.0f} s] bottleneck {format_rate(pl.rate_at(t)):>7} (squeeze {squeezes}/"
        f"{len(pl.targets)}) | actual stalls {actual:>2} | user agent {side.bursts:>3} signals | "
        f"ISP agent {isp_stalls:>2} stalls{' (in a stall now)' if in_stall else ''}"
    )


def check(cfg: DemoConfig) -> Plan:
    """Refuse bad settings before anything is built; the timetable they give."""
    from user_agent.protocol import check_n, check_p, check_protocol

    check_protocol(cfg.protocol)
    if cfg.truth_stamp not in ("paint", "dom"):
        raise LabError(f"unknown --truth-stamp {cfg.truth_stamp!r}; choose paint or dom")
    check_n(cfg.n)  # the same checks the user agent makes, but before the lab is up
    check_p(cfg.p)
    Names(cfg.prefix)
    return plan(cfg.stalls, cfg.starve_rate, cfg.seed, release=cfg.release, targets=cfg.targets)


def run_demo(cfg: DemoConfig, say: Say = print) -> dict[str, Any]:
    """Run the whole demo; returns report.json's content (also saved under ``cfg.out``)."""
    pl = check(cfg)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "schedule.txt").write_text(pl.spec() + "\n")
    lab = Lab(cfg.prefix)
    side = UserSide()
    stop = threading.Event()
    frames: list[Frame] = []
    t_start = time.time()
    with _sigterm_as_interrupt(), contextlib.ExitStack() as stack:
        say(f"lab {cfg.prefix}: building namespaces, OpenVPN tunnel and the HTTP/3 OTT emulator")
        stack.callback(lambda: say(f"torn down: {len(lab.down())} lab item(s) removed"))
        lab.up(rate=None, media=MediaSpec(kbit=cfg.video_kbit))
        display = stack.enter_context(xvfb())
        say(f"Xvfb on {display}; attaching the ISP agent (XDP) to {lab.router_ott_iface} in {lab.router_ns}")
        squeeze = MediaSqueeze(lab)
        squeeze.install()
        isp = IspAgent(lab, out, cfg)
        stack.callback(isp.stop)
        isp.start()
        cap = Capture(lab.router_ns, lab.router_ott_iface)
        stack.enter_context(cap)
        from iqn_lab.browser import client_webdriver

        say("starting headful Chromium in the client namespace (h3 through the tunnel)")
        driver = stack.enter_context(client_webdriver(lab, headless=False, display=display))
        driver.get(lab.player_url)
        deadline = time.monotonic() + PLAY_TIMEOUT
        while _video_time(driver) < 2.0:
            if time.monotonic() > deadline:
                raise LabError(f"the video did not start playing within {PLAY_TIMEOUT:.0f} s")
            time.sleep(0.2)
        import user_agent.agent  # noqa: F401  (imported before the schedule is announced: a
        # Ctrl-C right after the announcement must not land inside the import)
        say(f"video playing; end-user agent watching (p={cfg.p:g} s, n={cfg.n}); "
            f"schedule of {len(pl.targets)} squeezes to {cfg.starve_rate}, {pl.end:.0f} s")  # fmt: skip
        witness = _start_witness(driver, stack) if cfg.witness else None
        th = _start_user_agent(driver, cfg, out, side, stop, stack)
        t0 = time.monotonic()
        squeeze.run(pl)
        stack.callback(squeeze.stop)
        next_report = 0.0
        while (t := time.monotonic() - t0) < pl.end:
            if side.error is not None or not th.is_alive():
                raise LabError(f"the end-user agent stopped: {side.error or 'thread ended'}")
            if isp.proc is None or isp.proc.poll() is not None:
                raise LabError(f"the ISP agent died: {last_line(isp.log)}")
            if t >= next_report:
                _progress(say, t, pl, side, isp)
                next_report += 5.0
            time.sleep(0.25)
        stop.set()
        th.join(timeout=10)
        time.sleep(1.0)  # last candidates reach the agent
        isp.stop()
        cap.stop()
        frames = list(cap.frames)
        rows = isp.stalls()
        stats = side.stats
        if witness is not None:
            witness.stop()
    say("scoring with iqn-ctl evaluate")
    return _finish(cfg, pl, side, stats, rows, frames, time.time() - t_start, say, witness)


def _nan_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _start_witness(driver: Any, stack: contextlib.ExitStack) -> Witness:
    """The screen witness on the player's rectangle (asked once: the demo's player stays put)."""
    from user_agent.locate import SeleniumLocator

    lay = SeleniumLocator(driver).locate().layout
    if lay is None:
        raise LabError("the screen witness found no player on the page")
    pl = lay.player
    w = Witness(*boxes(pl.left, pl.top, pl.width, pl.height))
    w.start()
    stack.callback(w.stop)
    return w


def _edges(out: Path, stats: Any, witness: Witness | None) -> dict[str, Any]:
    """Each stall's edges against the page's DOM stamps (edges.tsv), and their means (ms)."""
    from user_agent.truth import read_stamps

    stamps = read_stamps(out / FILES["stamps"])
    screen = None
    if witness is not None:
        witness.write(out / "witness.tsv")
        closed = [(a[1], b[1]) for a, b in zip(stamps[::2], stamps[1::2], strict=False) if a[0] == "S"]
        screen = screen_edges(witness.rows, closed)
    table = edge_table(stamps, stats.edges if stats is not None else [], screen)
    if table:
        cols = list(table[0])
        lines = ["\t".join("-" if r[c] is None else str(r[c]) for c in cols) + "\n" for r in table]
        (out / "edges.tsv").write_text("\t".join(cols) + "\n" + "".join(lines))
    means: dict[str, Any] = {}
    for c in table[0] if table else []:
        xs: list[float] = [v for r in table if (v := r[c]) is not None]
        means[c] = round(sum(xs) / len(xs), 4 if c.endswith("_s") else 1) if xs else None
        means[c + "_n"] = len(xs)
    if witness is not None:
        means["witness_grabs"] = len(witness.rows)
        means["witness_error"] = witness.error
    return means


def _finish(cfg: DemoConfig, pl: Plan, side: UserSide, stats: Any, rows: list[dict[str, Any]],
            frames: list[Frame], wall: float, say: Say,
            witness: Witness | None = None) -> dict[str, Any]:  # fmt: skip
    from iqn_ctl.evaluate.scoring import score
    from iqn_ctl.evaluate.traces import Stall, read_real_stalls

    out = cfg.out
    cand = candidates(frames, P.CandidateFilter(min_size=cfg.min_size, max_size=cfg.max_size))
    page_cand = [f.t for f in cand if f.src == T.OTT_WWW]
    write_times(page_cand, out / FILES["candidates"])
    write_times(side.clicks, out / FILES["clicks"])
    (out / "isp_stalls_all_flows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page_rows = [r for r in rows if r.get("server") == T.OTT_WWW]
    inferred = [Stall(r["start"], r["end"], r["flow"], r["client"]) for r in page_rows]
    all_inferred = [Stall(r["start"], r["end"], r["flow"], r["client"]) for r in rows]
    real = read_real_stalls(out / FILES["truth"])
    signalled = signalled_stalls(side.clicks, cfg.p, cfg.n)
    write_stalls(inferred, out / FILES["inferred"])
    write_stalls(signalled, out / FILES["signalled"])
    ev_isp = evaluate(out, FILES["inferred"], FILES["plot_isp"], FILES["candidates"])
    ev_user = evaluate(out, FILES["signalled"], FILES["plot_user"], FILES["clicks"])
    extra = {
        "run": out.name,
        "wall_s": round(wall, 1),
        "p": cfg.p,
        "n": cfg.n,
        "protocol": cfg.protocol,
        "toggles": len(side.clicks),
        # signalling cost: toggles per second of actual stall (the tick protocol's is about n/p)
        "toggles_per_stall_s": _nan_none(len(side.clicks) / sum(r.duration for r in real) if real else math.nan),  # noqa: E501
        "bias_ms": _nan_none(mean_error(real, inferred) * 1000),
        "user_bias_ms": _nan_none(mean_error(real, signalled) * 1000),
        # the ground truth's stamp, and the same scores against the other stamp
        "truth_stamp": cfg.truth_stamp,
        "truth_fallbacks": side.truth.fallbacks if side.truth is not None else None,
        "against_dom_truth": scores_against(dom_truth(out / FILES["stamps"], out / FILES["truth_dom"]),
                                            signalled, inferred),  # fmt: skip
        "edge_lags_ms": edge_lags(out / FILES["stamps"]),
        # per stall in edges.tsv: each edge against the DOM stamp (ms), means here
        "edges_vs_dom": _edges(out, stats, witness),
        "schedule": pl.spec(),
        "starve_rate": cfg.starve_rate,
        "target_stall_s": pl.targets,
        "signal_bursts": side.bursts,
        "candidates_page_flow": len(page_cand),
        "candidates_other_flows": len(cand) - len(page_cand),
        "isp_stalls_other_flows": len(rows) - len(page_rows),
        # an ISP cannot tell the page's connection from the others: all flows scored together
        "precision_isp_all_flows": _nan_none(score(real, all_inferred).precision),
        "user_agent": None if stats is None else {
            "frames": stats.frames, "signals": stats.signals, "grab_failures": stats.grab_failures,
            "no_layout": stats.no_layout, "filtered": dict(stats.filtered),
            "max_click_gap_ms": round(stats.max_click_gap * 1000, 3),
            "restores": stats.restores, "navigations": stats.navigations,
            "hidden_bursts": stats.hidden_bursts,
        },
    }  # fmt: skip
    rep = build_report(out, signalled, inferred, ev_user, ev_isp, extra)
    (out / FILES["report"]).write_text(json.dumps(rep, indent=2) + "\n")
    table = stall_table(out, signalled, inferred, rep)
    (out / FILES["table"]).write_text(table)
    say(table)
    say(f"results in {out}/ (report.json, report.txt, {FILES['plot_isp']}, {FILES['plot_user']}, "
        f"{FILES['truth']}, {FILES['candidates']}, {detected_clicks_name(cfg.p)})")  # fmt: skip
    return rep
