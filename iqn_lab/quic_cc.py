"""Congestion control and stream room for the lab's page connection (the
autoplay signal's): aioquic's Reno, or a window that never shrinks, at both
ends; and how many requests the page host lets a client have open.

Why a choice: the signal's answers and the server's acknowledgements of the
toggles cross the bottleneck that makes the stall. Starved below the signal's
own rate (the VM pair's 100 kbit/s: 20 answers of ~1.25 kB a second are 200
kbit/s), Reno at either end shrinks its window to two datagrams and backs off
its probes; toggles then leave late, in clumps, packed several to a packet,
and the router sees fewer and later candidates than the user agent sent. The
namespace lab keeps Reno (its stalls leave the signal room); the VM pair,
whose check asserts the stalls' durations, uses ``fixed`` at both ends.
"""

from __future__ import annotations

from typing import Any

from aioquic.quic.congestion.base import register_congestion_control
from aioquic.quic.congestion.reno import RenoCongestionControl
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet_builder import QuicSentPacket

#: the page host's answers in one packet each: a window so large that neither it nor the
#: pacer derived from it ever holds an answer back
FIXED_WINDOW_DATAGRAMS = 1 << 20


class FixedWindow(RenoCongestionControl):
    """A congestion window that never shrinks (``--www-cc fixed``), for the page connection.

    Why: with Reno, losses at a starved bottleneck cut the page connection's window
    to two datagrams, and the pacer derived from it then holds back the third and
    fourth answers of a burst; aioquic sends them later packed together, an answer
    and a half per full-size packet, so neither is a candidate. A slow client (a VM
    under TCG) whose toggles arrive together lost half its answers that way; a window
    of 64 datagrams still filled up when the answers outran a 100 kbit/s bottleneck
    (lost ones count in flight until declared lost). The page host sends little (the
    page, one answer per toggle), so the window is unbounded in practice and every
    answer leaves at once, as its own packet."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self.congestion_window = FIXED_WINDOW_DATAGRAMS * max_datagram_size

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.bytes_in_flight -= packet.sent_bytes

    def on_packets_lost(self, *, now: float, packets: Any) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes

    def on_persistent_congestion(self) -> None:
        pass

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        pass


register_congestion_control("iqn-fixed", FixedWindow)
#: --www-cc choices -> aioquic's algorithm names
WWW_CC = {"reno": "reno", "fixed": "iqn-fixed"}


#: requests the VM pair's page host lets a client have open at once (--www-streams)
PAGE_STREAMS = 4096


def allow_streams(quic: QuicConnection, streams: int) -> None:
    """Let the peer of ``quic`` (a server's connection, before its handshake) open
    ``streams`` bidirectional streams at once.

    Why: each toggle is a request on a new stream. aioquic grants 128 streams in all
    and raises the grant (doubling it once half is used) in a MAX_STREAMS frame,
    which crosses the starved bottleneck like the answers do: in a VM pair run the
    player's toggles stopped for 3 s when its 128th stream was opened (the frame was
    stuck or lost on the way) and then 75 left at once. A larger initial grant keeps
    the toggles independent of the path back for a whole check."""
    quic._local_max_streams_bidi.value = streams
