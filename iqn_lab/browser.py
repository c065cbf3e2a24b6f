"""Chromium in the client namespace, talking HTTP/3 to the OTT emulator.

Flags come from our probe of Debian's Chromium: force QUIC on both hosts, trust
the emulator's self-signed key by its SPKI hash, map the hosts to their
addresses and every other name to NOTFOUND (without the catch-all each
navigation waits ~16 s on DNS).

Chromedriver must run inside the client namespace (it starts Chromium and
speaks to it over loopback there). Selenium in the caller's namespace reaches
it through ``NetnsForwarder``, a loopback TCP relay whose outgoing sockets are
created inside the namespace.

Why the relay checks who connects: chromedriver runs as root and starts any
binary a session names, with ``--no-sandbox``; the relay's port on the host's
loopback is reachable by every local user, so it serves only connections from
its own uid (root), found in the kernel's socket table, and closes the rest.
Selenium speaks HTTP over TCP only, so a 0600 Unix socket is not an option.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import netns
from .chrome import chrome_args

if TYPE_CHECKING:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.remote.webdriver import WebDriver

    from .lab import Lab

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def chrome_options(spki: str, headless: bool = True) -> Options:
    """Selenium options with Debian's Chromium (no driver or browser download)."""
    from selenium.webdriver.chrome.options import Options

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in chrome_args(spki, headless):
        opts.add_argument(a)
    return opts


class NetnsForwarder:
    """Relay 127.0.0.1:<port> here to 127.0.0.1:<target> inside namespace ``ns``."""

    def __init__(self, ns: str, target_port: int) -> None:
        self.ns = ns
        self.target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"fwd-{ns}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if tcp_peer_uid(conn) != os.geteuid():
                conn.close()  # another user: no root chromedriver for them
                continue
            try:
                out = netns.ns_socket(self.ns, socket.AF_INET, socket.SOCK_STREAM)
                out.connect(("127.0.0.1", self.target))
            except OSError:
                conn.close()
                continue
            threading.Thread(target=_pipe, args=(conn, out, self._stop), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=2)


def _hex_endpoint(addr: tuple[str, int]) -> str:
    """An IPv4 endpoint as /proc/net/tcp prints it (address in host byte order)."""
    ip = int.from_bytes(socket.inet_aton(addr[0]), sys.byteorder)
    return f"{ip:08X}:{addr[1]:04X}"


def tcp_peer_uid(conn: socket.socket) -> int | None:
    """The uid owning the other end of a loopback IPv4 connection we accepted, from
    /proc/thread-self/net/tcp (this thread's namespace); None if it is gone.

    TCP has no SO_PEERCRED, but on loopback the peer's socket is in the same
    table: the row whose local end is our peer and whose remote end is us."""
    try:
        want_local, want_remote = _hex_endpoint(conn.getpeername()), _hex_endpoint(conn.getsockname())
        with open("/proc/thread-self/net/tcp") as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[1] == want_local and cols[2] == want_remote:
                    return int(cols[7])
    except OSError:
        pass
    return None


def _pipe(a: socket.socket, b: socket.socket, stop: threading.Event) -> None:
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ, b)
    sel.register(b, selectors.EVENT_READ, a)
    try:
        while not stop.is_set():
            for key, _ in sel.select(timeout=0.5):
                src: socket.socket = key.fileobj  # type: ignore[assignment]
                data = src.recv(65536)
                if not data:
                    return
                key.data.sendall(data)
    except OSError:
        return
    finally:
        sel.close()
        a.close()
        b.close()


def _free_port_in(ns: str) -> int:
    s = netns.ns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
    finally:
        s.close()


@contextlib.contextmanager
def client_webdriver(lab: Lab, headless: bool = True, display: str | None = None) -> Iterator[WebDriver]:
    """A Selenium session whose Chromium runs in the lab's client namespace.

    ``display`` (e.g. ``":99"`` of an Xvfb) gives a real window for the
    end-user agent to look at; by default Chromium is headless.
    """
    from selenium import webdriver

    ns = lab.client_ns
    port = _free_port_in(ns)
    env = dict(os.environ)
    if display:
        env["DISPLAY"] = display
    log = open(lab.state / f"chromedriver-{port}.log", "ab")  # noqa: SIM115 - closed in finally
    driver_proc = lab.popen(
        "client", [CHROMEDRIVER, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )  # fmt: skip
    fwd = NetnsForwarder(ns, port)
    driver: WebDriver | None = None
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", fwd.port), timeout=1) as probe:
                    probe.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    if probe.recv(16):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or driver_proc.poll() is not None:
                raise RuntimeError(f"chromedriver did not start in {ns}; see {log.name}")
            time.sleep(0.1)
        opts = chrome_options(spki_of(lab), headless=headless)
        driver = webdriver.Remote(command_executor=f"http://127.0.0.1:{fwd.port}", options=opts)
        yield driver
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        fwd.close()
        driver_proc.terminate()
        try:
            driver_proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            driver_proc.kill()
            driver_proc.wait()
        log.close()


def spki_of(lab: Lab) -> str:
    from .certs import spki_hash

    return spki_hash(lab.ott_cert)
