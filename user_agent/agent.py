"""The end-user agent's loop: every look locate, grab, judge, signal, log.

A look comes every p (protocol ``tick``) or every p/5 (``edges``, the
default; see :mod:`user_agent.protocol`).

:func:`run_agent` is the whole agent minus the browser and the command line,
so other programs (the end-to-end demo) can run it on a Selenium driver they
started with their own Chromium options::

    stop = threading.Event()
    stats = run_agent(SeleniumLocator(driver, truth=True), stop, p=0.2, n=4,
                      log=open("Detected_clicks_0.2.txt", "w"),
                      truth=TruthRecorder(open("Real_stalls.txt", "w")))

Grabs are scheduled on a fixed grid (t0 + k look) so the signal period does not
drift with the time each step takes; a step that overruns skips the grid
points it missed rather than bursting to catch up.

The log is the paper's ``Detected_clicks_<p>.txt``: one line per grab,
``S-<epoch>`` when a signal went out (the time of its first click) and
``N-<epoch>`` otherwise (the time of the grab).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from .capture import Grabber, GrabError, grab_grid, make_grabber
from .detector import DetectorConfig, Kind, StallDetector, Verdict
from .errors import AgentError
from .layout import Layout
from .locate import Locator
from .protocol import (
    DEFAULT_N,
    DEFAULT_P,
    DEFAULT_PROTOCOL,
    EdgeEncoder,
    check_n,
    check_p,
    check_protocol,
    look_interval,
)
from .signaler import Burst, Signaler
from .switch import SwitchGuard
from .truth import TruthRecorder
from .xinput import InputWatcher, RecordedInput

LOCATE_FAILURES = 5  # consecutive failed page queries before we give up on the browser
#: seconds between moving onto a switch whose controls have faded out and the
#: first press. 0: the move and the presses go out in one batch (the page shows
#: its controls on that move, and the press lands at the remembered position).
#: A wait here blocks the look loop: the lab demo with 50 ms (and faded
#: controls that took no clicks) lost looks and clicks and did far worse.
REVEAL = 0.0


@dataclass(slots=True)
class RunStats:
    frames: int = 0
    signals: int = 0
    toggles: int = 0
    grab_failures: int = 0  # frames lost after all retries
    grab_retries: int = 0  # failed attempts that a retry recovered
    no_layout: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    max_click_gap: float = 0.0  # agent-side; with batched clicks, between queueing them (see Burst)
    restore_failures: int = 0  # the pointer did not get back where it was
    signal_failures: int = 0
    #: single clicks that put the switch back after a click of a burst was lost
    restores: int = 0
    #: page navigations (a new video): the switch is re-located, its state re-read
    navigations: int = 0
    #: bursts sent while the switch's controls were hidden (revealed by the pointer move)
    hidden_bursts: int = 0
    #: protocol edges: each settled stall's estimated (start, end), epoch s, as
    #: the toggle count encodes it (for scoring the detection apart from the encoding)
    edges: list[tuple[float, float]] = field(default_factory=list)
    last_why: str = ""


def run_agent(
    locator: Locator,
    stop: threading.Event,
    *,
    p: float = DEFAULT_P,
    n: int = DEFAULT_N,
    log: IO[str] | None = None,
    truth: TruthRecorder | None = None,
    grabber: Grabber | None = None,
    signaler: Signaler | None = None,
    inputs: InputWatcher | None = None,
    watch_input: bool = True,
    detector: StallDetector | None = None,
    duration: float | None = None,
    on_verdict: Callable[[Verdict, Burst | None], None] | None = None,
    protocol: str = DEFAULT_PROTOCOL,
) -> RunStats:
    """Run until ``stop`` is set (or ``duration`` seconds pass); return counters."""
    check_p(p)
    check_n(n)
    check_protocol(protocol)
    look = look_interval(p, protocol)
    encoder = EdgeEncoder(p, n, look) if protocol == "edges" else None
    own_grabber = grabber is None
    grabber = grabber or make_grabber("mss")
    signaler = signaler or Signaler(n)
    own_inputs = inputs is None and watch_input
    if own_inputs:
        inputs = InputWatcher(RecordedInput())
    detector = detector or StallDetector(DetectorConfig())
    # protocol edges: one detector per phase of the look grid, each fed grabs p
    # apart as in protocol tick; a look's verdict is its phase's
    phases = [detector] + [StallDetector(detector.cfg) for _ in range(round(p / look) - 1)]
    look_no = 0
    phase_seen = [float("-inf")] * len(phases)
    stats = RunStats()
    layout: Layout | None = None
    locate_failures = 0
    t_end = None if duration is None else time.monotonic() + duration
    t_grid = time.monotonic()
    next_tick = t_grid
    guard = SwitchGuard()
    page_seen = ""
    try:
        located = None
        while not stop.is_set():
            burst: Burst | None = None
            fresh = False
            # the page is asked once per p (every look of phase 0): a Selenium
            # query costs far more than a grab; in between, the layout holds
            if look_no % len(phases) == 0 or located is None or located.layout is None:
                try:
                    located = locator.locate()
                    fresh = True
                    locate_failures = 0
                except Exception as e:  # the browser went away or hung up
                    locate_failures += 1
                    if locate_failures >= LOCATE_FAILURES:
                        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                        raise AgentError(f"lost the browser: {first}") from None
                    located = None
                if located is not None and truth is not None:
                    truth.feed(located.truth)
            t = time.time()
            if fresh and located is not None and located.page:
                if page_seen and located.page != page_seen:
                    # a new video: frames of the old one mean nothing, and the
                    # switch (re-located below) may be a new element
                    stats.navigations += 1
                    guard.forget()
                    for d in phases:
                        d.note_geometry(t)
                page_seen = located.page
            if located is None or located.layout is None or located.ad:
                if located is not None and located.ad:
                    # an ad plays: its stalls are not the video's, and the
                    # switch may not be the video's either; signal nothing
                    verdict = Verdict(t, Kind.FILTERED, "ad")
                else:
                    stats.no_layout += 1
                    stats.last_why = located.why if located else "page query failed"
                    verdict = Verdict(t, Kind.NONE, stats.last_why)
                for d in phases:
                    d.reset()
                layout = None
                if encoder is not None:
                    encoder.step(t, False)  # nowhere (or no business) to click: the settlement is lost
            else:
                if located.layout != layout:
                    # Unless this is the first look: the player moved, or it came back
                    # into view (fullscreen left, scrolled back), maybe still moving.
                    if stats.frames:
                        for d in phases:
                            d.note_geometry(t)
                    layout = located.layout
                reveal = REVEAL if located.hidden else 0.0
                hidden = located.hidden
                if inputs is not None:
                    t_in = inputs.check(layout.player, layout.switch)
                    if t_in is not None:
                        for d in phases:
                            d.note_input(t_in)
                    if inputs.switch_pressed is not None:
                        inputs.switch_pressed = None
                        guard.user_pressed()
                if fresh and guard.reading(t, located.state):
                    # a click of ours was lost: the switch is off the user's state
                    try:
                        fix = signaler.restore(layout.switch, reveal)
                        guard.clicked(fix.end)
                        stats.restores += 1
                        if inputs is not None:
                            inputs.own_burst(fix.began, fix.end)
                    except Exception as e:
                        stats.signal_failures += 1
                        stats.last_why = f"restore failed: {e}"
                phase = look_no % len(phases)
                det = phases[phase]
                # this phase's last grab may be stale (the loop fell behind and
                # skipped looks): a change since then may predate a stall, so
                # "playing" from it is inconclusive; "stall" still holds
                stale = t - phase_seen[phase] > 1.5 * p
                # the grab this look is compared with (its phase's previous one):
                # p ago when the loop keeps up, longer when it skipped looks
                ref = phase_seen[phase] if phase_seen[phase] > float("-inf") else None
                phase_seen[phase] = t
                try:
                    grid, retried = grab_grid(grabber, layout.player, det.cfg.controls)
                    stats.grab_retries += retried
                    verdict = det.frame(t, grid)
                except GrabError as e:
                    stats.grab_failures += 1
                    det.reset()
                    verdict = Verdict(t, Kind.NONE, str(e))
                toggles = n if verdict.stall else 0
                if encoder is not None:
                    # no reference grab yet in this phase, or a still picture: not conclusive
                    hold = verdict.kind in (Kind.STILL, Kind.NONE) or (stale and verdict.kind is Kind.PLAYING)
                    began = encoder.began
                    toggles = encoder.step(t, verdict.stall, hold, ref)
                    if began is not None and encoder.began is None:
                        stats.edges.append((began, encoder.ended))
                if toggles:
                    try:
                        burst = signaler.signal(layout.switch, toggles, reveal)
                    except Exception as e:  # an X error mid-burst: log it as no signal, go on
                        stats.signal_failures += 1
                        stats.last_why = f"signal failed: {e}"
                    if burst is not None:
                        if inputs is not None:
                            inputs.own_burst(burst.began, burst.end)
                        stats.signals += 1
                        stats.toggles += len(burst.clicks)
                        stats.max_click_gap = max(stats.max_click_gap, burst.max_gap)
                        stats.restore_failures += not burst.restored
                        stats.hidden_bursts += hidden
                        guard.clicked(burst.end)
            stats.frames += 1
            stats.kinds[verdict.kind.value] += 1
            if verdict.kind is Kind.FILTERED:
                stats.filtered[verdict.reason] += 1
            if log is not None:
                log.write(f"S-{burst.start!r}\n" if burst else f"N-{t!r}\n")
                log.flush()
            if on_verdict is not None:
                on_verdict(verdict, burst)
            now = time.monotonic()
            if t_end is not None and now >= t_end:
                break
            look_no += 1
            if t_grid + look_no * look < now:
                look_no += int((now - t_grid - look_no * look) // look) + 1
            next_tick = t_grid + look_no * look
            if stop.wait(next_tick - now):
                break
    finally:
        if own_grabber:
            grabber.close()
        if own_inputs and inputs is not None:
            inputs.source.close()
    return stats
