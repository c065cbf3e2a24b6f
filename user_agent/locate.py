"""Finding the player and the autoplay switch on screen.

With a browser we drive (Selenium), the page tells us its element rectangles
and its window's position; ``layout.viewport_origin`` turns them into screen
pixels. We ask on every grab (one round trip of a few milliseconds), so a
scroll, a resize or fullscreen is noticed at once and the switch is never
clicked where it used to be. The same round trip collects the ground-truth
spinner transitions when they are being recorded.

For a browser the user started, ``iqn-agent calibrate`` stored fixed positions
(:class:`FixedLocator`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .layout import Layout, Point, WindowMetrics, element_to_screen
from .truth import OBSERVE_JS, reset_truth

PLAYER = "#movie_player"
SWITCH = "#autoplay-toggle"

GEOMETRY_JS = f"""
const p = document.querySelector('{PLAYER}'), s = document.querySelector('{SWITCH}');
const truth = arguments[0] ? {OBSERVE_JS} : [];
if (!p || !s) return {{missing: !p ? 'player' : 'switch', truth: truth}};
const a = p.getBoundingClientRect(), b = s.getBoundingClientRect();
return {{
  win: [screenX, screenY, outerWidth, outerHeight, innerWidth, innerHeight, devicePixelRatio],
  player: [a.x, a.y, a.width, a.height], switch: [b.x, b.y, b.width, b.height],
  fullscreen: !!document.fullscreenElement, truth: truth,
}};
"""


@dataclass(frozen=True, slots=True)
class Located:
    layout: Layout | None
    why: str = ""  # when there is no layout
    truth: list[Any] = field(default_factory=list)


class Locator(Protocol):
    def locate(self) -> Located: ...


def _visible(box: list[float], inner_w: float, inner_h: float) -> bool:
    x, y, w, h = box
    return w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= inner_w + 0.5 and y + h <= inner_h + 0.5


def layout_from_page(info: dict[str, Any]) -> Located:
    """Screen layout from the page's answer to :data:`GEOMETRY_JS`."""
    truth = list(info.get("truth") or [])
    if "missing" in info:
        return Located(None, f"no {info['missing']} element on the page", truth)
    sx, sy, ow, oh, iw, ih, dpr = (float(v) for v in info["win"])
    win = WindowMetrics(sx, sy, ow, oh, iw, ih, dpr or 1.0)
    if not _visible(info["player"], iw, ih):
        return Located(None, "the player is not fully in view", truth)
    if not _visible(info["switch"], iw, ih):
        return Located(None, "the autoplay switch is not in view (fullscreen?)", truth)
    player = element_to_screen(win, *info["player"])
    sw = element_to_screen(win, *info["switch"])
    switch = Point(sw.left + sw.width // 2, sw.top + sw.height // 2)
    if player.contains(switch.x, switch.y):
        # A fullscreen player covers the page, but the switch keeps its layout box
        # (inside the viewport, so "in view"): a click there would hit the picture.
        return Located(None, "the autoplay switch is covered by the player (fullscreen?)", truth)
    return Located(Layout(player, switch), "", truth)


class SeleniumLocator:
    def __init__(self, driver: Any, truth: bool = False) -> None:
        self.driver = driver
        self.truth = truth
        if truth:
            reset_truth(driver)

    def locate(self) -> Located:
        info = self.driver.execute_script(GEOMETRY_JS, self.truth)
        return layout_from_page(info or {"missing": "player"})


class FixedLocator:
    def __init__(self, layout: Layout) -> None:
        self._located = Located(layout.check())

    def locate(self) -> Located:
        return self._located
