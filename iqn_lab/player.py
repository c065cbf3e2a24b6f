"""The headless signal player: many viewers that stream, stall and signal like the real thing.

One Chromium can stand for one viewer; the localisation lab needs dozens. A
signal player is what the player page (``ott/static/player.js``) and the
end-user agent do together, without a browser or a screen:

* **Streams** the OTT emulator's clip over real QUIC/HTTP/3 (aioquic): the page
  connection to the www host (``GET /``, ``GET /media.json``) and the video
  connection to the media host (``init.m4s``, then one-second ``seg-N.m4s``),
  fetching the next segment only while less than ``ahead`` seconds are
  buffered, so it downloads at the clip's bit rate, as the page does.
* **Plays** a buffer (:class:`BufferModel`, sans-I/O): media seconds arrive with
  segments and are played in real time. Playback starts once ``startup``
  seconds are buffered; when the buffer runs dry the player *stalls* until
  ``resume`` seconds are buffered again. The wait before the first frame is a
  stall too (the page shows its spinner from the start).
* **Signals** while stalled (:class:`Signaller`, sans-I/O): every ``p``
  seconds on a grid (the user agent's screenshot period) it sends ``n``
  ``POST /api/autoplay`` requests, flipping the switch each time, on the page
  connection: exactly the requests the user agent's clicks make the page send,
  so each answer is one candidate packet.
* **Logs** its ground truth, one JSON object per line per player: ``start``,
  each ``stall`` (``start``, ``end``, ``startup``), each ``signal`` (``t``,
  ``toggles``), and ``end`` with ``watched_s`` and ``stalled_s`` (epoch
  seconds; shapes in docs/contracts.md).

Each player binds its sockets to its own source address (``source``), so one
process with one asyncio loop runs many viewers that the router sees as many
clients. Run it inside a client namespace::

    python -m iqn_lab.player --www 198.19.1.2 --media 198.19.1.3 --source 198.18.1.10 \\
        --source 198.18.1.11 --duration 60 --log-dir /tmp/players
    python -m iqn_lab.player --spec players.json --duration 60 --log-dir /tmp/players
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import signal
import socket
import ssl
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent

from iqn_lab.quic_cc import WWW_CC

#: the end-user agent's defaults (user_agent/protocol.py): n toggles every p seconds
DEFAULT_P = 0.2
DEFAULT_N = 4
#: seconds kept buffered ahead (the page's default ``buffer``)
DEFAULT_AHEAD = 4.0
#: seconds buffered before playback starts, and before it resumes after a stall
DEFAULT_STARTUP = 2.0
DEFAULT_RESUME = 2.0
CONNECT_TIMEOUT = 10.0
#: socket receive buffer: one loop serves many players, and a loop busy for a few
#: milliseconds must not let the kernel drop a segment's burst (QUIC would recover,
#: slowly, and the player would stall for the wrong reason)
RCVBUF = 4 << 20


# -- sans-I/O: the playback buffer and the signal schedule ---------------------------------------


@dataclass
class BufferModel:
    """Media seconds in, real time passing, stalls out (times in any one clock).

    ``add(t, s)`` adds ``s`` media seconds that finished arriving at ``t``;
    ``advance(t)`` plays up to ``t``. A stall starts at the exact instant the
    play head reaches the end of what was downloaded, and ends when ``resume``
    seconds are buffered again (``startup`` for the first one, which starts at
    ``t0``). Finished stalls are in :attr:`stalls` as ``(start, end, startup)``.
    """

    t0: float
    startup: float = DEFAULT_STARTUP
    resume: float = DEFAULT_RESUME
    media: float = 0.0  # media seconds downloaded
    pos: float = 0.0  # media seconds played
    now: float = field(init=False)
    stall_start: float | None = field(init=False)  # set while stalled
    stalls: list[tuple[float, float, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.now = self.t0
        self.stall_start = self.t0
        self._first = True

    @property
    def stalled(self) -> bool:
        return self.stall_start is not None

    def advance(self, t: float) -> None:
        if t <= self.now:
            return
        if self.stall_start is None:
            left = self.media - self.pos
            if t - self.now >= left:  # the buffer runs dry inside (now, t]
                self.pos = self.media
                self.stall_start = self.now + left
            else:
                self.pos += t - self.now
        self.now = t

    def add(self, t: float, seconds: float) -> None:
        self.advance(t)
        self.media += seconds
        if self.stall_start is not None and self.media - self.pos >= (
            self.startup if self._first else self.resume
        ):
            self.stalls.append((self.stall_start, t, self._first))
            self.stall_start = None
            self._first = False

    def ahead(self, t: float) -> float:
        """Seconds buffered ahead of the play head at ``t``."""
        self.advance(t)
        return self.media - self.pos

    def stalled_s(self, t: float) -> float:
        """Seconds stalled from ``t0`` to ``t`` (the one going on up to ``t``)."""
        self.advance(t)
        done = sum(b - a for a, b, _ in self.stalls)
        return done + (t - self.stall_start if self.stall_start is not None else 0.0)


@dataclass
class Signaller:
    """The user agent's rhythm: a look every ``p`` seconds on a grid from ``phase``;
    a look that finds the player stalled sends ``n`` toggles. A look missed because
    the loop was late is skipped (as a late screenshot would be), never made up."""

    p: float = DEFAULT_P
    n: int = DEFAULT_N
    phase: float = 0.0
    toggles: int = 0

    def next_look(self, t: float) -> float:
        """The first grid instant strictly after ``t``."""
        k = math.floor((t - self.phase) / self.p) + 1
        nxt = self.phase + k * self.p
        while nxt <= t + 1e-9:  # t on the grid, give or take a rounding error: the next one
            k += 1
            nxt = self.phase + k * self.p
        return nxt

    def look(self, stalled: bool) -> int:
        """Toggles to send now."""
        if not stalled:
            return 0
        self.toggles += self.n
        return self.n


# -- HTTP/3 over aioquic, from a chosen source address ------------------------------------------


class PlayerError(Exception):
    """A connection or request failed; the player reconnects or reports it."""


class H3Client(QuicConnectionProtocol):
    """One QUIC connection speaking HTTP/3: ``await request(...)`` -> (status, body)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h3 = H3Connection(self._quic)
        self._pending: dict[int, tuple[asyncio.Future[tuple[int, bytes]], list[int], bytearray]] = {}
        self.closed = False

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.closed = True
            for fut, _, _ in self._pending.values():
                if not fut.done():
                    why = event.reason_phrase or event.error_code
                    fut.set_exception(PlayerError(f"connection closed: {why}"))
            self._pending.clear()
            return
        for ev in self._h3.handle_event(event):
            got = self._pending.get(getattr(ev, "stream_id", -1))
            if got is None:
                continue
            fut, status, body = got
            if isinstance(ev, HeadersReceived):
                for k, v in ev.headers:
                    if k == b":status":
                        status.append(int(v))
            elif isinstance(ev, DataReceived):
                body += ev.data
            if getattr(ev, "stream_ended", False):
                del self._pending[getattr(ev, "stream_id", -1)]
                if not fut.done():
                    fut.set_result((status[0] if status else 0, bytes(body)))

    def send_request(
        self, method: str, authority: str, path: str, body: bytes = b"", ctype: str = "application/json"
    ) -> asyncio.Future[tuple[int, bytes]]:
        """Put one request on the wire now (its own packet) and return its answer's future."""
        if self.closed:
            raise PlayerError("connection closed")
        sid = self._quic.get_next_available_stream_id()
        headers = [(b":method", method.encode()), (b":scheme", b"https"),
                   (b":authority", authority.encode()), (b":path", path.encode()),
                   (b"user-agent", b"iqn-signal-player")]
        if body:
            headers.append((b"content-type", ctype.encode()))
        self._h3.send_headers(sid, headers, end_stream=not body)
        if body:
            self._h3.send_data(sid, body, end_stream=True)
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[sid] = (fut, [], bytearray())
        self.transmit()
        return fut

    async def get(self, authority: str, path: str) -> bytes:
        status, body = await self.send_request("GET", authority, path)
        if status != 200:
            raise PlayerError(f"GET https://{authority}{path}: status {status}")
        return body


def big_rcvbuf(sock: socket.socket, size: int = RCVBUF) -> None:
    """Ask for a large receive buffer: SO_RCVBUFFORCE as root (past net.core.rmem_max), else SO_RCVBUF."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


async def h3_connect(
    addr: str, port: int, host: str, source: str | None, cafile: str | None, cc: str = "reno"
) -> H3Client:
    """An HTTP/3 connection to ``addr``:``port`` (TLS name ``host``) from ``source``, with
    congestion control ``cc`` (a key of :data:`iqn_lab.quic_cc.WWW_CC`)."""
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=host,
                            congestion_control_algorithm=WWW_CC[cc])
    if cafile:
        cfg.load_verify_locations(cafile)
    else:
        cfg.verify_mode = ssl.CERT_NONE
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    big_rcvbuf(sock)
    try:
        sock.bind((source or ("::" if ":" in addr else "0.0.0.0"), 0))
    except OSError as e:
        sock.close()
        raise PlayerError(f"cannot bind to source address {source}: {e.strerror}") from None
    _, proto = await loop.create_datagram_endpoint(
        lambda: H3Client(QuicConnection(configuration=cfg)), sock=sock)
    client: H3Client = proto  # type: ignore[assignment]
    client.connect((addr, port))
    try:
        await asyncio.wait_for(client.wait_connected(), CONNECT_TIMEOUT)
    except (TimeoutError, ConnectionError) as e:
        client.close()
        raise PlayerError(f"no QUIC connection to {host} ({addr}:{port}): {e or 'timeout'}") from None
    return client


# -- one player ----------------------------------------------------------------------------------


@dataclass
class PlayerSpec:
    """Where one player connects from and to (a JSON object in ``--spec``)."""

    name: str
    www: str
    media: str
    source: str | None = None
    www_host: str = "www.iqn.test"
    media_host: str = "media.iqn.test"
    port: int = 443


@dataclass
class Settings:
    p: float = DEFAULT_P
    n: int = DEFAULT_N
    ahead: float = DEFAULT_AHEAD
    startup: float = DEFAULT_STARTUP
    resume: float = DEFAULT_RESUME
    cafile: str | None = None
    #: the page connection's congestion control (iqn_lab.quic_cc): its toggles and their answers
    www_cc: str = "reno"


class Player:
    """One viewer: page and video connections, buffer, signaller, ground-truth log."""

    def __init__(self, spec: PlayerSpec, settings: Settings, log: TextIO, rng: random.Random) -> None:
        self.spec, self.s, self.log = spec, settings, log
        self.loop = asyncio.get_running_loop()
        self.offset = time.time() - self.loop.time()  # wall = loop time + offset
        self.model = BufferModel(self.loop.time(), settings.startup, settings.resume)
        self.signaller = Signaller(settings.p, settings.n, phase=rng.uniform(0, settings.p))
        self.www: H3Client | None = None
        self.media: H3Client | None = None
        self.autoplay = True
        self.answers = 0
        self.errors = 0
        self._logged_stalls = 0
        self.page_loaded = asyncio.Event()

    def wall(self, t: float) -> float:
        return t + self.offset

    def write(self, **obj: Any) -> None:
        self.log.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def _flush_stalls(self) -> None:
        for a, b, first in self.model.stalls[self._logged_stalls:]:
            self.write(event="stall", player=self.spec.name, start=round(self.wall(a), 4),
                       end=round(self.wall(b), 4), duration=round(b - a, 4), startup=first)
        self._logged_stalls = len(self.model.stalls)

    async def _connect(self) -> None:
        sp = self.spec
        if self.www is None or self.www.closed:
            self.www = await h3_connect(sp.www, sp.port, sp.www_host, sp.source, self.s.cafile, self.s.www_cc)
            await self.www.get(sp.www_host, "/")  # the page, on the connection that will signal
            self.page_loaded.set()
        if self.media is None or self.media.closed:
            self.media = await h3_connect(sp.media, sp.port, sp.media_host, sp.source, self.s.cafile)

    async def run(self, until: float) -> None:
        """Play until loop time ``until``; the log gets everything that happened."""
        sp = self.spec
        self.write(event="start", player=sp.name, t=round(self.wall(self.model.t0), 4), client=sp.source,
                   www=sp.www, media=sp.media, p=self.s.p, n=self.s.n, ahead=self.s.ahead,
                   startup=self.s.startup, resume=self.s.resume)
        signals = asyncio.create_task(self._signal_loop(until))
        try:
            await self._stream(until)
        finally:
            signals.cancel()
            await asyncio.gather(signals, return_exceptions=True)
            end = min(self.loop.time(), until)
            self.model.advance(end)
            stalled = self.model.stalled_s(end)
            if self.model.stall_start is not None:  # the stall going on ends with the run
                self.model.stalls.append((self.model.stall_start, end, not self.model.stalls))
                self.model.stall_start = None
            self._flush_stalls()
            self.write(event="end", player=sp.name, t=round(self.wall(end), 4),
                       watched_s=round(end - self.model.t0, 4), stalled_s=round(stalled, 4),
                       toggles=self.signaller.toggles, answers=self.answers, errors=self.errors,
                       segments=self._segments)
            for c in (self.www, self.media):
                if c is not None:
                    c.close()

    _segments = 0

    async def _stream(self, until: float) -> None:
        meta: dict[str, Any] | None = None
        n = 0
        while self.loop.time() < until:
            try:
                await self._connect()
                assert self.www is not None and self.media is not None
                if meta is None:
                    meta = json.loads(await self.www.get(self.spec.www_host, "/media.json"))
                    await self.media.get(self.spec.media_host, "/init.m4s")
                ahead = self.model.ahead(self.loop.time())
                if ahead >= self.s.ahead:
                    await asyncio.sleep(min(ahead - self.s.ahead + 0.01, until - self.loop.time()))
                    continue
                seg = n % int(meta["segments"]) + 1
                asked = self.loop.time()
                data = await self.media.get(self.spec.media_host, f"/seg-{seg}.m4s")
                self.write(event="segment", player=self.spec.name, t=round(self.wall(self.loop.time()), 4),
                           seg=seg, bytes=len(data), fetch_s=round(self.loop.time() - asked, 4))
                n += 1
                self._segments += 1
                self.model.add(self.loop.time(), float(meta.get("segment_seconds", 1.0)))
                self._flush_stalls()
            except (PlayerError, ConnectionError, OSError, ValueError, KeyError) as e:
                self.errors += 1
                self.write(event="error", player=self.spec.name, t=round(time.time(), 4), error=str(e))
                await asyncio.sleep(0.5)

    async def _signal_loop(self, until: float) -> None:
        # The user agent looks as soon as the page is there (its spinner shows until the
        # first frame: the startup stall is signalled like any other), then every p.
        await self.page_loaded.wait()
        self.signaller.phase = t = self.loop.time()
        while True:
            if t >= until:
                return
            await asyncio.sleep(max(0.0, t - self.loop.time()))
            self.model.advance(self.loop.time())
            www = self.www
            k = self.signaller.look(self.model.stalled and www is not None and not www.closed)
            if not k or www is None:
                t = self.signaller.next_look(self.loop.time())
                continue
            futs = []
            for _ in range(k):  # n clicks: each flips the switch and posts its state
                self.autoplay = not self.autoplay
                body = json.dumps({"autoplay": self.autoplay}).encode()
                try:
                    futs.append(www.send_request("POST", self.spec.www_host, "/api/autoplay", body))
                except PlayerError:
                    break
            if futs:
                self.write(event="signal", player=self.spec.name, t=round(self.wall(self.loop.time()), 4),
                           toggles=len(futs))
            for f in futs:
                f.add_done_callback(self._answered)
            t = self.signaller.next_look(self.loop.time())

    def _answered(self, fut: asyncio.Future[tuple[int, bytes]]) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result()[0] == 200:
            self.answers += 1


async def run_players(specs: Iterable[PlayerSpec], settings: Settings, duration: float, log_dir: Path,
                      stagger: float = 0.0, seed: int | None = None) -> None:
    """Run every player for ``duration`` seconds in this loop (starts spread over ``stagger`` s);
    SIGTERM/SIGINT end them early, with their logs complete."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    log_dir.mkdir(parents=True, exist_ok=True)
    until = loop.time() + duration
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    specs = list(specs)
    logs = [open(log_dir / f"{s.name}.jsonl", "a", encoding="utf-8") for s in specs]

    async def one(i: int, spec: PlayerSpec) -> None:
        if stagger:
            await asyncio.sleep(stagger * i / max(1, len(specs)))
        await Player(spec, settings, logs[i], rng).run(until)

    tasks = [asyncio.create_task(one(i, s)) for i, s in enumerate(specs)]
    waiter = asyncio.create_task(stop.wait())
    try:
        everyone: asyncio.Future[Any] = asyncio.gather(*tasks)
        await asyncio.wait([waiter, everyone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        waiter.cancel()
        for f in logs:
            f.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    """One player's log as a list of objects (a torn last line is skipped)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m iqn_lab.player", description=__doc__.splitlines()[0])
    ap.add_argument("--spec", help="JSON file: a list of players {name, www, media, source, www_host, ...}")
    ap.add_argument("--www", help="address of the www host (page and autoplay)")
    ap.add_argument("--media", help="address of the media host (segments)")
    ap.add_argument("--www-host", default="www.iqn.test")
    ap.add_argument("--media-host", default="media.iqn.test")
    ap.add_argument("--port", type=int, default=443)
    ap.add_argument("--source", action="append", default=[],
                    help="source address of one player (repeat: one player each)")
    ap.add_argument("--count", type=int, default=1, help="players without --source (kernel-chosen source)")
    ap.add_argument("--duration", type=float, required=True, help="seconds to play")
    ap.add_argument("--log-dir", required=True, help="one NAME.jsonl ground-truth log per player")
    ap.add_argument("--p", type=float, default=DEFAULT_P, help="seconds between looks at the player")
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="toggles per signal (even)")
    ap.add_argument("--ahead", type=float, default=DEFAULT_AHEAD, help="seconds kept buffered")
    ap.add_argument("--startup", type=float, default=DEFAULT_STARTUP, help="seconds buffered before playing")
    ap.add_argument("--resume", type=float, default=DEFAULT_RESUME, help="seconds buffered to end a stall")
    ap.add_argument("--cafile", help="the OTT's certificate (default: not verified)")
    ap.add_argument("--www-cc", choices=sorted(WWW_CC), default="reno",
                    help="congestion control of the page connection, which carries the toggles: "
                         "reno (aioquic's) or fixed (a window that never shrinks; iqn_lab.quic_cc)")
    ap.add_argument("--stagger", type=float, default=0.0, help="spread the starts over this many seconds")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        specs = load_specs(a)
        settings = Settings(a.p, a.n, a.ahead, a.startup, a.resume, a.cafile, a.www_cc)
        check_settings(settings, a.duration)
    except ValueError as e:
        print(f"iqn-player: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    asyncio.run(run_players(specs, settings, a.duration, Path(a.log_dir), a.stagger, a.seed))


def check_settings(s: Settings, duration: float) -> None:
    if not 0.02 <= s.p <= 60:
        raise ValueError(f"--p must be between 0.02 and 60 seconds, got {s.p}")
    if s.n < 2 or s.n % 2:
        raise ValueError(f"--n must be an even number of toggles (>= 2), got {s.n}")
    if not (s.ahead > 0 and s.startup > 0 and s.resume > 0 and duration > 0):
        raise ValueError("--ahead, --startup, --resume and --duration must be positive")


def load_specs(a: argparse.Namespace) -> list[PlayerSpec]:
    if a.spec:
        try:
            raw = json.loads(Path(a.spec).read_text())
            return [PlayerSpec(**d) for d in raw]
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{a.spec}: not a list of player specs ({e})") from None
    if not (a.www and a.media):
        raise ValueError("give --spec FILE, or --www ADDR and --media ADDR")
    sources = a.source or [None] * a.count
    return [PlayerSpec(f"player-{i}", a.www, a.media, src, a.www_host, a.media_host, a.port)
            for i, src in enumerate(sources)]


def spec_json(specs: Iterable[PlayerSpec]) -> str:
    return json.dumps([asdict(s) for s in specs])


if __name__ == "__main__":
    main()
