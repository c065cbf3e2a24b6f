"""Plain-HTTP server for the test player page on 127.0.0.1, recording the
autoplay POSTs with their arrival times (the stand-in for the OTT service).

The page is the lab's player (``iqn_lab/ott/static``: one page contract, one
page) playing a local clip (``?clip=``), plus test-only additions: corner
markers, so tests can check the located rectangle; YouTube's bezel and
progress bar (``hooks.css``); and ``hooks.js`` (``window.iqnTest``: a stall on
demand, click-to-pause, seeking on the progress bar, and a record of the
user's clicks, seeks and fullscreen changes in ``window.iqnPlayer``)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

STATIC = Path(str(resources.files("iqn_lab.ott") / "static"))
HERE = Path(__file__).parent
_SQUARE = '<div style="position:absolute;{};width:12px;height:12px;z-index:2;background:{}"></div>'
MARKERS = _SQUARE.format("left:0;top:0", "#ff00ff") + _SQUARE.format("right:0;bottom:0", "#00ff00")
CONTROLS = '<div class="ytp-bezel"></div><div class="ytp-progress-bar"></div>'
TYPES = {".css": "text/css", ".js": "text/javascript"}
FILES = {"/player.css": STATIC / "player.css", "/player.js": STATIC / "player.js",
         "/hooks.css": HERE / "hooks.css", "/hooks.js": HERE / "hooks.js"}  # fmt: skip


def _insert(html: str, anchor: str, before: str = "", after: str = "") -> str:
    """``html`` with text around its first ``anchor``; the anchor must be there
    (a renamed element in the lab's page fails loudly, not as a page without hooks)."""
    if anchor not in html:
        raise ValueError(f"the lab's player.html has no {anchor!r}")
    return html.replace(anchor, before + anchor + after, 1)


def page() -> bytes:
    """The lab's player page with the markers and controls in the player, and the
    test styles and hooks after the player's own."""
    html = (STATIC / "player.html").read_text()
    html = _insert(html, '<div class="ytp-spinner"', before=MARKERS + CONTROLS + "\n    ")
    css = '<link rel="stylesheet" href="{}">'
    html = _insert(html, css.format("/player.css"), after="\n" + css.format("/hooks.css"))
    html = _insert(html, '<script src="/player.js"></script>', after='\n<script src="/hooks.js"></script>')
    return html.encode()


def make_clip(path: Path, seconds: int = 6) -> Path:
    """A moving test pattern (ffmpeg's testsrc2), VP8 in WebM, 640x360 at 25 fps."""
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=s=640x360:r=25:d={seconds}",
         "-c:v", "libvpx", "-b:v", "600k", "-deadline", "realtime", "-cpu-used", "8", str(path)],
        check=True, timeout=120,
    )
    return path


class _QuietServer(ThreadingHTTPServer):
    """A browser that quits mid-connection resets it: not an error worth a
    traceback in the test or benchmark output; anything else still is one."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class PageServer:
    clip: Path
    posts: list[tuple[float, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> PageServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path in ("/", "/player.html"):
                    self._send(200, page(), "text/html; charset=utf-8")
                elif path in FILES:
                    self._send(200, FILES[path].read_bytes(), TYPES[Path(path).suffix])
                elif path == "/clip.webm":
                    self._send(200, owner.clip.read_bytes(), "video/webm")
                else:
                    self._send(404, b"not found", "text/plain")

            def do_POST(self) -> None:  # noqa: N802
                t = time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/api/autoplay":
                    self._send(404, b"not found", "text/plain")
                    return
                on = bool(json.loads(body)["autoplay"])
                with owner.lock:
                    owner.posts.append((t, on))
                self._send(200, json.dumps({"autoplay": on}).encode(), "application/json")

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/player.html?clip=/clip.webm"

    def take_posts(self) -> list[tuple[float, bool]]:
        with self.lock:
            out, self.posts = self.posts, []
        return out

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
