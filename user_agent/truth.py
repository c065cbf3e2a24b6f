"""Ground truth for experiments: when the page's spinner was shown and hidden.

A MutationObserver inside the page timestamps each change of the spinner's
visibility the moment it happens in the DOM (``performance.timeOrigin + now()``,
epoch milliseconds with sub-millisecond resolution), so the recorder's polling
rate only decides how soon we learn of a change, not how precisely it is timed.

The viewer sees the change only when the browser paints it, which on a loaded
machine can be tens of milliseconds later. So each change is stamped twice:
``dom`` (the style change) and ``paint`` (after the next paint: a
``requestAnimationFrame`` callback runs just before the frame that shows the
change is painted, and a ``setTimeout(0)`` queued from it runs once that paint
has been handed on). For diagnosis it also notes the video's own frames
(``requestVideoFrameCallback``, where the page has a video): the last frame
shown before the spinner appeared (when the picture froze) and the first shown
after it went (when the picture moved again).

Written in the paper's ``Real_stalls.txt`` format (``S-<epoch>``/``E-<epoch>``),
one line as soon as it is known, so an interrupted run keeps what it saw; which
stamp goes there is the recorder's ``stamp`` (``paint`` by default: what the
viewer sees; ``dom`` falls back where no paint stamp came). All stamps of each
change can go to a second file, one tab-separated line per change.
A spinner already showing when recording starts counts from that moment.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import IO, Any

from .errors import AgentError

SPINNER = ".ytp-spinner"

# Installs the observer once per page; returns and clears the transitions whose
# stamps are complete, in order, as [kind, dom_ms, paint_ms, video_ms] (null: none
# came). A transition waits at most WAIT_MS for its paint and video stamps (a
# hidden page runs no animation frames; a video that never moves again has no
# next frame).
_OBSERVE = """
(function () {
  let st = window.__iqnTruth;
  if (!st) {
    st = window.__iqnTruth = { events: [], shown: false, frame: null };
    const now = () => performance.timeOrigin + performance.now();
    const vid = document.querySelector('video');
    const onFrame = (_t, meta) => {
      if (window.__iqnTruth !== st) return; // a reset: this loop ends
      st.frame = performance.timeOrigin + meta.expectedDisplayTime;
      for (const ev of st.events) if (ev.kind === 'E' && ev.video === undefined) ev.video = st.frame;
      vid.requestVideoFrameCallback(onFrame);
    };
    const watchVideo = !!vid && typeof vid.requestVideoFrameCallback === 'function';
    if (watchVideo) vid.requestVideoFrameCallback(onFrame);
    const check = () => {
      const el = document.querySelector(SPINNER_SELECTOR);
      const vis = !!el && el.isConnected && getComputedStyle(el).display !== 'none';
      if (vis === st.shown) return;
      st.shown = vis;
      // S: the picture froze when its last frame was shown; E: it moves at the next one
      const ev = { kind: vis ? 'S' : 'E', dom: now(), paint: undefined,
                   video: !watchVideo ? null : (vis ? st.frame : undefined) };
      st.events.push(ev);
      requestAnimationFrame(() => setTimeout(() => { ev.paint = now(); }, 0));
    };
    check();
    st.observer = new MutationObserver(check);
    st.observer.observe(document.documentElement, {
      attributes: true, childList: true, subtree: true, attributeFilter: ['style', 'class', 'hidden'],
    });
  }
  const t = performance.timeOrigin + performance.now();
  let n = 0;
  for (const ev of st.events) {
    const late = t - ev.dom > WAIT_MS;
    if (!late && (ev.paint === undefined || ev.video === undefined)) break;
    n++;
  }
  return st.events.splice(0, n).map((ev) => [ev.kind, ev.dom, ev.paint ?? null, ev.video ?? null]);
})()
""".strip()

#: ms a transition waits for its paint and video stamps before it is returned without them
WAIT_MS = 2000


def observe_js(spinner: str = SPINNER) -> str:
    """The observer for a profile's spinner selector (as a JSON string literal: data, not code)."""
    return _OBSERVE.replace("SPINNER_SELECTOR", json.dumps(spinner)).replace("WAIT_MS", str(WAIT_MS))


OBSERVE_JS = observe_js()


# Forgets an earlier recording in this page (its observer and unread events).
RESET_JS = """
const st = window.__iqnTruth;
if (st) { st.observer.disconnect(); delete window.__iqnTruth; }
"""


def reset_truth(driver: Any) -> None:
    """Start recording afresh: transitions from before now are not ours to report."""
    driver.execute_script(RESET_JS)


#: the stamps a transition can carry, in the order the page returns them
STAMPS = ("dom", "paint", "video")
#: the header of the stamps file
STAMPS_HEADER = "kind\tdom\tpaint\tvideo\n"


def _seconds(v: Any) -> float | None:
    return None if v is None else float(v) / 1000.0


class TruthRecorder:
    """Turns the page's spinner transitions into ``Real_stalls.txt`` lines.

    ``stamp``: which moment is the truth, ``paint`` (after the change was
    painted: what the viewer sees) or ``dom`` (the style change, as before);
    a transition without a paint stamp (the page ran no animation frame within
    ``WAIT_MS``) falls back to its DOM stamp, counted in ``fallbacks``.
    ``stamps``: if given, every written transition's stamps go there too
    (``kind dom paint video``, epoch seconds, ``-`` for none), so a run can be
    scored against either truth and the paint lag measured.
    """

    def __init__(self, out: IO[str], stamp: str = "paint", stamps: IO[str] | None = None) -> None:
        if stamp not in ("paint", "dom"):
            raise AgentError(f"unknown ground-truth stamp {stamp!r}; choose paint or dom")
        self._out = out
        self._stamp = stamp
        self._stamps = stamps
        self._open = False
        self.stalls = 0
        self.fallbacks = 0
        if stamps is not None:
            stamps.write(STAMPS_HEADER)

    def feed(self, events: list[Any]) -> None:
        for ev in events or []:
            kind = str(ev[0])
            dom, paint, video = (_seconds(ev[i]) if i < len(ev) else None for i in (1, 2, 3))
            assert dom is not None
            if kind == "S" and not self._open:
                self._open = True
            elif kind == "E" and self._open:
                self._open = False
                self.stalls += 1
            else:
                continue  # a page reload restarts the observer; keep the lines alternating
            t = dom
            if self._stamp == "paint":
                if paint is None:
                    self.fallbacks += 1
                else:
                    t = paint
            self._out.write(f"{kind}-{t:.6f}\n")
            self._out.flush()
            if self._stamps is not None:
                cols = ["-" if v is None else f"{v:.6f}" for v in (dom, paint, video)]
                self._stamps.write("\t".join([kind, *cols]) + "\n")
                self._stamps.flush()


def _maybe(v: str) -> float | None:
    return None if v == "-" else float(v)


def read_stamps(path: Path) -> list[tuple[str, float, float | None, float | None]]:
    """A stamps file back: ``(kind, dom, paint, video)`` per transition, in order."""
    rows: list[tuple[str, float, float | None, float | None]] = []
    for line in path.read_text().splitlines()[1:]:
        kind, dom, paint, video = line.split("\t")
        rows.append((kind, float(dom), _maybe(paint), _maybe(video)))
    return rows


def open_output(path: Path) -> IO[str]:
    try:
        return open(path, "w", buffering=1)
    except OSError as e:
        raise AgentError(f"{path}: cannot write: {e.strerror or e}") from None


def record_truth(
    driver: Any,
    out: IO[str],
    stop: threading.Event,
    poll: float = 0.2,
    spinner: str = SPINNER,
    stamps: IO[str] | None = None,
) -> TruthRecorder:
    """Record spinner ground truth (painted) from ``driver``'s page until ``stop`` is set."""
    rec = TruthRecorder(out, stamps=stamps)
    reset_truth(driver)
    js = "return " + observe_js(spinner)
    while True:
        rec.feed(driver.execute_script(js))
        if stop.wait(poll):
            rec.feed(driver.execute_script(js))
            return rec
