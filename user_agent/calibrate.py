"""Calibration for a browser the user started: they hover, we record.

The user rests the pointer on the player's top-left corner, then on its
bottom-right corner, then on the autoplay switch; a position is taken once the
pointer has stayed still for ``still`` seconds somewhere new. Hovering needs no
click, so calibrating never changes what the page is doing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .errors import AgentError
from .layout import Layout, Point, Rect
from .xinput import open_display, pointer_position

STEPS = (
    "the player's top-left corner",
    "the player's bottom-right corner",
    "the autoplay switch",
)


def record_positions(
    pointer: Callable[[], tuple[int, int]],
    say: Callable[[str], None],
    still: float = 1.5,
    timeout: float = 120.0,
    poll: float = 0.05,
) -> list[tuple[int, int]]:
    """One resting position per step, each different from the one before
    (and the first different from where the pointer was at the start)."""
    taken: list[tuple[int, int]] = []
    last = pointer()  # where the pointer rests now is no answer: the user has to move it
    deadline = time.monotonic() + timeout
    for step in STEPS:
        say(f"rest the mouse pointer on {step} (hold still {still:g} s)")
        pos, since = pointer(), time.monotonic()
        while True:
            if time.monotonic() > deadline:
                raise AgentError(f"calibration timed out after {timeout:g} s waiting for {step}")
            time.sleep(poll)
            now_pos = pointer()
            if now_pos != pos:
                pos, since = now_pos, time.monotonic()
            elif time.monotonic() - since >= still and pos != last:
                taken.append(pos)
                last = pos
                say(f"  recorded {step} at {pos[0]},{pos[1]}")
                break
    return taken


def calibrate(say: Callable[[str], None], still: float = 1.5, timeout: float = 120.0) -> Layout:
    dpy = open_display()
    try:
        (x0, y0), (x1, y1), (sx, sy) = record_positions(lambda: pointer_position(dpy), say, still, timeout)
    finally:
        dpy.close()
    return Layout(Rect.from_corners(x0, y0, x1 + 1, y1 + 1), Point(sx, sy)).check()
