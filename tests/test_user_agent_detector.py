"""The stall detector on synthetic frames: a spinner over a frozen picture is a
stall; moving video, stills, noise, scrolling, seeking, input and layout
changes are not."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from user_agent.detector import DetectorConfig, Kind, StallDetector
from user_agent.grid import grid_from_bgra, grid_from_gray

W, H = 640, 360
P = 0.2
Img = npt.NDArray[np.float32]


def scene(seed: int, shift: int = 0) -> Img:
    """A textured picture (smooth blobs plus edges), shifted right by ``shift`` px."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    x = x - shift
    img = np.full((H, W), 90.0, dtype=np.float32)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(20, 90)
        img += rng.uniform(-80, 80) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    img += 70.0 * ((np.floor(x / (23 + seed % 19)) + np.floor(y / (17 + seed % 13))) % 2)
    return np.clip(img, 0, 255)


def with_spinner(img: Img, angle: float, size: int = 64) -> Img:
    """The lab player's spinner: a 6 px ring, dim except a bright quarter arc at ``angle``."""
    out = img.copy()
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    dx, dy = x - W / 2, y - H / 2
    r = np.hypot(dx, dy)
    ring = (r <= size / 2) & (r >= size / 2 - 6)
    a = (np.arctan2(dy, dx) - angle) % (2 * math.pi)
    out[ring] = out[ring] * 0.75 + 64
    out[ring & (a < math.pi / 2)] = 255
    return out


def run(frames: list[Img], det: StallDetector | None = None, t0: float = 100.0) -> list[Kind]:
    det = det or StallDetector()
    return [det.frame(t0 + i * P, grid_from_gray(f)).kind for i, f in enumerate(frames)]


def spin(img: Img, k: int) -> list[Img]:
    """k grabs of a stall: the spinner turns 72 degrees per 0.2 s (one turn a second)."""
    return [with_spinner(img, i * 2 * math.pi / 5 + 0.3) for i in range(k)]


def test_spinner_over_frozen_picture_is_a_stall() -> None:
    kinds = run(spin(scene(1), 6))
    assert kinds[0] is Kind.NONE
    assert kinds[1:] == [Kind.STALL] * 5


def test_moving_video_is_not_a_stall() -> None:
    frames = [scene(2, shift=6 * i) for i in range(8)]
    assert set(run(frames)[1:]) == {Kind.PLAYING}


def test_moving_video_with_centre_overlay_is_not_a_stall() -> None:
    """Playback with something turning in the middle (a logo) still moves the periphery."""
    frames = [with_spinner(scene(3, shift=5 * i), i) for i in range(6)]
    assert Kind.STALL not in run(frames)


def test_paused_picture_is_still() -> None:
    assert set(run([scene(4)] * 5)[1:]) == {Kind.STILL}


def test_stall_ends_when_playback_resumes() -> None:
    img = scene(5)
    frames = spin(img, 4) + [scene(5, shift=8 * i) for i in range(1, 4)]
    kinds = run(frames)
    assert kinds[1:4] == [Kind.STALL] * 3
    assert kinds[4:] == [Kind.PLAYING] * 3


def test_scroll_of_a_calibrated_region_is_not_a_stall() -> None:
    """A page scroll under a fixed capture region shifts everything, spinner included."""
    frames = [with_spinner(scene(6, shift=-15 * i), i) for i in range(5)]
    assert Kind.STALL not in run(frames)


def test_geometry_change_is_filtered_then_stall_reported() -> None:
    det = StallDetector(DetectorConfig(geometry_settle=1.0))
    frames = spin(scene(7), 12)
    kinds = []
    for i, f in enumerate(frames):
        t = 100 + i * P
        if i == 3:
            det.note_geometry(t)  # e.g. fullscreen toggled: the reference is dropped
        kinds.append(det.frame(t, grid_from_gray(f)).kind)
    assert kinds[1:3] == [Kind.STALL] * 2
    assert kinds[3] is Kind.NONE
    assert kinds[4:9] == [Kind.FILTERED] * 5  # within 1 s of the change
    assert kinds[9:] == [Kind.STALL] * 3


def test_frame_size_change_counts_as_geometry_change() -> None:
    det = StallDetector()
    small = grid_from_gray(scene(8)[:, :320])
    big = grid_from_gray(scene(8))
    assert det.frame(100.0, small).kind is Kind.NONE
    assert det.frame(100.2, big).kind is Kind.NONE
    v = det.frame(100.4, grid_from_gray(with_spinner(scene(8), 1.0)))
    assert (v.kind, v.reason) == (Kind.FILTERED, "geometry")


def test_input_over_player_is_filtered() -> None:
    det = StallDetector(DetectorConfig(input_quiet=1.0))
    img = scene(9)
    det.frame(100.0, grid_from_gray(with_spinner(img, 0)))
    det.note_input(100.1)  # e.g. a click on pause: the pause icon animates in the centre
    verdicts = [det.frame(100.0 + i * P, grid_from_gray(with_spinner(img, i))) for i in range(1, 9)]
    assert [v.reason for v in verdicts[:5]] == ["input"] * 5
    assert [v.kind for v in verdicts[5:]] == [Kind.STALL] * 3


def test_seek_is_filtered_but_long_rebuffering_is_reported() -> None:
    cfg = DetectorConfig(seek_holdoff=1.0)
    before = [scene(10, shift=4 * i) for i in range(3)]
    after = spin(scene(11), 10)  # new scene at once, then rebuffering over it
    verdicts = []
    det = StallDetector(cfg)
    for i, f in enumerate(before + after):
        verdicts.append(det.frame(100 + i * P, grid_from_gray(f)))
    kinds = [v.kind for v in verdicts]
    assert kinds[1:4] == [Kind.PLAYING] * 3  # the jump itself moves the periphery
    assert [v.reason for v in verdicts[4:9]] == ["seek"] * 5
    assert kinds[9:] == [Kind.STALL] * 4


def test_stall_right_after_ordinary_motion_is_not_taken_for_a_seek() -> None:
    frames = [scene(12, shift=3 * i) for i in range(4)]
    frames += spin(scene(12, shift=12), 4)
    kinds = run(frames)
    assert kinds[-3:] == [Kind.STALL] * 3


def test_small_spinner_in_large_player_is_seen() -> None:
    """The spinner keeps its 64 px size when the player is 1280x720 (cells grow)."""
    big = np.kron(scene(13), np.ones((2, 2), dtype=np.float32))
    y, x = np.mgrid[0 : 2 * H, 0 : 2 * W].astype(np.float32)
    det = StallDetector()
    kinds = []
    for i in range(5):
        f = big.copy()
        r = np.hypot(x - W, y - H)
        a = (np.arctan2(y - H, x - W) - i * 2 * math.pi / 5) % (2 * math.pi)
        f[(r <= 32) & (r >= 26)] = 80
        f[(r <= 32) & (r >= 26) & (a < math.pi / 2)] = 255
        kinds.append(det.frame(100 + i * P, grid_from_gray(f)).kind)
    assert kinds[1:] == [Kind.STALL] * 4


def test_bgra_grid_matches_grey_grid() -> None:
    img = scene(14)
    g = img.astype(np.uint8)
    bgra = np.stack([g, g, g, np.full_like(g, 255)], axis=-1)
    a = grid_from_bgra(bgra.tobytes(), W, H)
    b = grid_from_gray(g)
    assert a.shape == b.shape == (36, 64)
    assert np.allclose(a, b, atol=0.01)


@pytest.mark.parametrize("w, h", [(650, 365), (1280, 720), (300, 200), (3840, 2160)])
def test_bgra_grid_is_the_cell_mean_of_b_2g_r(w: int, h: int) -> None:
    rng = np.random.default_rng(w)
    bgra = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    b, g, r = (bgra[..., i].astype(np.float64) for i in range(3))
    grey = (b + 2 * g + r) / 4
    c = w // 64
    rows, cols = h // c, w // c
    want = grey[: rows * c, : cols * c].reshape(rows, c, cols, c).mean(axis=(1, 3))
    got = grid_from_bgra(bgra.tobytes(), w, h)
    assert got.shape == (rows, cols)
    assert np.allclose(got, want, atol=1e-3)


def test_grid_refuses_tiny_images() -> None:
    with pytest.raises(ValueError):
        grid_from_gray(np.zeros((3, 640)))


def noisy(img: Img, sigma: float, seed: int) -> Img:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, sigma, img.shape).astype(np.float32), 0, 255)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), sigma=st.floats(0.5, 60.0))
def test_compression_noise_alone_is_never_a_stall(seed: int, sigma: float) -> None:
    """Frames of one picture that differ only by noise (any strength) are never a stall."""
    img = scene(seed % 50)
    frames = [noisy(img, sigma, seed + i) for i in range(4)]
    assert Kind.STALL not in run(frames)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), sigma=st.floats(2.0, 60.0), size=st.floats(0.3, 0.7))
def test_noise_in_a_detailed_centre_over_a_flat_background_is_not_a_stall(
    seed: int, sigma: float, size: float
) -> None:
    """Encoders spend their noise on detail: a talking head shimmers while the
    flat backdrop around it repeats exactly. That is playback, not a stall."""
    img = scene(seed % 50)
    h, w = round(H * size / 2), round(W * size / 2)
    window = (slice(H // 2 - h, H // 2 + h), slice(W // 2 - w, W // 2 + w))
    frames = []
    for i in range(4):
        f = img.copy()
        f[window] = noisy(img, sigma, seed + i)[window]
        frames.append(f)
    assert Kind.STALL not in run(frames)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), sigma=st.floats(0.0, 1.5), phase=st.floats(0, 2 * math.pi))
def test_stall_is_seen_through_pixel_jitter(seed: int, sigma: float, phase: float) -> None:
    """A frozen frame repeats exactly on screen; pixel jitter of a grey level or
    so (dithering, a scaler's rounding) still does not hide the spinner."""
    img = scene(seed % 50)
    frames = [noisy(with_spinner(img, phase + i * 2 * math.pi / 5), sigma, seed + i) for i in range(4)]
    assert run(frames)[1:] == [Kind.STALL] * 3


@pytest.mark.parametrize("w, h", [(640, 360), (1280, 720), (650, 365), (300, 200)])
def test_grab_without_the_control_strip_gives_the_detector_the_same_cells(w: int, h: int) -> None:
    """The agent does not grab the bottom strip the detector ignores: every cell
    the detector reads (centre and periphery) equals a full grab's."""
    from user_agent.capture import grab_grid
    from user_agent.detector import _masks
    from user_agent.layout import Rect

    img = np.random.default_rng(w).integers(0, 256, (h, w, 4), dtype=np.uint8)

    class Screen:
        """Pixels of ``img`` for any rectangle, as a grabber returns them."""

        name = "array"

        def grab(self, r: Rect) -> npt.NDArray[np.float32]:
            part = np.ascontiguousarray(img[r.top : r.top + r.height, r.left : r.left + r.width])
            return grid_from_bgra(part.tobytes(), r.width, r.height)

        def close(self) -> None:
            pass

    full = grid_from_bgra(img.tobytes(), w, h)
    cut, failures = grab_grid(Screen(), Rect(0, 0, w, h), DetectorConfig().controls)
    m = _masks(full.shape, DetectorConfig())
    read = m.centre | m.periphery
    assert cut.shape == full.shape and failures == 0
    assert np.array_equal(cut[read], full[read])
    assert (~read).all(axis=1).sum() >= 1  # there is a strip to skip
