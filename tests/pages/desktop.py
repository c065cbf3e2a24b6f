"""A private X screen (Xvfb) for tests and the benchmark.

``-displayfd`` lets Xvfb pick a free display number itself, so parallel runs
never collide; it listens on its Unix socket only. Access control is off
(``-ac``) because the socket is local and the screen is thrown away after.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def have_desktop_tools() -> str:
    """Empty when Xvfb, Chromium and chromedriver are installed, else what is missing."""
    tools = ("Xvfb", "/usr/bin/chromium", "/usr/bin/chromedriver", "ffmpeg")
    missing = [p for p in tools if not shutil.which(p)]
    return ", ".join(missing)


@contextlib.contextmanager
def xvfb(width: int = 1280, height: int = 1024) -> Iterator[str]:
    """Start Xvfb; point DISPLAY/XAUTHORITY at it while the block runs; always stop it."""
    tmp = Path(tempfile.mkdtemp(prefix="iqn-ua-x-"))
    auth = tmp / "Xauthority"
    auth.touch()  # python-xlib insists on an authority file, even an empty one
    r, w = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(w), "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp", "-ac",
         "-noreset"],
        pass_fds=(w,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(w)
    saved = {k: os.environ.get(k) for k in ("DISPLAY", "XAUTHORITY")}
    try:
        with os.fdopen(r) as f:
            num = f.readline().strip()
        if not num:
            raise RuntimeError(f"Xvfb did not start (exit status {proc.poll()})")
        display = f":{num}"
        if shutil.which("xauth"):  # a cookie (unchecked under -ac) keeps python-xlib from warning
            subprocess.run(["xauth", "-f", str(auth), "add", display, ".", secrets.token_hex(16)],
                           capture_output=True, check=False)
        os.environ["DISPLAY"] = display
        os.environ["XAUTHORITY"] = str(auth)
        yield display
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
