"""Plain-HTTP server for the test player page on 127.0.0.1, recording the
autoplay POSTs with their arrival times (the stand-in for the OTT service).

The page is the lab's player (``iqn_lab/ott/static``: one page contract, one
page) playing a local clip (``?clip=``), plus two test-only additions: corner
markers, so tests can check the located rectangle, and ``hooks.js``
(``window.iqnTest.stall(ms)``, a stall on demand)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

STATIC = Path(str(resources.files("iqn_lab.ott") / "static"))
HOOKS = Path(__file__).with_name("hooks.js")
_SQUARE = '<div style="position:absolute;{};width:12px;height:12px;z-index:2;background:{}"></div>'
MARKERS = _SQUARE.format("left:0;top:0", "#ff00ff") + _SQUARE.format("right:0;bottom:0", "#00ff00")
TYPES = {".css": "text/css", ".js": "text/javascript"}


def page() -> bytes:
    """The lab's player page with the markers in the player and the hooks after its script."""
    html = (STATIC / "player.html").read_text()
    html = html.replace('<div class="ytp-spinner"', MARKERS + '\n    <div class="ytp-spinner"', 1)
    script = '<script src="/player.js"></script>'
    html = html.replace(script, script + '\n<script src="/hooks.js"></script>', 1)
    return html.encode()


def make_clip(path: Path, seconds: int = 6) -> Path:
    """A moving test pattern (ffmpeg's testsrc2), VP8 in WebM, 640x360 at 25 fps."""
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=s=640x360:r=25:d={seconds}",
         "-c:v", "libvpx", "-b:v", "600k", "-deadline", "realtime", "-cpu-used", "8", str(path)],
        check=True, timeout=120,
    )
    return path


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
                elif path in ("/player.css", "/player.js"):
                    self._send(200, (STATIC / path[1:]).read_bytes(), TYPES[Path(path).suffix])
                elif path == "/hooks.js":
                    self._send(200, HOOKS.read_bytes(), "text/javascript")
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

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
