"""Starting (or attaching to) Chromium through Selenium.

Debian's Chromium and chromedriver are named explicitly, so Selenium never
tries to download a driver. The window is headful: the agent watches the real
screen. As root, Chromium needs ``--no-sandbox``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

from .errors import AgentError

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

BASE_ARGS = (
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--autoplay-policy=no-user-gesture-required",
    "--window-position=0,0",
    "--window-size=1000,760",
)


def chromium_options(extra: Sequence[str] = (), debugger_address: str | None = None) -> Any:
    from selenium.webdriver.chrome.options import Options

    opts = Options()
    if debugger_address:
        opts.debugger_address = debugger_address  # a browser the user started with --remote-debugging-port
        return opts
    opts.binary_location = CHROMIUM
    args = list(BASE_ARGS)
    if os.geteuid() == 0:
        args.append("--no-sandbox")
    for a in extra:
        name = a.split("=", 1)[0]
        args = [b for b in args if b.split("=", 1)[0] != name]  # the caller's value wins
        args.append(a)
    for a in args:
        opts.add_argument(a)
    return opts


def start_chromium(
    url: str | None = None,
    extra_args: Sequence[str] = (),
    debugger_address: str | None = None,
    options: Any = None,
) -> Any:
    """A Selenium driver for a headful Chromium (or the one at ``debugger_address``)."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    if not debugger_address and not os.environ.get("DISPLAY"):
        raise AgentError("no X display: set DISPLAY to the screen Chromium should appear on")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            raise AgentError(f"{path} not found (install Debian's chromium and chromium-driver)")
    opts = options if options is not None else chromium_options(extra_args, debugger_address)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    except WebDriverException as e:
        first = (e.msg or str(e)).strip().splitlines()[0] if (e.msg or str(e)).strip() else type(e).__name__
        raise AgentError(f"cannot start Chromium: {first}") from None
    if url:
        try:
            driver.get(url)
        except WebDriverException as e:
            driver.quit()
            raise AgentError(f"cannot open {url}: {(e.msg or str(e)).strip().splitlines()[0]}") from None
    return driver
