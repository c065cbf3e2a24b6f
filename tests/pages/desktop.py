"""A private X screen for tests and the benchmark: the demo's Xvfb helper
(``iqn_lab.xvfb``, a free display picked by Xvfb itself), plus a check that
the desktop tools are installed."""

from __future__ import annotations

import shutil

from iqn_lab.xvfb import xvfb


def have_desktop_tools() -> str:
    """Empty when Xvfb, Chromium and chromedriver are installed, else what is missing."""
    tools = ("Xvfb", "/usr/bin/chromium", "/usr/bin/chromedriver", "ffmpeg")
    missing = [p for p in tools if not shutil.which(p)]
    return ", ".join(missing)

__all__ = ["have_desktop_tools", "xvfb"]
