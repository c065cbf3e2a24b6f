"""Chromium's flags for the lab's client: h3 to the emulator, no DNS.

Its own module so the lab (status JSON) and the browser launcher share the
flags without the lab importing Selenium's side.
"""

from __future__ import annotations

from . import topology as T


def chrome_args(spki: str, headless: bool = True) -> list[str]:
    hosts = f"{T.WWW_HOST}:443,{T.MEDIA_HOST}:443"
    rules = f"MAP {T.WWW_HOST} {T.OTT_WWW}, MAP {T.MEDIA_HOST} {T.OTT_MEDIA}, MAP * ~NOTFOUND"
    args = [
        "--enable-quic",
        f"--origin-to-force-quic-on={hosts}",
        f"--ignore-certificate-errors-spki-list={spki}",
        f"--host-resolver-rules={rules}",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-dev-shm-usage",
        "--window-size=800,600",
    ]
    if headless:
        args += ["--headless=new", "--disable-gpu"]
    return args
