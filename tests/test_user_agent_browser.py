"""The end-user agent against a real headful Chromium on a private Xvfb screen,
playing the lab's player page (the page contract; tests/pages adds markers and hooks) from
a plain-HTTP server on 127.0.0.1: locating, real clicks, the loop, ground truth,
calibration, and what users do to a player that must not pass for a stall or
break the signalling (pause, seek, fullscreen).

Tests wait for the events they need (page state, the agent's frames, X input
events, files, command output) with generous deadlines and compare with the
times the page and the agent observed. Timing targets (toggles < 5 ms apart)
are the benchmark's: bench/bench_user_agent.py."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from conftest import need
from pages.desktop import have_desktop_tools, xvfb
from pages.server import PageServer, make_clip

from iqn_ctl.engine.params import SignalParams
from iqn_ctl.engine.tracker import StallEnded, StallStarted, StallTracker
from iqn_ctl.evaluate.traces import read_detected_clicks, read_real_stalls
from user_agent.agent import RunStats, run_agent
from user_agent.calibrate import record_positions
from user_agent.detector import DetectorConfig, Kind, Verdict
from user_agent.layout import Layout, Point, Rect, load_calibration
from user_agent.locate import FixedLocator, Located, SeleniumLocator
from user_agent.protocol import LOOKS_PER_P, decode
from user_agent.signaler import Burst, Signaler
from user_agent.truth import TruthRecorder
from user_agent.xinput import (
    BUTTON_RELEASE,
    KEY_PRESS,
    KEY_RELEASE,
    MOTION,
    InputEvent,
    InputWatcher,
    RecordedInput,
    open_display,
    pointer_position,
)

MAGENTA, GREEN = (255, 0, 255), (0, 255, 0)
DEADLINE = 30.0  # seconds to wait for any event; a correct build needs a fraction of it
PARK = (700, 650)  # pointer rest: in the browser window, off the player and the switch
CFG = DetectorConfig()  # the agent's filters (input_quiet, geometry_settle) as it runs them
SWITCH_STATE = "return document.getElementById('autoplay-toggle').ariaChecked"
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = DEADLINE, step: float = 0.05) -> T:
    """Poll until ``check()`` is truthy and return it (a readiness wait, not a timing assert)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting {timeout:g} s for {what}")
        time.sleep(step)
    return value


@pytest.fixture(scope="module")
def desktop() -> Iterator[str]:
    missing = have_desktop_tools()
    need(not missing, f"needs {missing} (scripts/setup.sh installs them)")
    with xvfb() as display:
        yield display


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageServer]:
    need(not have_desktop_tools(), f"needs {have_desktop_tools()}")
    srv = PageServer(make_clip(tmp_path_factory.mktemp("clip") / "clip.webm")).start()
    try:
        yield srv
    finally:
        srv.stop()


def playing(driver: Any) -> bool:
    return bool(driver.execute_script("return window.iqnTest && window.iqnTest.playing()"))


@pytest.fixture(scope="module")
def driver(desktop: str, page: PageServer) -> Iterator[Any]:
    from user_agent.browser import start_chromium

    d = start_chromium(page.url, ["--window-position=40,30", "--window-size=900,700"])
    try:
        wait_for(lambda: playing(d), "the test clip to start playing")
        yield d
    finally:
        d.quit()


@pytest.fixture
def gui(desktop: str) -> Any:
    from user_agent.signaler import load_pyautogui

    return load_pyautogui()


def grab_rgb(rect: Rect) -> np.ndarray:
    import mss

    with mss.MSS() as m:
        shot = m.grab((rect.left, rect.top, rect.left + rect.width, rect.top + rect.height))
    return np.frombuffer(shot.raw, np.uint8).reshape(shot.height, shot.width, 4)[..., 2::-1]


def located(driver: Any, profile: str = "youtube") -> Layout:
    loc = SeleniumLocator(driver, profile=profile).locate()
    assert loc.layout is not None, loc.why
    return loc.layout


def player_state(driver: Any) -> dict[str, Any]:
    """The page's own record: the lab player's (iqn_lab/ott/static/player.js: stalls,
    switch clicks, autoplayOk = answered POSTs) and the test hooks' (tests/pages/hooks.js:
    clicks on the player, seeks, pauses, fullscreen changes)."""
    return dict(driver.execute_script("return window.iqnPlayer"))


def reset_page(driver: Any) -> None:
    driver.execute_script(
        "const s = window.iqnPlayer; s.stalls = []; s.clicks = []; s.playerClicks = [];"
        " s.seeks = []; s.paused = []; s.fullscreen = [];"
    )


def closed_stalls(driver: Any) -> list[tuple[float, float]] | None:
    """The page's stalls (epoch s) once there is one and all have ended."""
    st = player_state(driver)["stalls"]
    if st and all(e[1] is not None for e in st):
        return [(a / 1000, b / 1000) for a, b in st]
    return None


def switch_clicks_answered(driver: Any, page: PageServer, count: int) -> list[tuple[float, bool]]:
    """Wait until the page has ``count`` switch clicks with their POSTs answered (so
    the server has them all), then return the server's POSTs."""
    try:
        wait_for(lambda: player_state(driver)["autoplayOk"] >= count, f"{count} answered autoplay POSTs")
    except pytest.fail.Exception:
        st = player_state(driver)
        answered, clicks = st["autoplayOk"], len(st["clicks"])
        pytest.fail(f"the page answered {answered} of {count} POSTs from {clicks} switch clicks")
    return page.take_posts()


def one_burst_for_the_router(times: list[float], n: int, p: float = 0.2) -> bool:
    """The ISP side's grouping: ``n`` candidates within its start window make one
    stall start of ``n`` candidates (iqn_ctl.engine.tracker, the engine the agents use)."""
    tr = StallTracker(SignalParams(p=p, n=n))
    events = tr.feed(sorted(times)) + tr.close()
    starts = [e for e in events if isinstance(e, StallStarted)]
    ends = [e for e in events if isinstance(e, StallEnded)]
    return len(starts) == 1 and len(ends) == 1 and ends[0].candidates == n


class RecordingLocator:
    """SeleniumLocator that keeps what every page query answered, and when."""

    def __init__(self, driver: Any, truth: bool = False, profile: str = "youtube") -> None:
        self._inner = SeleniumLocator(driver, truth=truth, profile=profile)
        self.seen: list[tuple[float, Layout | None, str]] = []

    def locate(self) -> Located:
        loc = self._inner.locate()
        self.seen.append((time.time(), loc.layout, loc.why))
        return loc


@dataclass(frozen=True, slots=True)
class Frame:
    verdict: Verdict
    burst: Burst | None


class AgentRun:
    """``run_agent`` on a thread of its own while the test plays the user and the
    network; every frame's verdict and burst, and every page answer, are kept."""

    def __init__(
        self, driver: Any, p: float = 0.2, record_truth: bool = False, profile: str = "youtube", **kw: Any
    ) -> None:
        self.locator = RecordingLocator(driver, truth=record_truth, profile=profile)
        self.frames: list[Frame] = []
        self.stats: RunStats | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._kw = dict(p=p, n=4, **kw)
        self._thread = threading.Thread(target=self._run, name="agent", daemon=True)

    def _run(self) -> None:
        try:
            self.stats = run_agent(
                self.locator, self._stop, on_verdict=lambda v, b: self.frames.append(Frame(v, b)), **self._kw
            )
        except BaseException as e:  # re-raised in the test thread
            self.error = e

    def __enter__(self) -> AgentRun:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(DEADLINE)
        if exc[0] is None:
            assert not self._thread.is_alive(), "the agent did not stop"
            if self.error is not None:
                raise self.error

    def wait(self, check: Callable[[], T | None], what: str) -> T:
        def live() -> T | None:
            if self.error is not None:
                raise self.error
            assert self._thread.is_alive(), "the agent stopped by itself"
            return check()

        return wait_for(live, what)

    def verdicts(self, after: float = float("-inf")) -> list[Verdict]:
        return [f.verdict for f in list(self.frames) if f.verdict.t > after]

    def count(self, kind: Kind, after: float = float("-inf")) -> int:
        return sum(v.kind is kind for v in self.verdicts(after))

    def bursts(self, after: float = float("-inf")) -> list[Burst]:
        return [f.burst for f in list(self.frames) if f.burst is not None and f.verdict.t > after]

    def settles(self) -> list[float]:
        """When the agent saw the player's geometry change or lost it: the page
        answers with no layout, or another one than the answer before."""
        seen = list(self.locator.seen)
        return [t for i, (t, lay, _) in enumerate(seen) if lay is None or (i and lay != seen[i - 1][1])]

    def assert_settled_before_signalling(self) -> None:
        """Documented rule: no signal within ``geometry_settle`` of a geometry change."""
        settles = self.settles()
        for v in self.verdicts():
            last = max((tc for tc in settles if tc <= v.t), default=None)
            if v.kind is Kind.STALL and last is not None:
                assert v.t - last > CFG.geometry_settle, f"signalled {v.t - last:.3f} s after a layout change"


def test_located_player_rectangle_is_exact(driver: Any) -> None:
    """The marker squares sit in the player's corners: the grab of the located
    rectangle must start and end on them, and one pixel more would not."""
    lay = located(driver)
    assert (lay.player.width, lay.player.height) == (640, 360)
    img = grab_rgb(lay.player)
    assert tuple(img[0, 0]) == MAGENTA and tuple(img[11, 11]) == MAGENTA
    assert tuple(img[-1, -1]) == GREEN and tuple(img[-12, -12]) == GREEN
    assert tuple(img[12, 12]) != MAGENTA
    outside = grab_rgb(Rect(lay.player.left - 1, lay.player.top - 1, 2, 2))
    assert tuple(outside[0, 0]) != MAGENTA and tuple(outside[1, 1]) == MAGENTA


def test_locating_follows_the_window(driver: Any) -> None:
    before = located(driver)
    driver.set_window_position(140, 90)
    try:
        after = wait_for(lambda: (lay := located(driver)) != before and lay, "the layout to follow")
        assert (after.player.left - before.player.left, after.player.top - before.player.top) == (100, 60)
        assert tuple(grab_rgb(after.player)[0, 0]) == MAGENTA
    finally:
        driver.set_window_position(40, 30)
        wait_for(lambda: located(driver) == before, "the window to move back")


@pytest.mark.parametrize("mode, n", [("batched", 4), ("batched", 6), ("pyautogui", 4)])
def test_signal_toggles_switch_n_times_and_restores_everything(
    driver: Any, page: PageServer, gui: Any, mode: str, n: int
) -> None:
    """n real clicks give n toggles and n POSTs that the router side groups as one
    burst; the switch and the pointer end where they were. (How many ms apart the
    toggles are is measured by bench/bench_user_agent.py.)"""
    lay = located(driver)
    driver.execute_script("window.iqnPlayer.clicks = []")
    page.take_posts()
    ok0 = player_state(driver)["autoplayOk"]
    start_state = driver.execute_script(SWITCH_STATE)
    gui.moveTo(*PARK)
    burst = Signaler(n, gui, mode).signal(lay.switch)

    assert len(burst.clicks) == n and burst.restored
    assert tuple(gui.position()) == PARK
    posts = switch_clicks_answered(driver, page, ok0 + n)
    clicks = driver.execute_script("return window.iqnPlayer.clicks")  # click events, in order
    assert len(clicks) == n and len(posts) == n  # all answered: a stray extra click would be listed
    first = start_state != "true"
    assert sorted(on for _, on in posts) == sorted([first, not first] * (n // 2))
    assert driver.execute_script(SWITCH_STATE) == start_state
    assert (np.diff(clicks) >= 0).all()
    # One burst as the ISP agent groups candidates: by the page's click times and
    # by the server's arrival times.
    assert one_burst_for_the_router([c / 1000 for c in clicks], n), f"clicks at {clicks} (ms)"
    assert one_burst_for_the_router([t for t, _ in posts], n), f"POSTs at {posts}"


def test_agent_signals_only_while_the_page_stalls(driver: Any, page: PageServer, tmp_path: Path) -> None:
    """Protocol tick (the paper's), the whole loop on the real page: playing, a 2 s stall, playing again. The
    test waits for each phase and checks against the times the page (stall start
    s0 and end s1) and the agent (each grab's verdict) observed."""
    p = 0.2
    log_path, truth_path = tmp_path / "Detected_clicks_0.2.txt", tmp_path / "Real_stalls.txt"
    page.take_posts()
    reset_page(driver)
    ok0 = player_state(driver)["autoplayOk"]
    with open(log_path, "w") as log, open(truth_path, "w") as truth:
        with AgentRun(driver, p=p, record_truth=True, log=log, truth=TruthRecorder(truth),
                      protocol="tick") as run:  # fmt: skip
            run.wait(lambda: run.count(Kind.PLAYING) >= 3, "the agent to see playback")
            driver.execute_script("window.iqnTest.stall(2000)")
            ((s0, s1),) = run.wait(lambda: closed_stalls(driver), "the page's stall to end")
            run.wait(lambda: run.count(Kind.PLAYING, after=s1) >= 3, "the agent to see playback again")
    stats = run.stats
    assert stats is not None

    real = read_real_stalls(truth_path)
    assert len(real) == 1
    assert abs(real[0].start - s0) < 0.02 and abs(real[0].end - s1) < 0.02  # the same page event

    lines = read_detected_clicks(log_path)
    assert len(lines) == stats.frames == len(run.frames)  # one line per grab
    assert all(a[1] < b[1] for a, b in zip(lines, lines[1:], strict=False))
    sent = [t for kind, t in lines if kind == "S"]
    assert sent == [b.start for b in run.bursts()]
    verdicts = run.verdicts()
    stalls = [v for v in verdicts if v.kind is Kind.STALL]
    assert stats.signals == len(sent) == len(stalls) >= 1  # every stall verdict, and only those, signalled
    assert all(v.t > s0 for v in stalls), "signal before the page stalled"
    during = run.verdicts(after=s0)
    first = next(i for i, v in enumerate(during) if v.kind is Kind.STALL)
    assert first <= 3, f"seen only at the {first + 1}th grab of the stall: {during[: first + 1]}"
    last = max(i for i, v in enumerate(during) if v.kind is Kind.STALL)
    assert all(v.kind is Kind.STALL for v in during[first : last + 1]), "signalling stopped mid-stall"
    # the grab that stopped the signals saw the picture move: the page had resumed by then
    # (its time is taken just before the grab, hence up to one period's slack)
    assert during[last + 1].t > s1 - p, f"signals stopped at {during[last + 1].t}, the stall ended at {s1}"
    resumed = next(v.t for v in verdicts if v.t > s1 and v.kind is Kind.PLAYING)
    assert all(v.t < resumed for v in stalls), "signal after the agent saw playback again"

    posts = switch_clicks_answered(driver, page, ok0 + 4 * len(sent))
    assert len(posts) == 4 * len(sent) == len(player_state(driver)["clicks"])
    assert min(t for t, _ in posts) > sent[0]
    assert stats.grab_failures == 0


def test_protocol_edges_signals_the_stalls_duration_in_its_count(driver: Any, page: PageServer) -> None:
    """Protocol edges (the default), the whole loop on the real page: a 2 s
    stall; every burst even, none before the page stalled nor after the agent
    saw playback again, every toggle answered, and the count decodes to the
    page's own stall duration within the encoding (p/n) plus a few looks."""
    p, n = 0.2, 4
    page.take_posts()
    reset_page(driver)
    ok0 = player_state(driver)["autoplayOk"]
    with AgentRun(driver, p=p) as run:
        run.wait(lambda: run.count(Kind.PLAYING) >= 10, "the agent to see playback")
        driver.execute_script("window.iqnTest.stall(2000)")
        ((s0, s1),) = run.wait(lambda: closed_stalls(driver), "the page's stall to end")
        run.wait(lambda: run.count(Kind.PLAYING, after=s1) >= 10, "the agent to see playback again")
    bursts = run.bursts()
    sizes = [len(b.clicks) for b in bursts]
    assert sizes and all(k % 2 == 0 for k in sizes), sizes
    assert sizes[0] == n and bursts[0].start > s0
    resumed = next(v.t for v in run.verdicts() if v.t > s1 and v.kind is Kind.PLAYING)
    assert all(b.start <= resumed + 0.1 for b in bursts), "signal after the agent saw playback again"
    total = sum(sizes)
    assert run.stats is not None and run.stats.toggles == total
    posts = switch_clicks_answered(driver, page, ok0 + total)
    assert len(posts) == total
    look = p / LOOKS_PER_P
    assert abs(decode(total, p, n) - (s1 - s0)) <= p / n + 3 * look, (total, s1 - s0)


def test_pointer_over_player_suppresses_signals(driver: Any, page: PageServer, gui: Any) -> None:
    """A user moving the mouse over the player during a stall: the agent keeps quiet."""
    lay = located(driver)
    page.take_posts()
    clicks0 = len(player_state(driver)["clicks"])
    moving = threading.Event()
    moving.set()

    def wiggle() -> None:
        i = 0
        while moving.is_set():
            gui.moveTo(lay.player.left + 100 + 20 * (i % 2), lay.player.top + 100)
            i += 1
            time.sleep(0.1)

    driver.execute_script("window.iqnTest.stall(0)")  # until resume()
    mover = threading.Thread(target=wiggle)
    try:
        with AgentRun(driver) as run:
            mover.start()
            run.wait(lambda: run.count(Kind.FILTERED) + run.count(Kind.STALL) >= 6, "six stall-like grabs")
    finally:
        moving.clear()
        if mover.ident is not None:
            mover.join()
        driver.execute_script("window.iqnTest.resume()")
        gui.moveTo(*PARK)
    assert run.stats is not None and run.stats.signals == 0 and run.stats.signal_failures == 0
    judged = run.verdicts()
    judged = judged[next(i for i, v in enumerate(judged) if v.kind in (Kind.STALL, Kind.FILTERED)) :]
    assert all((v.kind, v.reason) == (Kind.FILTERED, "input") for v in judged), judged
    assert page.take_posts() == [] and len(player_state(driver)["clicks"]) == clicks0


class HeldInput(RecordedInput):
    """RecordedInput whose events the test can wait for before the watcher takes them."""

    def __init__(self) -> None:
        super().__init__()
        self._held: list[InputEvent] = []

    def wait_events(self, check: Callable[[list[InputEvent]], bool], what: str) -> None:
        def arrived() -> bool:
            self._held += RecordedInput.take(self)
            return check(self._held)

        wait_for(arrived, what)

    def take(self) -> list[InputEvent]:
        out, self._held = self._held + RecordedInput.take(self), []
        return out


def motion_to(x: int, y: int) -> Callable[[list[InputEvent]], bool]:
    return lambda evs: any(e.kind == MOTION and (e.x, e.y) == (x, y) for e in evs)


def test_input_watcher_ignores_own_clicks_and_motion_elsewhere(desktop: str, gui: Any) -> None:
    """Each check runs once the X server has delivered the events it is about."""
    player = Rect(100, 100, 300, 200)
    src = HeldInput()
    w = InputWatcher(src)
    try:
        gui.moveTo(610, 610)
        gui.moveTo(600, 600)
        src.wait_events(motion_to(600, 600), "the pointer at 600,600")
        w.check(player)
        gui.moveTo(650, 620)  # motion away from the player
        src.wait_events(motion_to(650, 620), "the pointer at 650,620")
        assert w.check(player) is None
        t0 = time.time()
        gui.moveTo(200, 200)  # over the player
        src.wait_events(motion_to(200, 200), "the pointer at 200,200")
        t_in = w.check(player)
        assert t_in is not None and t0 <= t_in <= time.time()
        gui.moveTo(650, 620)
        src.wait_events(motion_to(650, 620), "the pointer back at 650,620")
        w.check(player)
        gui.press("shift")  # a key press counts wherever the pointer is
        src.wait_events(lambda evs: any(e.kind == KEY_RELEASE for e in evs), "the key press and release")
        assert any(e.kind == KEY_PRESS for e in src._held)
        assert w.check(player) is not None
        burst = Signaler(2, gui).signal(Point(300, 150))  # our own clicks, inside the player even
        w.own_burst(burst.began, burst.end)

        def whole_burst(evs: list[InputEvent]) -> bool:
            ups = [i for i, e in enumerate(evs) if e.kind == BUTTON_RELEASE]
            return len(ups) == 2 and motion_to(650, 620)(evs[ups[-1] :])

        src.wait_events(whole_burst, "the burst's clicks and the pointer's way back")
        assert w.check(player) is None
    finally:
        src.close()


def test_calibration_by_hovering_matches_selenium(driver: Any, gui: Any, tmp_path: Path) -> None:
    """The user moves to each position once the recorder asks for it."""
    lay = located(driver)
    pl = lay.player
    corner = (pl.left + pl.width - 1, pl.top + pl.height - 1)
    targets = [(pl.left, pl.top), corner, (lay.switch.x, lay.switch.y)]
    said: queue.Queue[str] = queue.Queue()
    failed: list[BaseException] = []

    def hover() -> None:
        try:
            for x, y in targets:
                while "rest the mouse pointer" not in said.get(timeout=DEADLINE):
                    pass
                gui.moveTo(x, y)
                while "recorded" not in said.get(timeout=DEADLINE):
                    pass
        except BaseException as e:  # reported by the test thread
            failed.append(e)

    dpy = open_display()
    mover = threading.Thread(target=hover)
    try:
        gui.moveTo(5, 5)
        mover.start()
        got = record_positions(lambda: pointer_position(dpy), said.put, 0.25, DEADLINE, poll=0.02)
    finally:
        mover.join()
        dpy.close()
    assert not failed and got == targets
    from user_agent.layout import save_calibration

    cal = Layout(Rect.from_corners(*got[0], got[1][0] + 1, got[1][1] + 1), Point(*got[2]))
    save_calibration(cal, tmp_path / "cal.json")
    assert load_calibration(tmp_path / "cal.json") == lay
    assert FixedLocator(cal).locate().layout == lay


def test_truth_recorder_on_the_page(driver: Any, tmp_path: Path) -> None:
    from user_agent.truth import read_stamps, record_truth

    driver.execute_script("window.iqnPlayer.stalls = []")
    stop = threading.Event()
    out, stamps = tmp_path / "Real_stalls.txt", tmp_path / "truth_stamps.tsv"
    with open(out, "w", buffering=1) as f, open(stamps, "w", buffering=1) as g:
        rec = threading.Thread(target=record_truth, args=(driver, f, stop, 0.1), kwargs={"stamps": g})
        rec.start()
        try:
            wait_for(lambda: driver.execute_script("return !!window.__iqnTruth"), "the recorder's observer")
            driver.execute_script("window.iqnTest.stall(600)")
            ((s0, s1),) = wait_for(lambda: closed_stalls(driver), "the page's stall to end")
            wait_for(lambda: len(out.read_text().split()) >= 2, "the stall's end in the file")
        finally:
            stop.set()
            rec.join()
    (st,) = read_real_stalls(out)
    # the truth is the painted moment: after the page's change, within a few frames
    assert 0 <= st.start - s0 < 0.1 and 0 <= st.end - s1 < 0.1
    assert st.duration == pytest.approx(s1 - s0, abs=0.1)
    (s_kind, s_dom, s_paint, _), (e_kind, e_dom, e_paint, _) = read_stamps(stamps)
    assert (s_kind, e_kind) == ("S", "E")
    assert abs(s_dom - s0) < 0.02 and abs(e_dom - s1) < 0.02  # the DOM stamps: the page's own moments
    assert s_paint == pytest.approx(st.start, abs=1e-6) and e_paint == pytest.approx(st.end, abs=1e-6)
    assert s_paint > s_dom and e_paint > e_dom  # a paint comes after the change it shows


def test_failed_grabs_are_retried_then_skipped(desktop: str, tmp_path: Path) -> None:
    """A region partly off the screen makes X refuse every grab (a real X error):
    each frame is retried, then logged as N-, and the loop carries on."""
    from user_agent.capture import GrabError, grab_with_retries, make_grabber

    off = Rect(1200, 900, 200, 200)  # the screen is 1280x1024
    g = make_grabber("mss")
    try:
        with pytest.raises(GrabError, match="failed 4 times"):
            grab_with_retries(g, off)
        grid, retried = grab_with_retries(g, Rect(0, 0, 640, 360))
        assert retried == 0 and grid.shape == (36, 64)
    finally:
        g.close()
    log = tmp_path / "log.txt"
    stop = threading.Event()
    frames: list[Verdict] = []

    def four_frames(v: Verdict, b: Burst | None) -> None:
        frames.append(v)
        if len(frames) >= 4:
            stop.set()

    with open(log, "w") as f:
        stats = run_agent(FixedLocator(Layout(off, Point(10, 10))), stop, p=0.1,
                          log=f, watch_input=False, on_verdict=four_frames)  # fmt: skip
    assert stats.frames == 4 and stats.grab_failures == stats.frames and stats.signals == 0
    assert all("grab failed" in v.reason for v in frames)
    assert [k for k, _ in read_detected_clicks(log)] == ["N"] * 4


def test_user_pause_is_not_signalled(driver: Any, page: PageServer, gui: Any) -> None:
    """The user clicks the picture to pause: the pause icon animates in the centre
    over a still picture (stall-like while it lasts: the ``input`` filter's case),
    then the paused picture stays still (a ``still`` verdict). Neither is a stall
    (docs/user-agent.md, "What is filtered")."""
    lay = located(driver)
    reset_page(driver)
    page.take_posts()
    centre = (lay.player.left + lay.player.width // 2, lay.player.top + lay.player.height // 2)
    try:
        with AgentRun(driver) as run:
            run.wait(lambda: run.count(Kind.PLAYING) >= 3, "the agent to see playback")
            t_click = time.time()
            gui.click(*centre)  # the user's click; the pointer stays over the picture
            ((t_paused, paused),) = wait_for(lambda: player_state(driver)["paused"], "the page to pause")
            assert paused
            quiet = t_click + CFG.input_quiet
            run.wait(lambda: len(run.verdicts(after=quiet)) >= 5, "five grabs after the input filter's time")
    finally:
        driver.execute_script("document.querySelector('#movie_player video').play()")
        gui.moveTo(*PARK)
    assert run.stats is not None and run.stats.signals == 0 and run.count(Kind.STALL) == 0
    late = run.verdicts(after=quiet)
    assert all(v.kind is Kind.STILL for v in late), f"after the pause: {late}"
    st = player_state(driver)
    assert st["stalls"] == [] and st["clicks"] == [] and page.take_posts() == []
    assert len(st["playerClicks"]) == 1 and t_paused / 1000 >= t_click
    wait_for(lambda: playing(driver), "playback to resume after the test")


def test_seek_rebuffer_is_held_back_then_signalled(driver: Any, page: PageServer, gui: Any) -> None:
    """The user clicks the progress bar; the player jumps there and rebuffers (the
    spinner over a frozen picture) for 3 s. The first second is the user's doing
    (``input``/``seek`` filters); a rebuffer that goes on is a stall and is
    signalled, until playback resumes."""
    lay = located(driver)
    reset_page(driver)
    page.take_posts()
    ok0 = player_state(driver)["autoplayOk"]
    driver.execute_script("window.iqnTest.seekRebufferMs = 3000")
    bar = (lay.player.left + lay.player.width * 3 // 4, lay.player.top + lay.player.height - 51)
    try:
        with AgentRun(driver, protocol="tick") as run:  # counts n per signalling grab
            run.wait(lambda: run.count(Kind.PLAYING) >= 3, "the agent to see playback")
            gui.moveTo(*PARK)
            t_click = time.time()
            gui.click(*bar)  # pyautogui: the pointer goes to the bar, then clicks
            gui.moveTo(*PARK)
            # the seek's rebuffer; the looping clip's own flash of the spinner at
            # its loop point (tens of ms, before the click) is not it
            after_click = lambda: (c := closed_stalls(driver)) and [x for x in c if x[0] >= t_click]  # noqa: E731
            stalls_seen = run.wait(after_click, "the seek's rebuffer to end")
            assert len(stalls_seen) == 1, (stalls_seen, t_click, player_state(driver)["seeks"])
            ((s0, s1),) = stalls_seen
            run.wait(lambda: run.count(Kind.PLAYING, after=s1) >= 3, "the agent to see playback again")
    finally:
        driver.execute_script("window.iqnTest.seekRebufferMs = 600")
        gui.moveTo(*PARK)
    st = player_state(driver)
    assert len(st["seeks"]) == 1 and st["seeks"][0][1] == pytest.approx(0.75, abs=0.05)
    assert st["paused"] == []  # the click hit the bar, not the picture
    assert s0 >= t_click
    verdicts = run.verdicts()
    stalls = [v.t for v in verdicts if v.kind is Kind.STALL]
    assert stalls, "a rebuffer that outlasts the hold-back is a stall"
    assert min(stalls) > t_click + CFG.input_quiet, "signalled the user's own seek"
    held = [v for v in verdicts if s0 <= v.t <= t_click + CFG.input_quiet]
    assert any(v.kind is Kind.FILTERED for v in held), f"no stall-like grab in the first second: {held}"
    resumed = next(v.t for v in verdicts if v.t > s1 and v.kind is Kind.PLAYING)
    assert all(s0 < t < resumed for t in stalls)
    assert run.stats is not None and run.stats.signals == len(stalls)
    posts = switch_clicks_answered(driver, page, ok0 + 4 * len(stalls))
    assert len(posts) == 4 * len(stalls) == len(st["clicks"])


def enter_player_fullscreen(driver: Any) -> None:
    """What the player's fullscreen button does (a user gesture, given through CDP)."""
    r = driver.execute_cdp_cmd("Runtime.evaluate", {
        "expression": "document.getElementById('movie_player').requestFullscreen().then(() => 'ok', String)",
        "userGesture": True, "awaitPromise": True,
    })  # fmt: skip
    assert r["result"].get("value") == "ok", r


def fullscreen_change(driver: Any, entered: bool, after: float) -> float | None:
    """When the page's fullscreenchange to ``entered`` happened after ``after`` (epoch s)."""
    for t, on in player_state(driver)["fullscreen"]:
        if on == entered and t / 1000 >= after:
            return float(t / 1000)
    return None


def leave_fullscreen(driver: Any, windowed: Layout, profile: str = "youtube") -> None:
    driver.execute_script("if (document.fullscreenElement) document.exitFullscreen()")
    wait_for(lambda: located(driver, profile) == windowed, "the player back in the window")


def test_player_fullscreen_hides_the_switch_and_nothing_is_clicked(driver: Any, page: PageServer) -> None:
    """A stall goes on while the user puts the player in fullscreen and back. In
    fullscreen the player covers the page, the switch included: the agent must
    neither grab nor click (a click at the switch's place would hit the picture;
    on YouTube it pauses). Back in the window it re-locates and signals again,
    after the geometry has settled. Profile ``lab``: its switch is below the
    player (YouTube's, in the player's own control bar, stays usable)."""
    windowed = located(driver, "lab")
    reset_page(driver)
    page.take_posts()
    ok0 = player_state(driver)["autoplayOk"]
    driver.execute_script("window.iqnTest.stall(0)")  # until resume()
    try:
        with AgentRun(driver, protocol="tick", profile="lab") as run:  # n per signalling grab
            run.wait(lambda: len(run.bursts()) >= 2, "signals from the windowed player")
            t0 = time.time()
            enter_player_fullscreen(driver)
            t_in = wait_for(lambda: fullscreen_change(driver, True, t0), "the player to go fullscreen")
            settled = t_in + CFG.geometry_settle  # a layout there could be signalled from here on
            run.wait(lambda: sum(t > settled for t, _, _ in run.locator.seen) >= 5, "grabs in fullscreen")
            assert player_state(driver)["playerClicks"] == [], "a click hit the fullscreen picture"
            t1 = time.time()
            driver.execute_script("document.exitFullscreen()")
            t_out = wait_for(lambda: fullscreen_change(driver, False, t1), "the player to leave fullscreen")
            run.wait(lambda: len(run.bursts(after=t_out)) >= 2, "signals after fullscreen")
    finally:
        driver.execute_script("window.iqnTest.resume()")
        leave_fullscreen(driver, windowed, "lab")
    st = player_state(driver)
    assert st["playerClicks"] == [] and st["paused"] == [], "a click hit the picture"
    assert not [b for b in run.bursts(after=t_in) if b.start < t_out], "clicked while in fullscreen"
    in_fs = [(lay, why) for t, lay, why in run.locator.seen if t_in < t < t_out]
    assert in_fs and all(lay is None and "fullscreen" in why for lay, why in in_fs), in_fs[:3]
    assert [lay for t, lay, _ in run.locator.seen if t > t_out][-1] == windowed
    run.assert_settled_before_signalling()
    signals = len(run.bursts())
    posts = switch_clicks_answered(driver, page, ok0 + 4 * signals)
    assert len(posts) == 4 * signals == len(st["clicks"])


def test_browser_fullscreen_moves_the_player_and_the_agent_follows(driver: Any, page: PageServer) -> None:
    """Browser fullscreen (F11) drops the toolbars: the player and the switch move
    on the screen during a stall. The agent must re-locate both, let the geometry
    settle, and keep clicking the switch where it now is; and again on the way back."""
    windowed = located(driver)
    reset_page(driver)
    page.take_posts()
    ok0 = player_state(driver)["autoplayOk"]
    start_state = driver.execute_script(SWITCH_STATE)
    driver.execute_script("window.iqnTest.stall(0)")
    try:
        with AgentRun(driver, protocol="tick") as run:  # counts n per signalling grab
            run.wait(lambda: len(run.bursts()) >= 2, "signals from the windowed browser")
            t0 = time.time()
            driver.fullscreen_window()

            def moved(since: float, other: Layout | None) -> tuple[float, Layout] | None:
                return next(((t, lay) for t, lay, _ in list(run.locator.seen)
                             if t > since and lay is not None and lay != other), None)  # fmt: skip

            t_fs, full = run.wait(lambda: moved(t0, windowed), "the agent to re-locate the player")
            run.wait(lambda: len(run.bursts(after=t_fs)) >= 2, "signals in the fullscreen browser")
            t1 = time.time()
            driver.execute_script("document.exitFullscreen()")
            t_back, _ = run.wait(lambda: moved(t1, full), "the agent to re-locate the player again")
            run.wait(lambda: len(run.bursts(after=t_back)) >= 2, "signals after fullscreen")
    finally:
        driver.execute_script("window.iqnTest.resume()")
        leave_fullscreen(driver, windowed)
    assert full.player.top != windowed.player.top and full.switch != windowed.switch
    assert [lay for t, lay, _ in run.locator.seen][-1] == windowed
    signals = len(run.bursts())
    posts = switch_clicks_answered(driver, page, ok0 + 4 * signals)
    st = player_state(driver)
    assert len(posts) == 4 * signals == len(st["clicks"]), "a burst missed the switch"
    run.assert_settled_before_signalling()
    assert st["playerClicks"] == []
    assert driver.execute_script(SWITCH_STATE) == start_state


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "user_agent.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def run_cli_until(args: list[str], log: Path, done: Callable[[list[tuple[str, float]]], bool], what: str
                  ) -> tuple[str, list[tuple[str, float]]]:  # fmt: skip
    """``iqn-agent run`` until its log shows what the test needs, then Ctrl-C as a
    user would; returns its stderr and the complete log."""
    proc = subprocess.Popen([sys.executable, "-m", "user_agent.cli", *args, "--log", str(log)],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        def ready() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return log.exists() and done(read_detected_clicks(log))

        wait_for(ready, what, timeout=60)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return err, read_detected_clicks(log)


def summary(stderr: str) -> tuple[int, int]:
    """(grabs, signals) from the agent's last line."""
    m = re.search(r"(\d+) grabs, (\d+) signals", stderr.strip().splitlines()[-1])
    assert m, stderr
    return int(m[1]), int(m[2])


def test_cli_run_with_calibration_for_a_user_started_browser(
    driver: Any, page: PageServer, tmp_path: Path
) -> None:
    from user_agent.layout import save_calibration

    save_calibration(located(driver), tmp_path / "cal.json")
    page.take_posts()
    ok0 = player_state(driver)["autoplayOk"]
    driver.execute_script("window.iqnTest.stall(0)")  # stalled all along
    try:
        err, lines = run_cli_until(
            ["run", "--calibration", str(tmp_path / "cal.json"), "--protocol", "tick"],
            tmp_path / "Detected_clicks_0.2.txt",
            lambda ls: sum(k == "S" for k, _ in ls) >= 3, "three signals in the log",
        )
    finally:
        driver.execute_script("window.iqnTest.resume()")
    kinds = [k for k, _ in lines]
    assert summary(err) == (len(lines), kinds.count("S"))
    first = kinds.index("S")
    assert first <= 3 and set(kinds[first:]) == {"S"}  # seen within a few grabs, then every grab
    assert len(switch_clicks_answered(driver, page, ok0 + 4 * kinds.count("S"))) == 4 * kinds.count("S")


def test_cli_calibrate_records_hovered_positions(driver: Any, gui: Any, tmp_path: Path) -> None:
    lay = located(driver)
    pl = lay.player
    corner = (pl.left + pl.width - 1, pl.top + pl.height - 1)
    targets = [(pl.left, pl.top), corner, (lay.switch.x, lay.switch.y)]
    gui.moveTo(5, 5)  # resting here at the start must not count as the first corner
    out = tmp_path / "cal.json"
    still = 0.3
    cmd = ["calibrate", "--still", str(still), "--timeout", str(DEADLINE), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "user_agent.cli", *cmd], stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: [lines.put(s) for s in proc.stderr], daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        for x, y in targets:
            line = lines.get(timeout=DEADLINE)  # "rest the mouse pointer on ..." once it waits for us
            assert "rest the mouse pointer" in line, line
            time.sleep(2 * still)  # the user first rests where they were: that is not taken
            gui.moveTo(x, y)
            line = lines.get(timeout=DEADLINE)
            assert "recorded" in line and line.rstrip().endswith(f"at {x},{y}"), line
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert load_calibration(out) == lay


def test_cli_run_starts_its_own_chromium(desktop: str, page: PageServer, tmp_path: Path) -> None:
    """Last in the module: its window covers the shared browser while it runs."""
    log, truth = tmp_path / "clicks.txt", tmp_path / "Real_stalls.txt"
    err, lines = run_cli_until(
        ["run", "--url", page.url, "--truth", str(truth),
         "--chrome-arg=--window-position=200,100", "--chrome-arg=--window-size=800,640"],
        log, lambda ls: sum(k == "N" for k, _ in ls) >= 10, "ten grabs of the playing clip",
    )  # fmt: skip
    grabs, signals = summary(err)
    assert grabs == len(lines) and signals == sum(k == "S" for k, _ in lines)
    real = read_real_stalls(truth)  # page start-up may wait briefly; no other stall happens
    for kind, t in lines:
        if kind == "S":
            assert any(s.start < t < s.end + 0.2 for s in real), f"signal at {t} outside any stall"


# --- player profiles on the lab page (YouTube's player structure) ---------------------------


def page_autoplay(driver: Any) -> bool:
    return bool(driver.execute_script("return window.iqnPlayer.autoplay"))


def controls_hidden(driver: Any) -> bool:
    return bool(driver.execute_script(
        "return document.getElementById('movie_player').classList.contains('ytp-autohide')"))  # fmt: skip


def test_each_shipped_profile_locates_on_the_lab_page(driver: Any) -> None:
    """``youtube`` finds the switch in the player's control bar (its bottom strip),
    ``lab`` the one below the player; both read the one autoplay state."""
    on = page_autoplay(driver)
    yt = SeleniumLocator(driver, profile="youtube").locate()
    lab = SeleniumLocator(driver, profile="lab").locate()
    assert yt.layout is not None and lab.layout is not None, (yt.why, lab.why)
    assert yt.layout.player == lab.layout.player
    pl = yt.layout.player
    assert pl.contains(yt.layout.switch.x, yt.layout.switch.y)
    assert yt.layout.switch.y >= pl.top + pl.height * 0.85, "YouTube's switch sits in the control bar"
    assert lab.layout.switch.y > pl.top + pl.height, "the lab's switch sits below the player"
    assert yt.state is on and lab.state is on
    assert not yt.ad and "player.html" in yt.page


def test_hidden_controls_are_revealed_and_a_lost_click_is_restored(
    driver: Any, page: PageServer, gui: Any
) -> None:
    """Profile ``youtube`` during playback: the control bar (and the switch) has
    faded out and takes no clicks. The agent's move onto the switch shows it,
    the burst lands, and the bar fades again once the pointer is back; the
    picture is never clicked. One click of a burst is lost (the page drops it):
    the agent reads the flipped switch and clicks once to put it back."""
    gui.moveTo(*PARK)
    wait_for(lambda: controls_hidden(driver), "the control bar to fade out")
    reset_page(driver)
    page.take_posts()
    ok0 = player_state(driver)["autoplayOk"]
    before = page_autoplay(driver)
    driver.execute_script("window.iqnTest.dropClicks(1); window.iqnTest.stall(0)")
    try:
        with AgentRun(driver, protocol="tick") as run:
            wait_for(lambda: player_state(driver)["dropped"], "a click to be lost")
            run.wait(lambda: len(run.bursts()) >= 4, "bursts after the lost click")
            driver.execute_script("window.iqnTest.resume()")
            t_res = time.time()
            run.wait(lambda: run.count(Kind.PLAYING, after=t_res) >= 3, "playback again")
            wait_for(lambda: controls_hidden(driver), "the control bar to fade out again")
    finally:
        driver.execute_script("window.iqnTest.resume(); window.iqnTest.dropClicks(0)")
    assert run.stats is not None
    assert run.stats.restores == 1 and run.stats.hidden_bursts >= 1, run.stats
    assert page_autoplay(driver) is before, "the switch did not end as the user left it"
    st = player_state(driver)
    assert st["playerClicks"] == [] and st["paused"] == [], "a click hit the picture"
    clicks = 4 * run.stats.signals - 1 + run.stats.restores  # one lost, one restore
    posts = switch_clicks_answered(driver, page, ok0 + clicks)
    assert len(posts) == clicks == len(st["clicks"])


def test_navigation_relocates_and_an_ad_suppresses_signals(driver: Any, page: PageServer) -> None:
    """During one long stall: a navigation to a new video (new address, a new
    switch element one button to the left) is counted, the agent re-locates and
    its bursts land on the new switch; then an ad (the player's ``ad-showing``)
    silences the agent until it ends."""
    reset_page(driver)
    page.take_posts()
    ok0 = player_state(driver)["autoplayOk"]
    before = page_autoplay(driver)
    driver.execute_script("window.iqnTest.stall(0)")
    try:
        with AgentRun(driver, protocol="tick") as run:
            run.wait(lambda: len(run.bursts()) >= 2, "signals before the navigation")
            old = [lay for _, lay, _ in run.locator.seen if lay is not None][-1]
            driver.execute_script("window.iqnTest.navigate()")
            t_nav = player_state(driver)["navigations"][0][0] / 1000
            run.wait(lambda: len(run.bursts(after=t_nav)) >= 2, "signals after the navigation")
            driver.execute_script("window.iqnPlayer.ad(2500)")
            ads = lambda: (a := player_state(driver)["ads"]) and a[0][1] and a[0]  # noqa: E731
            ad0, ad1 = wait_for(ads, "the ad to end")
            run.wait(lambda: len(run.bursts(after=ad1 / 1000)) >= 2, "signals after the ad")
    finally:
        driver.execute_script("window.iqnTest.resume()")
    assert run.stats is not None and run.stats.navigations == 1, run.stats
    new = [lay for t, lay, _ in run.locator.seen if lay is not None and t > t_nav][-1]
    assert new.player == old.player and new.switch == Point(old.switch.x - 60, old.switch.y)
    during = [b.start for b in run.bursts() if ad0 / 1000 + 0.45 < b.start < ad1 / 1000]
    assert during == [], "signalled during the ad"
    assert run.stats.filtered["ad"] >= 5
    assert page_autoplay(driver) is before
    signals = len(run.bursts())
    posts = switch_clicks_answered(driver, page, ok0 + 4 * signals)
    assert len(posts) == 4 * signals == len(player_state(driver)["clicks"])
