"""The end-user agent against a real headful Chromium on a private Xvfb screen,
playing the lab's player page (the page contract; tests/pages adds markers and hooks) from
a plain-HTTP server on 127.0.0.1: locating, real clicks, the loop, ground truth,
calibration."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import need
from pages.desktop import have_desktop_tools, xvfb
from pages.server import PageServer, make_clip

from iqn_ctl.evaluate.traces import read_detected_clicks, read_real_stalls
from user_agent.agent import run_agent
from user_agent.calibrate import record_positions
from user_agent.layout import Layout, Point, Rect, load_calibration
from user_agent.locate import FixedLocator, SeleniumLocator
from user_agent.signaler import Signaler
from user_agent.truth import TruthRecorder
from user_agent.xinput import InputWatcher, RecordedInput, open_display, pointer_position

MAGENTA, GREEN = (255, 0, 255), (0, 255, 0)


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


@pytest.fixture(scope="module")
def driver(desktop: str, page: PageServer) -> Iterator[Any]:
    from user_agent.browser import start_chromium

    d = start_chromium(page.url, ["--window-position=40,30", "--window-size=900,700"])
    try:
        deadline = time.monotonic() + 20
        while not d.execute_script("return window.iqnTest && window.iqnTest.playing()"):
            assert time.monotonic() < deadline, "the test clip never started playing"
            time.sleep(0.1)
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


def located(driver: Any) -> Layout:
    loc = SeleniumLocator(driver).locate()
    assert loc.layout is not None, loc.why
    return loc.layout


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
        deadline = time.monotonic() + 5
        while (after := located(driver)) == before:
            assert time.monotonic() < deadline, "layout did not follow the window"
            time.sleep(0.05)
        assert (after.player.left - before.player.left, after.player.top - before.player.top) == (100, 60)
        assert tuple(grab_rgb(after.player)[0, 0]) == MAGENTA
    finally:
        driver.set_window_position(40, 30)
        time.sleep(0.3)


@pytest.mark.parametrize("mode, n", [("batched", 4), ("batched", 6), ("pyautogui", 4)])
def test_signal_toggles_switch_n_times_and_restores_everything(
    driver: Any, page: PageServer, gui: Any, mode: str, n: int
) -> None:
    lay = located(driver)
    driver.execute_script("window.iqnPlayer.clicks = []")
    page.take_posts()
    switch_state = "return document.getElementById('autoplay-toggle').ariaChecked"
    start_state = driver.execute_script(switch_state)
    gui.moveTo(700, 650)
    burst = Signaler(n, gui, mode).signal(lay.switch)

    assert len(burst.clicks) == n and burst.restored
    assert tuple(gui.position()) == (700, 650)
    deadline = time.monotonic() + 5
    while len(page.posts) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # nothing more may arrive
    posts = page.take_posts()
    assert len(posts) == n
    first = start_state != "true"
    assert sorted(on for _, on in posts) == sorted([first, not first] * (n // 2))
    assert driver.execute_script(switch_state) == start_state
    clicks = driver.execute_script("return window.iqnPlayer.clicks")
    assert len(clicks) == n
    gaps = np.diff(clicks)
    assert (gaps >= 0).all()
    if mode == "batched":  # one X write: the browser sees the clicks back to back
        assert gaps.max() < 5.0, f"browser saw clicks {gaps} ms apart"
    arrivals = sorted(t for t, _ in posts)
    assert arrivals[-1] - arrivals[0] < 0.1  # one burst, not spread over p


def test_agent_signals_only_while_the_page_stalls(driver: Any, page: PageServer, tmp_path: Path) -> None:
    """The whole loop on the real page: 1.5 s playing, a 2 s stall, 1.5 s playing."""
    p = 0.2
    log_path, truth_path = tmp_path / "Detected_clicks_0.2.txt", tmp_path / "Real_stalls.txt"
    page.take_posts()
    driver.execute_script("window.iqnPlayer.stalls = []")
    stop = threading.Event()
    threading.Timer(1.5, lambda: driver.execute_script("window.iqnTest.stall(2000)")).start()
    with open(log_path, "w") as log, open(truth_path, "w") as truth:
        stats = run_agent(
            SeleniumLocator(driver, truth=True), stop, p=p, n=4, log=log, truth=TruthRecorder(truth),
            duration=5.0,
        )
    time.sleep(0.3)
    posts = page.take_posts()
    page_stalls = driver.execute_script("return window.iqnPlayer.stalls")
    assert len(page_stalls) == 1 and page_stalls[0][1] is not None
    s0, s1 = page_stalls[0][0] / 1000, page_stalls[0][1] / 1000

    real = read_real_stalls(truth_path)
    assert len(real) == 1
    assert abs(real[0].start - s0) < 0.02 and abs(real[0].end - s1) < 0.02

    lines = read_detected_clicks(log_path)
    assert 20 <= len(lines) <= 27  # one line per grab over 5 s
    sent = [t for kind, t in lines if kind == "S"]
    assert stats.signals == len(sent) >= 6  # ~2 s of stall at p = 0.2 s, minus detection delay
    assert all(s0 < t < s1 + p for t in sent), "signal outside the stall"
    assert sent[0] - s0 < 3 * p  # detected within a few grabs
    assert len(posts) == 4 * len(sent)
    assert all(s0 < t < s1 + 2 * p for t, _ in posts)
    assert stats.grab_failures == 0


def test_pointer_over_player_suppresses_signals(driver: Any, page: PageServer, gui: Any) -> None:
    """A user moving the mouse over the player during a stall: the agent keeps quiet."""
    lay = located(driver)
    page.take_posts()
    stop = threading.Event()
    verdicts: list[str] = []

    def wiggle() -> None:
        for i in range(14):
            if stop.is_set():
                return
            gui.moveTo(lay.player.left + 100 + 20 * (i % 2), lay.player.top + 100)
            time.sleep(0.15)

    driver.execute_script("window.iqnTest.stall(2200)")
    time.sleep(0.2)
    mover = threading.Thread(target=wiggle)
    mover.start()
    stats = run_agent(
        SeleniumLocator(driver), stop, p=0.2, n=4, duration=1.8,
        on_verdict=lambda v, b: verdicts.append(v.reason),
    )
    stop.set()
    mover.join()
    gui.moveTo(700, 650)
    assert stats.signals == 0
    assert stats.filtered["input"] >= 5
    time.sleep(1.0)
    assert page.take_posts() == []


def test_input_watcher_ignores_own_clicks_and_motion_elsewhere(desktop: str, gui: Any) -> None:
    player = Rect(100, 100, 300, 200)
    w = InputWatcher(RecordedInput())
    settle = 0.15  # events reach the recording thread asynchronously
    try:
        gui.moveTo(600, 600)
        time.sleep(settle)
        w.check(player)
        gui.moveTo(650, 620)  # motion away from the player
        time.sleep(settle)
        assert w.check(player) is None
        t0 = time.time()
        gui.moveTo(200, 200)  # over the player
        time.sleep(settle)
        t_in = w.check(player)
        assert t_in is not None and 0 <= t_in - t0 < settle
        gui.moveTo(650, 620)
        time.sleep(settle)
        w.check(player)
        gui.press("shift")  # a key press counts wherever the pointer is
        time.sleep(settle)
        assert w.check(player) is not None
        burst = Signaler(2, gui).signal(Point(300, 150))  # our own clicks, inside the player even
        w.own_burst(burst.began, burst.end)
        time.sleep(settle)
        assert w.check(player) is None
    finally:
        w.source.close()


def test_calibration_by_hovering_matches_selenium(driver: Any, gui: Any, tmp_path: Path) -> None:
    lay = located(driver)
    pl = lay.player
    corner = (pl.left + pl.width - 1, pl.top + pl.height - 1)
    targets = [(pl.left, pl.top), corner, (lay.switch.x, lay.switch.y)]

    def hover() -> None:
        time.sleep(0.3)  # let the recorder note where the pointer starts
        for x, y in targets:
            gui.moveTo(x, y)
            time.sleep(0.45)

    dpy = open_display()
    mover = threading.Thread(target=hover)
    try:
        gui.moveTo(5, 5)
        mover.start()
        got = record_positions(lambda: pointer_position(dpy), print, still=0.25, timeout=10, poll=0.02)
    finally:
        mover.join()
        dpy.close()
    assert got == targets
    from user_agent.layout import save_calibration

    cal = Layout(Rect.from_corners(*got[0], got[1][0] + 1, got[1][1] + 1), Point(*got[2]))
    save_calibration(cal, tmp_path / "cal.json")
    assert load_calibration(tmp_path / "cal.json") == lay
    assert FixedLocator(cal).locate().layout == lay


def test_truth_recorder_on_the_page(driver: Any, tmp_path: Path) -> None:
    from user_agent.truth import record_truth

    driver.execute_script("window.iqnPlayer.stalls = []")
    stop = threading.Event()
    out = tmp_path / "Real_stalls.txt"
    with open(out, "w") as f:
        rec = threading.Thread(target=record_truth, args=(driver, f, stop, 0.1))
        rec.start()
        time.sleep(0.3)
        driver.execute_script("window.iqnTest.stall(600)")
        time.sleep(1.0)
        stop.set()
        rec.join()
    (s0, s1), = driver.execute_script("return window.iqnPlayer.stalls")
    (st,) = read_real_stalls(out)
    assert abs(st.start - s0 / 1000) < 0.02 and abs(st.end - s1 / 1000) < 0.02
    assert 0.55 < st.duration < 0.75


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
    with open(log, "w") as f:
        stats = run_agent(FixedLocator(Layout(off, Point(10, 10))), threading.Event(), p=0.1,
                          log=f, duration=0.5, watch_input=False)
    assert stats.frames >= 4 and stats.grab_failures == stats.frames and stats.signals == 0
    assert {k for k, _ in read_detected_clicks(log)} == {"N"}


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "user_agent.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_cli_run_with_calibration_for_a_user_started_browser(
    driver: Any, page: PageServer, tmp_path: Path
) -> None:
    from user_agent.layout import save_calibration

    save_calibration(located(driver), tmp_path / "cal.json")
    page.take_posts()
    driver.execute_script("window.iqnTest.stall(5000)")
    log = tmp_path / "Detected_clicks_0.2.txt"
    r = run_cli("run", "--calibration", str(tmp_path / "cal.json"), "--duration", "2", "--log", str(log))
    assert r.returncode == 0, r.stderr
    assert "signals" in r.stderr.splitlines()[-1]
    sent = [t for kind, t in read_detected_clicks(log) if kind == "S"]
    assert len(sent) >= 5
    time.sleep(0.3)
    assert len(page.take_posts()) == 4 * len(sent)
    time.sleep(3.0)  # let the stall end before the next test


def test_cli_calibrate_records_hovered_positions(driver: Any, gui: Any, tmp_path: Path) -> None:
    lay = located(driver)
    pl = lay.player
    corner = (pl.left + pl.width - 1, pl.top + pl.height - 1)
    targets = [(pl.left, pl.top), corner, (lay.switch.x, lay.switch.y)]
    gui.moveTo(5, 5)  # resting here at the start must not count as the first corner
    out = tmp_path / "cal.json"
    cmd = ["calibrate", "--still", "0.3", "--timeout", "30", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "user_agent.cli", *cmd], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for x, y in targets:
            line = proc.stderr.readline()  # "rest the mouse pointer on ..." once it waits for us
            assert "rest the mouse pointer" in line, line
            time.sleep(0.6)  # longer than --still: a pointer at rest where it was is not taken
            gui.moveTo(x, y)
            assert "recorded" in proc.stderr.readline()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert load_calibration(out) == lay


def test_cli_run_starts_its_own_chromium(desktop: str, page: PageServer, tmp_path: Path) -> None:
    """Last in the module: its window covers the shared browser while it runs."""
    log, truth = tmp_path / "clicks.txt", tmp_path / "Real_stalls.txt"
    r = run_cli(
        "run", "--url", page.url, "--duration", "4", "--log", str(log), "--truth", str(truth),
        "--chrome-arg=--window-position=200,100", "--chrome-arg=--window-size=800,640",
    )
    assert r.returncode == 0, r.stderr
    lines = read_detected_clicks(log)
    assert 15 <= len(lines) <= 22
    real = read_real_stalls(truth)  # page start-up may wait briefly; no other stall happens
    for kind, t in lines:
        if kind == "S":
            assert any(s.start < t < s.end + 0.2 for s in real), f"signal at {t} outside any stall"
