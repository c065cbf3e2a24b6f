"""A screen witness for the demo's ground truth: when the screen, not the page,
shows the spinner and the video's frames.

The ground truth is stamped inside the page (the spinner's DOM change, and after
the next paint); what a viewer sees is the X screen. This thread grabs two small
patches of the screen many times a second - the spinner's box in the player's
centre and a patch of the picture near its top-left corner - and notes, per
grab, whether each changed since the grab before (bit for bit: a frozen picture
is bit-identical, the lab's clip has noise in every frame, the spinner turns).
From that log :func:`screen_edges` finds, per stall, when the picture froze and
moved again on screen and when the spinner's box started and stopped changing,
which the report sets against the page's stamps and the agent's edges.
A diagnostic: it costs a few per cent of a core, so a run with it says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: grabs per second (the lab's clip has 25 frames/s, the compositor 60)
RATE = 200.0
#: the spinner's box (px, square, centred in the player) and the picture's patch
SPINNER_BOX = 64
PATCH = 48
PATCH_INSET = 16


@dataclass(frozen=True, slots=True)
class Box:
    left: int
    top: int
    width: int
    height: int


def boxes(player_left: int, player_top: int, player_w: int, player_h: int) -> tuple[Box, Box]:
    """The spinner's box and the picture's patch for a player at that screen rectangle."""
    cx, cy = player_left + player_w // 2, player_top + player_h // 2
    half = SPINNER_BOX // 2
    return (
        Box(cx - half, cy - half, SPINNER_BOX, SPINNER_BOX),
        Box(player_left + PATCH_INSET, player_top + PATCH_INSET, PATCH, PATCH),
    )


@dataclass
class Witness:
    """Run with :meth:`start`, stop with :meth:`stop`; ``rows`` holds one
    ``(t, centre_changed, picture_changed)`` per grab, t = epoch s of the grab's start."""

    centre: Box
    picture: Box
    rate: float = RATE
    rows: list[tuple[float, bool, bool]] = field(default_factory=list)
    error: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="screen-witness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        try:
            import mss

            with mss.MSS() as sct:  # one X connection, this thread's own
                regions = [(b.left, b.top, b.left + b.width, b.top + b.height)
                           for b in (self.centre, self.picture)]  # fmt: skip
                prev: list[bytes] | None = None
                period = 1.0 / self.rate
                nxt = time.monotonic()
                while not self._stop.is_set():
                    t = time.time()
                    now = [bytes(sct.grab(r).raw) for r in regions]
                    if prev is not None:
                        self.rows.append((t, now[0] != prev[0], now[1] != prev[1]))
                    prev = now
                    nxt += period
                    delay = nxt - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                    else:
                        nxt = time.monotonic()
        except Exception as e:  # no display, X error: the run goes on without a witness
            self.error = str(e) or type(e).__name__

    def write(self, path: Path) -> None:
        lines = "".join(f"{t:.6f}\t{int(c)}\t{int(p)}\n" for t, c, p in self.rows)
        path.write_text("t\tcentre\tpicture\n" + lines)


@dataclass(frozen=True, slots=True)
class ScreenStall:
    """One stall as the screen showed it (epoch s; None: not seen)."""

    froze: float | None  # the picture's last change before the stall
    spinner_on: float | None  # the spinner's box first changed after that
    spinner_off: float | None  # its last change before the picture moved again
    moved: float | None  # the picture's first change after the stall


def screen_edges(
    rows: Sequence[tuple[float, bool, bool]], stalls: Sequence[tuple[float, float]], margin: float = 0.3
) -> list[ScreenStall]:
    """For each stall (page stamps, start and end), the screen's edges around it.

    The picture froze at its last change before ``start + margin`` and moved at
    its first change after ``end - margin`` (a stall of the demo is longer
    than 2 ``margin``); between those, the spinner's box changing is the
    spinner showing and turning. Each edge is the grab's time: it lies within
    one grab interval after the screen changed."""
    out: list[ScreenStall] = []
    for start, end in stalls:
        froze = max((t for t, _c, p in rows if p and start - 2.0 < t < start + margin), default=None)
        moved = min((t for t, _c, p in rows if p and end - margin < t < end + 2.0), default=None)
        on = off = None
        if froze is not None and moved is not None:
            on = min((t for t, c, _p in rows if c and froze < t < moved), default=None)
            off = max((t for t, c, _p in rows if c and froze < t < moved), default=None)
        out.append(ScreenStall(froze, on, off, moved))
    return out


_Stamp = tuple[float, float | None, float | None]  # dom, paint, video


def edge_table(
    stamps: Sequence[tuple[str, float, float | None, float | None]],
    agent: Sequence[tuple[float, float]],
    screen: Sequence[ScreenStall] | None,
) -> list[dict[str, float | None]]:
    """One row per stall of the page's stamps (kind, dom, paint, video), in ms
    against the DOM stamp of the same edge: the paint stamp, the video frame
    stamp, the screen's edges (when witnessed) and the agent's estimated edge
    (the one overlapping the stall most); plus the durations (s)."""
    pairs: list[tuple[_Stamp, _Stamp]] = []
    open_s: _Stamp | None = None
    for kind, dom, paint, video in stamps:
        if kind == "S":
            open_s = (dom, paint, video)
        elif open_s is not None:
            pairs.append((open_s, (dom, paint, video)))
            open_s = None

    def ms(x: float | None, ref: float) -> float | None:
        return None if x is None else round((x - ref) * 1000, 1)

    rows: list[dict[str, float | None]] = []
    for i, ((s_dom, s_paint, s_video), (e_dom, e_paint, e_video)) in enumerate(pairs):
        best = max(agent, key=lambda a: min(a[1], e_dom) - max(a[0], s_dom), default=None)
        if best is not None and min(best[1], e_dom) <= max(best[0], s_dom):
            best = None
        scr = screen[i] if screen is not None and i < len(screen) else None
        rows.append({
            "dom_s": round(e_dom - s_dom, 4),
            "paint_s": None if s_paint is None or e_paint is None else round(e_paint - s_paint, 4),
            "agent_s": None if best is None else round(best[1] - best[0], 4),
            "S_paint": ms(s_paint, s_dom), "S_video": ms(s_video, s_dom),
            "S_screen_froze": ms(scr.froze if scr else None, s_dom),
            "S_screen_spinner": ms(scr.spinner_on if scr else None, s_dom),
            "S_agent": ms(best[0] if best else None, s_dom),
            "E_paint": ms(e_paint, e_dom), "E_video": ms(e_video, e_dom),
            "E_screen_spinner": ms(scr.spinner_off if scr else None, e_dom),
            "E_screen_moved": ms(scr.moved if scr else None, e_dom),
            "E_agent": ms(best[1] if best else None, e_dom),
        })  # fmt: skip
    return rows
