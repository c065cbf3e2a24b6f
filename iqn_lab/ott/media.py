"""The clip the OTT emulator serves: made once with Debian's ffmpeg, then cached.

One-second fragmented-MP4 segments (DASH layout) let the player page keep only a
few seconds buffered, as YouTube does, so a bottleneck turns into a stall within
seconds instead of after minutes of greedy progressive download. Moving test
pattern plus noise keeps the bit rate honest and the picture changing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from iqn_ctl.errors import IqnError

DEFAULT_CACHE = Path(os.environ.get("IQN_LAB_CACHE", "/var/cache/iqn-lab"))


class MediaError(IqnError):
    """The clip could not be made; the message is for the user."""


@dataclass(frozen=True)
class MediaSpec:
    seconds: int = 60
    kbit: int = 1200  # above the paper's 1 Mbit/s bottleneck, so it stalls there
    width: int = 640
    height: int = 360
    fps: int = 25

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _ffmpeg_argv(spec: MediaSpec) -> list[str]:
    src = f"testsrc2=size={spec.width}x{spec.height}:rate={spec.fps},noise=alls=12:allf=t"
    rate = f"{spec.kbit}k"
    return [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", src, "-t", str(spec.seconds),
        "-c:v", "libx264", "-preset", "ultrafast", "-profile:v", "baseline", "-pix_fmt", "yuv420p",
        "-g", str(spec.fps), "-keyint_min", str(spec.fps), "-sc_threshold", "0",
        "-b:v", rate, "-maxrate", rate, "-minrate", rate, "-bufsize", f"{spec.kbit // 2}k",
        "-x264-params", "nal-hrd=cbr",
        "-f", "dash", "-seg_duration", "1", "-use_template", "1", "-use_timeline", "0",
        "-init_seg_name", "init.m4s", "-media_seg_name", "seg-$Number$.m4s",
        "manifest.mpd",
    ]  # fmt: skip


def ensure_media(spec: MediaSpec = MediaSpec(), cache: Path = DEFAULT_CACHE) -> Path:
    """Directory with init.m4s, seg-N.m4s and media.json; built only when missing."""
    out = cache / f"clip-{spec.key()}"
    if (out / "media.json").is_file():
        return out
    if shutil.which("ffmpeg") is None:
        raise MediaError("ffmpeg not found: run sudo bash scripts/setup.sh (installs Debian's ffmpeg)")
    cache.mkdir(parents=True, exist_ok=True)
    # mkdtemp: an unpredictable name, made 0700 by us, so nobody can plant a symlink or a
    # directory of theirs where the clip is built (a name from the pid could be guessed)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.key()}-", dir=cache))
    try:
        r = subprocess.run(_ffmpeg_argv(spec), cwd=tmp, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise MediaError(f"ffmpeg failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
        m = re.search(r'codecs="([^"]+)"', (tmp / "manifest.mpd").read_text())
        segments = len(list(tmp.glob("seg-*.m4s")))
        if m is None or segments == 0:
            raise MediaError("ffmpeg produced no DASH segments")
        meta = {
            "mime": f'video/mp4; codecs="{m.group(1)}"',
            "segments": segments,
            "segment_seconds": 1.0,
            "duration": spec.seconds,
            "kbit": spec.kbit,
        }
        (tmp / "media.json").write_text(json.dumps(meta))
        if not (out / "media.json").is_file():  # another lab may have finished first
            shutil.rmtree(out, ignore_errors=True)
            tmp.chmod(0o755)  # finished: readable like any cached clip (mkdtemp made it 0700)
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
