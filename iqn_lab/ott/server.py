"""The OTT emulator: an aioquic HTTP/3 service that looks like YouTube on the wire.

Two hosts on two addresses, so the page and the video use separate QUIC
connections as on YouTube (www vs. googlevideo):

* www: the player page and ``POST /api/autoplay``. Each autoplay answer is
  padded so that its single QUIC packet is a candidate (Ethernet frame of
  1,180-1,288 bytes), with natural-looking variation in size.
* media: one-second fMP4 segments, sent in full-size packets whose frames are
  1,292 bytes like YouTube's (aioquic's default would give 1,242-byte frames,
  inside the candidate band).

Every request is logged as one JSON line with its time, for experiments.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import mimetypes
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, Headers, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated, QuicEvent

from iqn_lab.quic_cc import WWW_CC, allow_streams


def big_rcvbuf(sock: Any, size: int = 4 << 20) -> None:
    """A large receive buffer: SO_RCVBUFFORCE as root (past net.core.rmem_max), else SO_RCVBUF."""
    import socket

    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


STATIC = Path(__file__).resolve().parent / "static"
ETH_IP_UDP = 14 + 20 + 8  # bytes around a QUIC datagram in an IPv4 Ethernet frame
VIDEO_FRAME = 1292  # YouTube's full-size video packets, Ethernet frame bytes
MAX_DATAGRAM = VIDEO_FRAME - ETH_IP_UDP
# Autoplay answers aim inside the candidate band 1,180-1,288 with a margin for
# ACK frames and packet-number length that vary from packet to packet.
AUTOPLAY_FRAME_RANGE = (1195, 1272)
# Frame bytes beyond the HTTP/3 header block and the body (Ethernet/IP/UDP,
# QUIC short header and tag, frame headers, ACK): a first guess, then learned
# per connection from the packet actually sent.
FIRST_OVERHEAD_GUESS = 42 + 40
#: an answer's packet teaches the overhead only when it lands this close to its target
#: (a correct guess misses by a few bytes: ACK ranges, packet-number length)
LEARN_WITHIN = 64


class SizedH3Connection(H3Connection):
    """Remembers how many bytes the last header block took (QPACK's dynamic
    table makes it vary), so a reply can be padded to an exact packet size."""

    last_header_bytes = 0

    def _encode_headers(self, stream_id: int, headers: Headers) -> bytes:
        before = self._encoder_bytes_sent
        frame_data = super()._encode_headers(stream_id, headers)
        encoder = self._encoder_bytes_sent - before
        # encoder-stream updates travel in a STREAM frame of their own (~4 bytes of header)
        self.last_header_bytes = len(frame_data) + encoder + (4 if encoder else 0)
        return frame_data


@dataclass
class Site:
    """What the service serves; shared by all connections."""

    www_host: str
    media_host: str
    media_dir: Path
    log: TextIO
    rng: random.Random = field(default_factory=random.Random)

    def write_log(self, **entry: Any) -> None:
        self.log.write(json.dumps(entry) + "\n")
        self.log.flush()


@dataclass
class Request:
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)


Response = tuple[int, list[tuple[str, str]], bytes]  # status, headers, body


def teaches(frame: int, target: int) -> bool:
    """Whether the packet an answer left in shows the overhead: our answer alone in it.
    Not a stray ACK (small), nor a full-size packet (the answer split, or packed with
    other answers' retransmissions): learning from one of those once made every later
    answer of a VM run ~750 bytes, no candidate."""
    return abs(frame - target) <= LEARN_WITHIN and frame < VIDEO_FRAME


def _common_headers(content_type: str) -> list[tuple[str, str]]:
    return [
        ("content-type", content_type),
        ("date", email.utils.formatdate(usegmt=True)),
        ("server", "iqn-ott"),
        ("alt-svc", 'h3=":443"; ma=2592000'),
    ]


class OttProtocol(QuicConnectionProtocol):
    """One QUIC connection: HTTP/3 requests in, responses out."""

    site: Site  # set by make_protocol
    #: bidirectional streams a client may open at once (None: aioquic's 128; see --www-streams)
    streams: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.streams is not None:
            allow_streams(self._quic, self.streams)
        self._h3: SizedH3Connection | None = None
        self._requests: dict[int, Request] = {}
        self._overhead = FIRST_OVERHEAD_GUESS
        self._target: int | None = None  # frame size the last autoplay answer aimed at

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._h3 = SizedH3Connection(self._quic)
        if self._h3 is not None:
            for h3_event in self._h3.handle_event(event):
                self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            headers = {k.decode(): v.decode() for k, v in event.headers}
            self._requests[event.stream_id] = Request(headers)
            if event.stream_ended:
                self._answer(event.stream_id)
        elif isinstance(event, DataReceived) and event.stream_id in self._requests:
            self._requests[event.stream_id].body += event.data
            if event.stream_ended:
                self._answer(event.stream_id)

    def _answer(self, stream_id: int) -> None:
        assert self._h3 is not None
        req = self._requests.pop(stream_id)
        host = req.headers.get(":authority", "").split(":")[0]
        method = req.headers.get(":method", "GET")
        path = req.headers.get(":path", "/")
        t = time.time()
        frame = target = None
        if host != self.site.media_host and method == "POST" and path == "/api/autoplay":
            status, body, frame = self._autoplay(stream_id, req)
            target = self._target
        else:
            if host == self.site.media_host:
                status, headers, body = self._media(method, path)
            else:
                status, headers, body = self._www(method, path)
            self._send(stream_id, status, headers, body)
        peer = self._quic._network_paths[0].addr if self._quic._network_paths else ("?", 0)
        self.site.write_log(
            t=t, host=host, method=method, path=path, status=status, bytes=len(body),
            peer=f"{peer[0]}:{peer[1]}", frame=frame, target=target,
        )  # fmt: skip

    def _send(self, stream_id: int, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self._send_headers(stream_id, status, headers)
        assert self._h3 is not None
        self._h3.send_data(stream_id, body, end_stream=True)

    def _send_headers(self, stream_id: int, status: int, headers: list[tuple[str, str]]) -> None:
        assert self._h3 is not None
        self._h3.send_headers(
            stream_id, [(b":status", str(status).encode())] + [(k.encode(), v.encode()) for k, v in headers]
        )

    def _flush(self) -> int | None:
        """Send now, so that this answer leaves in a packet of its own; returns
        the largest frame sent (the answer's)."""
        sizes = []
        assert self._transport is not None  # connected: we are answering a request
        for data, addr in self._quic.datagrams_to_send(now=self._loop.time()):
            self._transport.sendto(data, addr)
            sizes.append(len(data))
        self.transmit()  # re-arms the timers
        return max(sizes) + ETH_IP_UDP if sizes else None

    def _autoplay(self, stream_id: int, req: Request) -> tuple[int, bytes, int | None]:
        """Answer a toggle with 200 OK in one candidate-size packet.

        The header block is encoded first so its exact size is known; the JSON
        body is then padded (like a real service's tracking/visitor payload) so
        the whole packet hits a size drawn from the candidate band.
        """
        assert self._h3 is not None
        try:
            wanted = bool(json.loads(bytes(req.body) or b"{}").get("autoplay", True))
        except (ValueError, AttributeError):
            body = b'{"error": "bad json"}'
            self._send(stream_id, 400, _common_headers("application/json"), body)
            return 400, body, None
        headers = _common_headers("application/json; charset=utf-8") + [
            ("cache-control", "no-cache, no-store, max-age=0, must-revalidate"),
            ("x-content-type-options", "nosniff"),
        ]
        self._send_headers(stream_id, 200, headers)
        fixed = self._h3.last_header_bytes + self._overhead
        target = self._target = self.site.rng.randint(*AUTOPLAY_FRAME_RANGE)
        reply: dict[str, Any] = {
            "autoplay": wanted,
            "responseContext": {"serviceTrackingParams": [{"service": "IQN_OTT", "params": []}]},
            "visitorData": "",
        }
        pad = max(0, target - fixed - len(json.dumps(reply).encode()))
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        reply["visitorData"] = "".join(self.site.rng.choice(alphabet) for _ in range(pad))
        body = json.dumps(reply).encode()
        self._h3.send_data(stream_id, body, end_stream=True)
        frame = self._flush()
        if frame is not None and teaches(frame, target):
            self._overhead = frame - len(body) - self._h3.last_header_bytes
        return 200, body, frame

    def _www(self, method: str, path: str) -> Response:
        path = path.split("?")[0]
        if method != "GET":
            return 405, _common_headers("text/plain"), b"method not allowed\n"
        if path in ("/", "/watch"):
            path = "/player.html"
        if path == "/media.json":
            meta = json.loads((self.site.media_dir / "media.json").read_text())
            meta["base"] = f"https://{self.site.media_host}/"
            return 200, _common_headers("application/json"), json.dumps(meta).encode()
        f = STATIC / path.lstrip("/")
        if "/" in path.lstrip("/") or not f.is_file():
            return 404, _common_headers("text/plain"), b"not found\n"
        ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
        return 200, _common_headers(ctype) + [("cache-control", "no-cache")], f.read_bytes()

    def _media(self, method: str, path: str) -> Response:
        name = path.split("?")[0].lstrip("/")
        cors = [("access-control-allow-origin", "*"), ("timing-allow-origin", "*")]
        f = self.site.media_dir / name
        if method != "GET" or "/" in name or not name.endswith(".m4s") or not f.is_file():
            return 404, _common_headers("text/plain") + cors, b"not found\n"
        return 200, _common_headers("video/mp4") + cors, f.read_bytes()


def configuration(cert: Path, key: Path, keylog: TextIO | None = None, cc: str = "reno") -> QuicConfiguration:
    cfg = QuicConfiguration(
        is_client=False, alpn_protocols=H3_ALPN, max_datagram_size=MAX_DATAGRAM, secrets_log_file=keylog,
        congestion_control_algorithm=WWW_CC[cc],
    )
    cfg.load_cert_chain(cert, key)
    return cfg


async def run(args: argparse.Namespace) -> None:
    log = open(args.log, "a", encoding="utf-8") if args.log else sys.stdout
    keylog = open(args.keylog, "a", encoding="utf-8") if args.keylog else None
    site = Site(args.www_host, args.media_host, Path(args.media_dir), log)
    protocols = {h: type("BoundOttProtocol", (OttProtocol,), {"site": site, "streams": streams})
                 for h, streams in (("www", args.www_streams), ("media", None))}
    cfgs = {"www": configuration(Path(args.cert), Path(args.key), keylog, args.www_cc),
            "media": configuration(Path(args.cert), Path(args.key), keylog)}
    hosts = ["www", "media"] if args.hosts == "both" else [args.hosts]
    addr = {"www": args.www_addr, "media": args.media_addr}
    servers = [await serve(addr[h], args.port, configuration=cfgs[h], create_protocol=protocols[h])
               for h in hosts]
    for s in servers:  # many viewers share these two sockets: room for their bursts (see big_rcvbuf)
        sock = s._transport.get_extra_info("socket") if s._transport is not None else None
        if sock is not None:
            big_rcvbuf(sock)
    if args.ready:
        Path(args.ready).write_text("ready\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m iqn_lab.ott.server", description=__doc__.splitlines()[0])
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--media-dir", required=True)
    ap.add_argument("--www-host", default="www.iqn.test")
    ap.add_argument("--media-host", default="media.iqn.test")
    ap.add_argument("--www-addr", required=True)
    ap.add_argument("--media-addr", required=True)
    ap.add_argument("--port", type=int, default=443)
    ap.add_argument("--log", help="request log, JSON lines (default stdout)")
    ap.add_argument("--keylog", help="TLS secrets for Wireshark")
    ap.add_argument("--ready", help="file written once both hosts listen")
    ap.add_argument("--hosts", choices=("both", "www", "media"), default="both",
                    help="serve both hosts, or only one (two processes: a busy media host cannot delay "
                         "the page host's answers)")
    ap.add_argument("--www-cc", choices=sorted(WWW_CC), default="reno",
                    help="the page host's congestion control: reno (aioquic's), or fixed: a window "
                         "losses never shrink, so a burst of answers always leaves one per packet "
                         "(FixedWindow)")
    ap.add_argument("--www-streams", type=int, default=None, metavar="N",
                    help="requests a client may have open at once on the page host (default: "
                         "aioquic's 128, raised as they complete): each toggle is one, and its "
                         "stream stays open until its answer is acknowledged (iqn_lab.quic_cc)")
    args = ap.parse_args(argv)
    if args.www_streams is not None and args.www_streams < 1:
        ap.error(f"--www-streams must be at least 1, got {args.www_streams}")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
