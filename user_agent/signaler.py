"""The in-band signal: n clicks on the autoplay switch, back to back.

Each click makes the page POST the new switch state, and the server's 200 OK
is one QUIC packet in the 1,180-1,288 byte band the ISP agent counts. The
clicks go out with pyautogui's pause set to zero, through its X connection in
one batch, so a burst of n takes about a millisecond (< 5 ms between clicks),
well inside the ISP's 1.5 p start window. n must be even so the switch ends
as it was: the user's autoplay setting is theirs. The pointer goes back to
where it was.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from .errors import AgentError
from .layout import Point
from .protocol import check_n

__all__ = ["Burst", "Signaler", "check_n", "load_pyautogui"]


def load_pyautogui() -> Any:
    """pyautogui, set up for the agent; it opens the X display when imported."""
    if not os.environ.get("DISPLAY"):
        raise AgentError("no X display: set DISPLAY (and XAUTHORITY) to the screen the player is on")
    try:
        import pyautogui
    except Exception as e:  # Xlib auth errors, missing tkinter, ...
        raise AgentError(f"cannot drive the mouse on {os.environ['DISPLAY']}: {e}") from None
    _follow_display(os.environ["DISPLAY"], os.environ.get("XAUTHORITY", ""))
    pyautogui.PAUSE = 0  # no sleep after each call: the burst must take milliseconds
    pyautogui.MINIMUM_DURATION = 0
    # The fail-safe aborts when the pointer rests in a screen corner; the user
    # parking the mouse there must not stop the agent (our moves are bounded).
    pyautogui.FAILSAFE = False
    return pyautogui


def _follow_display(name: str, auth: str = "") -> None:
    """pyautogui opens DISPLAY once, at import; a process that moves to another
    X screen later (a test session, a demo restarting Xvfb) must reconnect it.

    The display name alone does not identify a screen: a new Xvfb may take the
    number of one that has exited, and pyautogui would then wait forever on the
    dead server's connection. Each of our Xvfb screens has its own authority
    file, so (name, XAUTHORITY) does."""
    import pyautogui._pyautogui_x11 as x11

    key = f"{name}|{auth}"
    if getattr(x11, "_iqn_display", None) != key:
        from Xlib.display import Display

        try:
            x11._display = Display(name)
        except Exception as e:
            raise AgentError(f"cannot drive the mouse on {name}: {e}") from None
        x11._iqn_display = key  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Burst:
    """One signal: when each click was sent (after its mouse-up; in batched
    mode, when it was queued), and when the first pointer move began."""

    clicks: tuple[float, ...]
    restored: bool
    began: float

    @property
    def start(self) -> float:
        return self.clicks[0]

    @property
    def end(self) -> float:
        return self.clicks[-1]

    @property
    def max_gap(self) -> float:
        return max((b - a for a, b in zip(self.clicks, self.clicks[1:], strict=False)), default=0.0)


MODES = ("batched", "pyautogui")


class Signaler:
    """``batched`` (default): pyautogui's own X connection carries the move, the
    n press/release pairs and the move back in one write and one round trip,
    so the X server handles them back to back. ``pyautogui``: one
    ``pyautogui.click`` per toggle; each click waits for three X round trips,
    and a busy X server (it also draws the video) stretches the gaps past 5 ms
    now and then. ``bench/bench_user_agent.py`` measures both.
    """

    def __init__(self, n: int = 4, gui: Any = None, mode: str = "batched") -> None:
        self.n = check_n(n)
        if mode not in MODES:
            raise AgentError(f"unknown click mode {mode!r}; choose from {', '.join(MODES)}")
        self.mode = mode
        self._gui = gui if gui is not None else load_pyautogui()

    def signal(self, switch: Point, toggles: int | None = None, reveal: float = 0.0) -> Burst:
        """Click the switch n times (or ``toggles``, an even number) and put the pointer back.

        ``reveal``: the switch is in controls that have faded out (YouTube hides
        them during playback): move onto it first and give the page ``reveal``
        seconds to show them before the first press."""
        return self._clicks(switch, self.n if toggles is None else check_n(toggles), reveal)

    def restore(self, switch: Point, reveal: float = 0.0) -> Burst:
        """One click: a click of an earlier burst was lost and the switch is off the user's state."""
        return self._clicks(switch, 1, reveal)

    def _clicks(self, switch: Point, count: int, reveal: float) -> Burst:
        gui = self._gui
        x0, y0 = gui.position()
        began = time.time()
        clicks: list[float] = []
        if self.mode == "batched":
            import pyautogui._pyautogui_x11 as x11
            from Xlib import X
            from Xlib.ext.xtest import fake_input

            d = x11._display
            fake_input(d, X.MotionNotify, x=switch.x, y=switch.y)
            if reveal > 0:
                d.sync()
                time.sleep(reveal)
            for _ in range(count):
                fake_input(d, X.ButtonPress, 1)
                fake_input(d, X.ButtonRelease, 1)
                clicks.append(time.time())
            fake_input(d, X.MotionNotify, x=x0, y=y0)
            d.sync()
        else:
            if reveal > 0:
                gui.moveTo(switch.x, switch.y)
                time.sleep(reveal)
            for _ in range(count):
                gui.click(switch.x, switch.y)
                clicks.append(time.time())
            gui.moveTo(x0, y0)
        restored = tuple(gui.position()) == (x0, y0)
        return Burst(tuple(clicks), restored, began)
