"""Where the player and the autoplay switch are on the screen, and the
calibration file that stores this for a browser the user started.

Screen coordinates are X root-window pixels, the ones pyautogui and the
grabbers use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import AgentError

MIN_PLAYER = 64  # the grid needs a few cells across
#: the bottom strip of the player (fraction of its height) where controls fade
#: in: the detector ignores it, and a switch in the player's own control bar
#: (YouTube's) lies in it
CONTROLS_STRIP = 0.15


@dataclass(frozen=True, slots=True)
class Rect:
    left: int
    top: int
    width: int
    height: int

    def contains(self, x: int, y: int) -> bool:
        return self.left <= x < self.left + self.width and self.top <= y < self.top + self.height

    @classmethod
    def from_corners(cls, x0: int, y0: int, x1: int, y1: int) -> Rect:
        return cls(min(x0, x1), min(y0, y1), abs(x1 - x0), abs(y1 - y0))


@dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: int


@dataclass(frozen=True, slots=True)
class Layout:
    player: Rect
    switch: Point

    def check(self) -> Layout:
        if self.player.width < MIN_PLAYER or self.player.height < MIN_PLAYER:
            raise AgentError(
                f"player area {self.player.width}x{self.player.height} is too small "
                f"(at least {MIN_PLAYER}x{MIN_PLAYER} pixels)"
            )
        pl, sw = self.player, self.switch
        if pl.contains(sw.x, sw.y) and sw.y < pl.top + pl.height * (1 - CONTROLS_STRIP):
            raise AgentError(
                "the autoplay switch lies inside the player area above its control bar; "
                "toggling it would be seen"
            )
        return self


@dataclass(frozen=True, slots=True)
class WindowMetrics:
    """What the page says about its window (``window.screenX`` etc., CSS pixels)."""

    screen_x: float
    screen_y: float
    outer_width: float
    outer_height: float
    inner_width: float
    inner_height: float
    dpr: float = 1.0


def viewport_origin(w: WindowMetrics) -> tuple[float, float]:
    """Screen position of the page viewport's top-left corner, in device pixels.

    The browser's chrome (tab strip, toolbar and, under automation, the
    "controlled by automated test software" bar) sits above the viewport and
    takes ``outerHeight - innerHeight``; the side borders split the width
    difference evenly. Chromium on Linux puts no chrome below the page.
    """
    border = max(0.0, (w.outer_width - w.inner_width) / 2)
    top = max(0.0, w.outer_height - w.inner_height - border)
    return (w.screen_x + border) * w.dpr, (w.screen_y + top) * w.dpr


def element_to_screen(
    w: WindowMetrics, x: float, y: float, width: float, height: float
) -> Rect:
    """An element's ``getBoundingClientRect()`` (viewport CSS px) on the screen."""
    ox, oy = viewport_origin(w)
    x0, y0 = ox + x * w.dpr, oy + y * w.dpr
    x1, y1 = ox + (x + width) * w.dpr, oy + (y + height) * w.dpr
    return Rect(math.ceil(x0), math.ceil(y0), math.floor(x1) - math.ceil(x0), math.floor(y1) - math.ceil(y0))


def save_calibration(layout: Layout, path: Path, display: str = "") -> None:
    data = {
        "player": {
            "left": layout.player.left,
            "top": layout.player.top,
            "width": layout.player.width,
            "height": layout.player.height,
        },
        "switch": {"x": layout.switch.x, "y": layout.switch.y},
        "display": display,
    }
    try:
        path.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as e:
        raise AgentError(f"{path}: cannot write calibration: {e.strerror or e}") from None


def load_calibration(path: Path) -> Layout:
    try:
        data = json.loads(path.read_text())
        p, s = data["player"], data["switch"]
        layout = Layout(
            Rect(int(p["left"]), int(p["top"]), int(p["width"]), int(p["height"])),
            Point(int(s["x"]), int(s["y"])),
        )
    except OSError as e:
        raise AgentError(f"{path}: cannot read calibration: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError):
        raise AgentError(
            f"{path}: not a calibration file (expected JSON with player left/top/width/height "
            "and switch x/y; make one with 'iqn-agent calibrate')"
        ) from None
    try:
        return layout.check()
    except AgentError as e:
        raise AgentError(f"{path}: {e}") from None
