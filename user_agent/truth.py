"""Ground truth for experiments: when the page's spinner was shown and hidden.

A MutationObserver inside the page timestamps each change of the spinner's
visibility the moment it happens (``performance.timeOrigin + now()``, epoch
milliseconds with sub-millisecond resolution), so the recorder's polling rate
only decides how soon we learn of a change, not how precisely it is timed.
Written in the paper's ``Real_stalls.txt`` format (``S-<epoch>``/``E-<epoch>``),
one line as soon as it is known, so an interrupted run keeps what it saw.
A spinner already showing when recording starts counts from that moment.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import IO, Any

from .errors import AgentError

SPINNER = ".ytp-spinner"

# Installs the observer once per page; returns and clears the transitions seen.
_OBSERVE = """
(function () {
  let st = window.__iqnTruth;
  if (!st) {
    st = window.__iqnTruth = { events: [], shown: false };
    const now = () => performance.timeOrigin + performance.now();
    const check = () => {
      const el = document.querySelector(SPINNER_SELECTOR);
      const vis = !!el && el.isConnected && getComputedStyle(el).display !== 'none';
      if (vis !== st.shown) { st.shown = vis; st.events.push([vis ? 'S' : 'E', now()]); }
    };
    check();
    st.observer = new MutationObserver(check);
    st.observer.observe(document.documentElement, {
      attributes: true, childList: true, subtree: true, attributeFilter: ['style', 'class', 'hidden'],
    });
  }
  return st.events.splice(0);
})()
""".strip()


def observe_js(spinner: str = SPINNER) -> str:
    """The observer for a profile's spinner selector (as a JSON string literal: data, not code)."""
    return _OBSERVE.replace("SPINNER_SELECTOR", json.dumps(spinner))


OBSERVE_JS = observe_js()


# Forgets an earlier recording in this page (its observer and unread events).
RESET_JS = """
const st = window.__iqnTruth;
if (st) { st.observer.disconnect(); delete window.__iqnTruth; }
"""


def reset_truth(driver: Any) -> None:
    """Start recording afresh: transitions from before now are not ours to report."""
    driver.execute_script(RESET_JS)


class TruthRecorder:
    """Turns the page's spinner transitions into ``Real_stalls.txt`` lines."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._open = False
        self.stalls = 0

    def feed(self, events: list[Any]) -> None:
        for ev in events or []:
            kind, t_ms = str(ev[0]), float(ev[1])
            if kind == "S" and not self._open:
                self._open = True
            elif kind == "E" and self._open:
                self._open = False
                self.stalls += 1
            else:
                continue  # a page reload restarts the observer; keep the lines alternating
            self._out.write(f"{kind}-{t_ms / 1000.0:.6f}\n")
            self._out.flush()


def open_output(path: Path) -> IO[str]:
    try:
        return open(path, "w", buffering=1)
    except OSError as e:
        raise AgentError(f"{path}: cannot write: {e.strerror or e}") from None


def record_truth(
    driver: Any, out: IO[str], stop: threading.Event, poll: float = 0.2, spinner: str = SPINNER
) -> TruthRecorder:
    """Record spinner ground truth from ``driver``'s page until ``stop`` is set."""
    rec = TruthRecorder(out)
    reset_truth(driver)
    js = "return " + observe_js(spinner)
    while True:
        rec.feed(driver.execute_script(js))
        if stop.wait(poll):
            rec.feed(driver.execute_script(js))
            return rec
