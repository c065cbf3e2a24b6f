"""A private X screen (Xvfb) for the demo's headful Chromium.

The end-user agent looks at real pixels and clicks with a real pointer, so the
browser must be headful; Xvfb gives it a screen on any server. ``-displayfd``
lets Xvfb pick a free display number itself, so a demo never collides with a
desktop or a test's screen; it listens on its Unix socket only.

Why a cookie and not ``-ac``: the Unix socket in /tmp/.X11-unix is open to every
local user, and the screen carries a root Chromium; with access control off
anyone could read its pixels or type into it. Xvfb reads a random
MIT-MAGIC-COOKIE-1 from a 0600 server file (``-auth``) and our clients find it
in a 0600 XAUTHORITY file, both in a private ``mkdtemp`` directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import struct
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
    cookie = secrets.token_bytes(16)
    server_auth, auth = tmp / "server.auth", tmp / "Xauthority"
    write_xauth(server_auth, "0", cookie)  # the server takes every cookie in its file, whatever display
    r, w = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(w), "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp",
         "-auth", str(server_auth), "-noreset"],
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
        write_xauth(auth, num, cookie)
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


#: Xau's family of a local (Unix socket) display, keyed by host name
_FAMILY_LOCAL = 256


def write_xauth(path: Path, display_number: str, cookie: bytes) -> None:
    """Write an X authority file (the format of ``xauth``'s files) holding one
    MIT-MAGIC-COOKIE-1 for local display ``display_number``; created 0600."""

    def field(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b

    entry = (
        struct.pack(">H", _FAMILY_LOCAL) + field(socket.gethostname().encode())
        + field(display_number.encode()) + field(b"MIT-MAGIC-COOKIE-1") + field(cookie)
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(entry)
