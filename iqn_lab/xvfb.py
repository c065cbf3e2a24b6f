"""A private X screen (Xvfb) for the demo's headful Chromium.

The end-user agent looks at real pixels and clicks with a real pointer, so the
browser must be headful; Xvfb gives it a screen on any server. ``-displayfd``
lets Xvfb pick a free display number itself, so a demo never collides with a
desktop or a test's screen; it listens on its Unix socket only (``-ac`` is
safe there, and python-xlib still wants an authority file, even an empty one).
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

from iqn_ctl.errors import IqnError


class XvfbError(IqnError):
    """Xvfb missing or failed to start; the message is for the user."""


@contextlib.contextmanager
def xvfb(width: int = 1280, height: int = 1024) -> Iterator[str]:
    """Start Xvfb and point DISPLAY/XAUTHORITY at it while the block runs; always stop it."""
    if shutil.which("Xvfb") is None:
        raise XvfbError("Xvfb not found: run sudo bash scripts/setup.sh (installs Debian's xvfb)")
    tmp = Path(tempfile.mkdtemp(prefix="iqn-demo-x-"))
    auth = tmp / "Xauthority"
    auth.touch()
    r, w = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(w), "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp",
         "-ac", "-noreset"],
        pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    os.close(w)
    saved = {k: os.environ.get(k) for k in ("DISPLAY", "XAUTHORITY")}
    try:
        with os.fdopen(r) as f:
            num = f.readline().strip()
        if not num:
            raise XvfbError(f"Xvfb did not start (exit status {proc.poll()})")
        display = f":{num}"
        if shutil.which("xauth"):  # a cookie (unchecked under -ac) keeps python-xlib from warning
            subprocess.run(["xauth", "-f", str(auth), "add", display, ".", secrets.token_hex(16)],
                           capture_output=True)  # fmt: skip
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
