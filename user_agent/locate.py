"""Finding the player and the autoplay switch on screen.

With a browser we drive (Selenium), the page tells us its element rectangles
and its window's position; ``layout.viewport_origin`` turns them into screen
pixels. We ask once per p (one round trip of a few milliseconds), so a
scroll, a resize or fullscreen is noticed at once and the switch is never
clicked where it used to be. The same round trip collects the ground-truth
spinner transitions when they are being recorded.

Which elements to ask for comes from a player profile (:mod:`user_agent.profiles`,
``youtube`` by default). For a browser the user started, ``iqn-agent calibrate``
stored fixed positions (:class:`FixedLocator`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .layout import CONTROLS_STRIP, Layout, Point, WindowMetrics, element_to_screen
from .profiles import DEFAULT_PROFILE, Profile, load_profile
from .truth import observe_js, reset_truth

# arguments[0]: record truth; arguments[1]: Profile.page_args(). The selectors come in
# as data, so a profile file can never inject code into the page.
GEOMETRY_JS = """
const a0 = arguments[1];
const q = (sel, root) => { try { return (root || document).querySelector(sel); } catch (e) { return null; } };
const is = (el, sel) => { try { return !!sel && !!el && el.matches(sel); } catch (e) { return false; } };
const p = q(a0.player), s = q(a0.switch);
const truth = arguments[0] ? TRUTH : [];
const page = location.href;
if (!p || !s) return {missing: !p ? 'player' : 'switch', truth: truth, page: page};
const st = a0.state ? (q(a0.state, s) || (s.matches(a0.state) ? s : null)) : s;
const v = st ? st.getAttribute(a0.attribute) : null;
const r = p.getBoundingClientRect(), b = s.getBoundingClientRect();
return {
  win: [screenX, screenY, outerWidth, outerHeight, innerWidth, innerHeight, devicePixelRatio],
  player: [r.x, r.y, r.width, r.height], switch: [b.x, b.y, b.width, b.height],
  fullscreen: !!document.fullscreenElement, truth: truth, page: page,
  state: v === null ? null : v === a0.on, ad: is(p, a0.ad), hidden: is(p, a0.hidden),
};
"""


def geometry_js(spinner: str) -> str:
    """The page query, with the ground-truth observer watching ``spinner``."""
    return GEOMETRY_JS.replace("TRUTH", observe_js(spinner))


@dataclass(frozen=True, slots=True)
class Located:
    layout: Layout | None
    why: str = ""  # when there is no layout
    truth: list[Any] = field(default_factory=list)
    #: the switch's state (on = True) as the page shows it; None when unknown
    state: bool | None = None
    #: an ad is playing (the profile's ad class): no signalling
    ad: bool = False
    #: the player's controls (and with them an in-controls switch) have faded out
    hidden: bool = False
    #: the page's address: a change is a navigation (a new video)
    page: str = ""
    #: the switch was not laid out (display:none), so its last known position is used
    remembered: bool = False


class Locator(Protocol):
    def locate(self) -> Located: ...


def _visible(box: list[float], inner_w: float, inner_h: float) -> bool:
    x, y, w, h = box
    return w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= inner_w + 0.5 and y + h <= inner_h + 0.5


def in_controls_strip(layout: Layout) -> bool:
    """The switch lies in the player's bottom control strip (which the detector ignores)."""
    pl, sw = layout.player, layout.switch
    return pl.contains(sw.x, sw.y) and sw.y >= pl.top + pl.height * (1 - CONTROLS_STRIP)


def layout_from_page(
    info: dict[str, Any], in_controls: bool = False, remembered: Point | None = None
) -> Located:
    """Screen layout from the page's answer to :data:`GEOMETRY_JS`.

    ``in_controls``: the profile puts the switch in the player's control bar
    (YouTube): it must then lie in the bottom strip of the player. Otherwise a
    switch inside the player's rectangle is covered by it (fullscreen).
    ``remembered``: where the switch was last seen, used when the page reports
    no box for it (hidden with ``display:none``) but the player has not moved.
    """
    truth = list(info.get("truth") or [])
    state = info.get("state")

    def answer(layout: Layout | None, why: str = "", remembered: bool = False) -> Located:
        return Located(
            layout, why, truth, state=None if state is None else bool(state), ad=bool(info.get("ad")),
            hidden=bool(info.get("hidden")), page=str(info.get("page") or ""), remembered=remembered,
        )

    if "missing" in info:
        return answer(None, f"no {info['missing']} element on the page")
    sx, sy, ow, oh, iw, ih, dpr = (float(v) for v in info["win"])
    win = WindowMetrics(sx, sy, ow, oh, iw, ih, dpr or 1.0)
    if not _visible(info["player"], iw, ih):
        return answer(None, "the player is not fully in view")
    player = element_to_screen(win, *info["player"])
    used_memory = False
    if in_controls and remembered is not None and info["switch"][2] <= 0 and info["switch"][3] <= 0:
        switch, used_memory = remembered, True
    elif not _visible(info["switch"], iw, ih):
        return answer(None, "the autoplay switch is not in view (fullscreen?)")
    else:
        sw = element_to_screen(win, *info["switch"])
        switch = Point(sw.left + sw.width // 2, sw.top + sw.height // 2)
    layout = Layout(player, switch)
    if in_controls:
        if not in_controls_strip(layout):
            return answer(None, "the autoplay switch is not in the player's control bar")
    elif player.contains(switch.x, switch.y):
        # A fullscreen player covers the page, but the switch keeps its layout box
        # (inside the viewport, so "in view"): a click there would hit the picture.
        return answer(None, "the autoplay switch is covered by the player (fullscreen?)")
    return answer(layout, "", used_memory)


class SeleniumLocator:
    """Asks the page (one round trip) where the profile's player and switch are,
    the switch's state, whether an ad plays or the controls are hidden, and the
    page's address; remembers the switch's last position for a switch that the
    page takes out of the layout while the controls are hidden."""

    def __init__(self, driver: Any, truth: bool = False, profile: Profile | str = DEFAULT_PROFILE) -> None:
        self.driver = driver
        self.truth = truth
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        self._js = geometry_js(self.profile.spinner)
        self._args = self.profile.page_args()
        self._last: Layout | None = None
        if truth:
            reset_truth(driver)

    def locate(self) -> Located:
        info = self.driver.execute_script(self._js, self.truth, self._args)
        memory = self._last.switch if self._last is not None else None
        loc = layout_from_page(info or {"missing": "player"}, self.profile.in_controls, memory)
        if loc.layout is not None:
            if loc.remembered and self._last is not None and loc.layout.player != self._last.player:
                return Located(None, "the switch is hidden and the player moved", loc.truth, state=loc.state,
                               ad=loc.ad, hidden=loc.hidden, page=loc.page)
            self._last = loc.layout
        return loc


class FixedLocator:
    def __init__(self, layout: Layout) -> None:
        self._located = Located(layout.check())

    def locate(self) -> Located:
        return self._located
