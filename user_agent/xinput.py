"""User activity from the X server, for the detector's ``input`` filter.

The X RECORD extension hands us every key, button and pointer-motion event
the server receives from input devices, as it happens, on a thread of its
own, so a key press that came and went between two grabs is not missed
(polling the keyboard would miss it). We do not use the screensaver's idle
time: Chromium resets it while a video plays (its wake lock), which would
look like user input at the start of every stall.

Our own toggles are device events too (XTest); :class:`InputWatcher` ignores
events inside the signaler's last burst.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import AgentError
from .layout import Point, Rect

KEY_PRESS, KEY_RELEASE, BUTTON_PRESS, BUTTON_RELEASE, MOTION = 2, 3, 4, 5, 6
SWITCH_REACH = 24  # px around the switch's centre that count as a press on it


def open_display(name: str | None = None) -> Any:
    from Xlib import display as xdisplay

    try:
        return xdisplay.Display(name)
    except Exception as e:
        raise AgentError(f"cannot open the X display (is DISPLAY set? XAUTHORITY?): {e}") from None


def pointer_position(dpy: Any) -> tuple[int, int]:
    q = dpy.screen().root.query_pointer()
    return int(q.root_x), int(q.root_y)


@dataclass(slots=True)
class InputEvent:
    t: float
    kind: int
    x: int
    y: int


class RecordedInput:
    """Collects device events with their wall-clock arrival times (a background thread)."""

    def __init__(self, display: str | None = None) -> None:
        from Xlib.ext import record

        self._record = record
        self._data = open_display(display)
        self._ctl = open_display(display)
        if not self._data.has_extension("RECORD"):
            self._data.close()
            self._ctl.close()
            raise AgentError("the X server lacks the RECORD extension (needed to see user input)")
        self._ctx = self._data.record_create_context(
            0,
            [record.AllClients],
            [
                {
                    "core_requests": (0, 0),
                    "core_replies": (0, 0),
                    "ext_requests": (0, 0, 0, 0),
                    "ext_replies": (0, 0, 0, 0),
                    "delivered_events": (0, 0),
                    "device_events": (KEY_PRESS, MOTION),
                    "errors": (0, 0),
                    "client_started": False,
                    "client_died": False,
                }
            ],
        )
        self._data.sync()  # the context must exist before the control connection names it
        self._lock = threading.Lock()
        self._events: list[InputEvent] = []
        self._thread = threading.Thread(target=self._run, name="iqn-xrecord", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._data.record_enable_context(self._ctx, self._on_reply)
        except Exception:  # display closed under us at shutdown
            pass

    def _on_reply(self, reply: Any) -> None:
        from Xlib.protocol import rq

        if reply.category != self._record.FromServer or reply.client_swapped or not reply.data:
            return
        t = time.time()
        data = reply.data
        got: list[InputEvent] = []
        while data:
            ev, data = rq.EventField(None).parse_binary_value(data, self._data.display, None, None)
            got.append(InputEvent(t, ev.type, int(getattr(ev, "root_x", -1)), int(getattr(ev, "root_y", -1))))
        with self._lock:
            self._events.extend(got)
            del self._events[:-256]  # bounded: only the recent ones matter

    def take(self) -> list[InputEvent]:
        with self._lock:
            out, self._events = self._events, []
        return out

    def close(self) -> None:
        try:
            self._ctl.record_disable_context(self._ctx)
            self._ctl.flush()
            self._thread.join(2)
            self._ctl.record_free_context(self._ctx)
        finally:
            self._ctl.close()
            self._data.close()


@dataclass(slots=True)
class InputWatcher:
    """Decides, once per grab, whether the user did something over the player.

    Counts: pointer motion or a button over the player, and any key press (the
    keyboard focus is likely the player: space pauses, arrows seek). Pointer
    motion elsewhere on the screen does not count, nor do our own toggles.
    """

    source: RecordedInput
    # events this soon after our own burst are its echo; the RECORD thread may
    # see them 50+ ms late on a busy machine (the demo under load: 71 ms)
    own_margin: float = 0.15
    _own: list[tuple[float, float]] = field(default_factory=list)
    #: the latest user button press near the switch (``check(..., switch=)``), or None
    switch_pressed: float | None = None

    def own_burst(self, start: float, end: float) -> None:
        """The signaler clicked between these wall-clock times."""
        self._own.append((start - 0.002, end + self.own_margin))
        del self._own[:-4]

    def _ours(self, t: float) -> bool:
        return any(s <= t <= e for s, e in self._own)

    def check(self, player: Rect, switch: Point | None = None) -> float | None:
        """Wall-clock time of the latest user input over the player since the last check, or None.

        With ``switch``, a user button press within ``SWITCH_REACH`` px of it is
        also noted in :attr:`switch_pressed` (the user flipping autoplay)."""
        latest: float | None = None
        for ev in self.source.take():
            if self._ours(ev.t) or ev.kind == KEY_RELEASE:
                continue
            if ev.kind == KEY_PRESS or player.contains(ev.x, ev.y):
                latest = ev.t
            if (switch is not None and ev.kind == BUTTON_PRESS
                    and abs(ev.x - switch.x) <= SWITCH_REACH and abs(ev.y - switch.y) <= SWITCH_REACH):
                self.switch_pressed = ev.t
        return latest
