"""Sans-I/O stall detector: grey grids and times in, one verdict per frame out.

A stalled player shows a frozen picture with a spinner turning in its centre,
so between two grabs the centre changes while the periphery does not. Normal
playback changes the periphery; a paused or static picture changes nothing.

Why the thresholds hold up against compression noise: a frozen picture is
bit-identical between grabs, so in a real stall the typical cell does not
change at all, in the periphery and in the centre alike (the spinner's arc
covers far fewer than a quarter of the centre box); only the few cells the
spinner sweeps change, and by a lot. The noise level is the larger of the
periphery's median cell change and the centre's upper quartile; above
``max_noise`` the picture is alive (playback, even when only the detailed
middle of a shot shimmers while a flat background stays put). The per-cell
threshold is the larger of a fixed floor and a multiple of that noise level,
and the periphery counts as frozen only when hardly a cell in it moved by
more than a grey level.

What it filters, and why (each would otherwise look like a stall):

- ``input``: keyboard or mouse activity over the player shortly before
  (``input_quiet`` s). Clicking pause, hovering (controls fade in), seeking
  with the progress bar or arrow keys all change the centre over a still frame.
- ``geometry``: the player moved or changed size (fullscreen, scroll, window
  resize) within ``geometry_settle`` s; frames of different layouts cannot be
  compared, and the browser animates such changes.
- ``seek``: a stall-like episode that begins right after the whole periphery
  jumped (a new scene at once, as a seek does) is held back for
  ``seek_holdoff`` s; rebuffering after a seek is the user's doing, not the
  network's. A network stall that lasts longer is still reported.
- pause: a paused player is a still picture (verdict ``still``), never a stall;
  the pause icon's brief animation is caught by the ``input`` filter.

The detector never looks at the screen or the clock itself; the capture loop
feeds it, which is what lets tests drive it with synthetic frames.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .grid import Grid
from .layout import CONTROLS_STRIP


class Kind(enum.Enum):
    NONE = "none"  # no reference frame yet
    STALL = "stall"
    PLAYING = "playing"
    STILL = "still"
    FILTERED = "filtered"


@dataclass(frozen=True, slots=True)
class Verdict:
    t: float
    kind: Kind
    reason: str = ""
    centre_changed: int = 0
    periphery_changed: int = 0
    noise: float = 0.0

    @property
    def stall(self) -> bool:
        return self.kind is Kind.STALL


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    centre: float = 0.4  # centre box, fraction of width and height
    inner: float = 0.6  # the periphery lies outside this central box...
    controls: float = CONTROLS_STRIP  # ...and above the bottom strip where player controls fade in
    threshold_floor: float = 10.0  # grey levels a cell must change by, at least
    noise_k: float = 6.0  # ...or this many noise levels, whichever is larger
    max_noise: float = 3.0  # a typical cell changing more than this is moving video
    centre_min_cells: int = 3  # spinner: at least this many centre cells change
    centre_min_frac: float = 0.008  # ...and at least this fraction of them
    still_level: float = 1.0  # a periphery cell changing more than this has moved...
    periphery_max_frac: float = 0.002  # ...and a frozen periphery has at most this fraction of such cells
    jump_frac: float = 0.4  # a seek/scene jump changes this fraction of the periphery...
    jump_level: float = 30.0  # ...by at least this many levels
    input_quiet: float = 1.0
    geometry_settle: float = 1.0
    seek_holdoff: float = 1.0

    def __post_init__(self) -> None:
        if not (0 < self.centre < self.inner < 1):
            raise ValueError("need 0 < centre < inner < 1")
        if not (0 <= self.controls < (1 - self.inner) / 2):
            raise ValueError("controls strip must lie outside the inner box")


@dataclass(slots=True)
class _Masks:
    shape: tuple[int, int]
    centre: npt.NDArray[np.bool_]
    periphery: npt.NDArray[np.bool_]


def _median(a: npt.NDArray[np.float32]) -> float:
    """``np.median`` of a 1-D array, without its NaN checks and copies: a third
    of the detector's cost at 25 looks/s (the grids never hold NaN)."""
    n = a.size
    h = n // 2
    if n % 2:
        return float(np.partition(a, h)[h])
    part = np.partition(a, (h - 1, h))
    return float((part[h - 1] + part[h]) / 2)


def _box(shape: tuple[int, int], frac: float) -> npt.NDArray[np.bool_]:
    rows, cols = shape
    m = np.zeros(shape, dtype=bool)
    r0, c0 = round(rows * (1 - frac) / 2), round(cols * (1 - frac) / 2)
    m[r0 : rows - r0, c0 : cols - c0] = True
    return m


def _masks(shape: tuple[int, int], cfg: DetectorConfig) -> _Masks:
    periphery = ~_box(shape, cfg.inner)
    strip = round(shape[0] * cfg.controls)
    if strip:
        periphery[shape[0] - strip :, :] = False
    return _Masks(shape, _box(shape, cfg.centre), periphery)


@dataclass(slots=True)
class StallDetector:
    """Feed :meth:`frame` one grid per grab; tell it about user input and
    layout changes with :meth:`note_input` and :meth:`note_geometry`."""

    cfg: DetectorConfig = field(default_factory=DetectorConfig)
    _prev: Grid | None = None
    _masks: _Masks | None = None
    _last_input: float = float("-inf")
    _last_geometry: float = float("-inf")
    _prev_jump: bool = False
    _episode_start: float | None = None
    _episode_after_jump: bool = False

    def note_input(self, t: float) -> None:
        """User input over the player at time ``t``."""
        self._last_input = max(self._last_input, t)

    def note_geometry(self, t: float) -> None:
        """The player's place or size on screen changed at ``t``: forget the reference frame."""
        self._last_geometry = max(self._last_geometry, t)
        self._prev = None
        self._prev_jump = False
        self._episode_start = None

    def reset(self) -> None:
        """Forget the reference frame (e.g. a failed grab in between)."""
        self._prev = None
        self._prev_jump = False
        self._episode_start = None

    def frame(self, t: float, grid: Grid) -> Verdict:
        if self._prev is None or self._prev.shape != grid.shape:
            if self._prev is not None:
                self.note_geometry(t)
            self._prev = grid
            return Verdict(t, Kind.NONE, "no reference frame")
        if self._masks is None or self._masks.shape != grid.shape:
            self._masks = _masks(grid.shape, self.cfg)
        m = self._masks
        cfg = self.cfg
        d = np.abs(grid - self._prev)
        self._prev = grid

        dp = d[m.periphery]
        dc = d[m.centre]
        # How much a typical cell stirs: the periphery's median, and the centre's
        # upper quartile (the spinner's arc sweeps far fewer than a quarter of
        # the centre cells). Zero for a frozen picture, the noise level otherwise.
        k = (3 * (dc.size - 1)) // 4
        noise = max(_median(dp), float(np.partition(dc, k)[k]))
        thr = max(cfg.threshold_floor, cfg.noise_k * noise)
        p_changed = int(np.count_nonzero(dp > cfg.still_level))
        c_changed = int(np.count_nonzero(dc > thr))
        jump = float(np.count_nonzero(dp > cfg.jump_level)) >= cfg.jump_frac * dp.size

        centre_moves = c_changed >= max(cfg.centre_min_cells, cfg.centre_min_frac * dc.size)
        frozen = noise <= cfg.max_noise and p_changed <= cfg.periphery_max_frac * dp.size

        def verdict(kind: Kind, reason: str = "") -> Verdict:
            return Verdict(t, kind, reason, c_changed, p_changed, noise)

        prev_jump, self._prev_jump = self._prev_jump, jump
        if not frozen:
            self._episode_start = None
            return verdict(Kind.PLAYING)
        if not centre_moves:
            self._episode_start = None
            return verdict(Kind.STILL)
        if self._episode_start is None:
            self._episode_start = t
            self._episode_after_jump = prev_jump
        if t - self._last_geometry <= cfg.geometry_settle:
            return verdict(Kind.FILTERED, "geometry")
        if t - self._last_input <= cfg.input_quiet:
            return verdict(Kind.FILTERED, "input")
        if self._episode_after_jump and t - self._episode_start < cfg.seek_holdoff:
            return verdict(Kind.FILTERED, "seek")
        return verdict(Kind.STALL)
