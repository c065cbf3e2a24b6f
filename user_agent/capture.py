"""Grabbing the player's region of the screen, with retries.

Two grabbers with one interface: mss (X shared memory through ctypes) and
Pillow's ImageGrab (a plain XGetImage per call). ``bench/bench_user_agent.py``
measures both; mss is the default because it costs less per grab.

Grabs fail now and then under CPU load (a probe of ours saw ~7 % of grabs
fail), mostly with transient X errors; a failed grab is retried a few times
before the frame is given up, and the loop carries on with the next one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from .errors import AgentError
from .grid import Grid, cell_size, grid_from_bgra
from .layout import Rect

RETRIES = 3
RETRY_PAUSE = 0.01


class GrabError(Exception):
    """A grab that failed even after the retries."""


class Grabber(Protocol):
    name: str

    def grab(self, rect: Rect) -> Grid: ...

    def close(self) -> None: ...


class MssGrabber:
    name = "mss"

    def __init__(self) -> None:
        try:
            import mss

            self._mss = mss.MSS()
            self._err: type[Exception] = mss.ScreenShotError
        except Exception as e:  # no display, no X libraries
            raise AgentError(f"cannot open the X display for screen capture: {e}") from None

    def grab(self, rect: Rect) -> Grid:
        shot = self._mss.grab((rect.left, rect.top, rect.left + rect.width, rect.top + rect.height))
        return grid_from_bgra(shot.raw, shot.width, shot.height)

    def close(self) -> None:
        self._mss.close()


class PillowGrabber:
    name = "pillow"

    def __init__(self) -> None:
        from PIL import ImageGrab

        self._grab = ImageGrab.grab

    def grab(self, rect: Rect) -> Grid:
        img = self._grab(bbox=(rect.left, rect.top, rect.left + rect.width, rect.top + rect.height))
        raw = img.convert("RGBA").tobytes()  # channel order does not matter for B + 2G + R
        return grid_from_bgra(raw, img.width, img.height)

    def close(self) -> None:
        pass


GRABBERS: dict[str, Callable[[], Grabber]] = {"mss": MssGrabber, "pillow": PillowGrabber}


def make_grabber(name: str = "mss") -> Grabber:
    try:
        cls = GRABBERS[name]
    except KeyError:
        raise AgentError(f"unknown grabber {name!r}; choose from {', '.join(GRABBERS)}") from None
    return cls()


def grab_with_retries(grabber: Grabber, rect: Rect, retries: int = RETRIES) -> tuple[Grid, int]:
    """The grid and how many attempts failed before it; :class:`GrabError` when all did."""
    failures = 0
    while True:
        try:
            return grabber.grab(rect), failures
        except Exception as e:  # mss.ScreenShotError, Xlib/OSError from Pillow
            failures += 1
            if failures > retries:
                raise GrabError(f"screen grab failed {failures} times: {e}") from None
            time.sleep(RETRY_PAUSE)


def grab_grid(grabber: Grabber, player: Rect, controls: float) -> tuple[Grid, int]:
    """The player's grid without grabbing its bottom control strip.

    The detector never looks at the bottom ``controls`` fraction of the grid
    rows (the control bar fades in there), so those pixel rows are not grabbed
    nor summed (15 % of the grab and the grid, the agent's two largest costs)
    and come back as zero rows: the grid has the full shape, every cell the
    detector reads is the one a full grab gives, and its masks are unchanged.
    Returns the grid and the number of failed attempts, like
    :func:`grab_with_retries`."""
    c = cell_size(player.width)
    rows = player.height // c
    strip = round(rows * controls)
    if strip <= 0 or rows - strip < 4:
        return grab_with_retries(grabber, player)
    top = Rect(player.left, player.top, player.width, player.height - strip * c)
    grid, failures = grab_with_retries(grabber, top)
    pad = np.zeros((rows - grid.shape[0], grid.shape[1]), dtype=np.float32)
    return np.concatenate((grid, pad)), failures
