"""The OTT emulator's page-host congestion control (``--www-cc fixed``): a window that
losses never shrink, so a burst of autoplay answers is never held back by pacing and
packed an answer and a half per packet (what a VM under TCG showed with Reno)."""

from __future__ import annotations

from aioquic.quic.congestion.base import create_congestion_control
from aioquic.quic.packet_builder import QuicSentPacket

from iqn_lab.ott.server import MAX_DATAGRAM, configuration, teaches
from iqn_lab.quic_cc import FIXED_WINDOW_DATAGRAMS, WWW_CC

SENT = 1200


def sent(t: float) -> QuicSentPacket:
    return QuicSentPacket(epoch=3, in_flight=True, is_ack_eliciting=True, is_crypto_packet=False,  # type: ignore[arg-type]
                          packet_number=0, packet_type=0, sent_time=t, sent_bytes=SENT)


def window_after_losses(name: str) -> tuple[int, int]:
    """(window, bytes in flight) after 20 packets sent, 10 of them lost in two
    congestion events, the rest acknowledged, then persistent congestion."""
    cc = create_congestion_control(name, max_datagram_size=MAX_DATAGRAM)
    pkts = [sent(0.01 * i) for i in range(20)]
    for p in pkts:
        cc.on_packet_sent(packet=p)
    cc.on_packets_lost(now=0.3, packets=pkts[:5])
    cc.on_packets_lost(now=0.6, packets=pkts[5:10])
    for p in pkts[10:]:
        cc.on_packet_acked(now=0.7, packet=p)
    cc.on_persistent_congestion()
    return cc.congestion_window, cc.bytes_in_flight


def test_fixed_window_keeps_its_size_through_losses() -> None:
    fixed, in_flight = window_after_losses(WWW_CC["fixed"])
    assert fixed == FIXED_WINDOW_DATAGRAMS * MAX_DATAGRAM and in_flight == 0
    reno, reno_in_flight = window_after_losses(WWW_CC["reno"])
    assert reno == 2 * MAX_DATAGRAM and reno_in_flight == 0  # what Reno does: the minimum window


def test_a_burst_finds_room_with_many_answers_in_flight() -> None:
    """Answers outrunning a starved bottleneck stay in flight (queued, or lost but not yet
    declared lost) for seconds: 200 of them. The next burst of 4 must still find room in
    the window (aioquic holds back what does not fit, then packs it together)."""
    def room(name: str) -> int:
        cc = create_congestion_control(name, max_datagram_size=MAX_DATAGRAM)
        pkts = [sent(0.01 * i) for i in range(220)]
        for p in pkts:
            cc.on_packet_sent(packet=p)
        cc.on_packets_lost(now=2.5, packets=pkts[:20])
        return cc.congestion_window - cc.bytes_in_flight

    assert room(WWW_CC["fixed"]) >= 4 * MAX_DATAGRAM
    assert room(WWW_CC["reno"]) < 4 * MAX_DATAGRAM  # Reno: the burst waits


def test_configuration_names_the_algorithm(tmp_path: object) -> None:
    from pathlib import Path

    from iqn_lab.certs import make_cert

    d = Path(str(tmp_path))
    make_cert(d / "c.crt", d / "c.key", "www.iqn.test", ("www.iqn.test",))
    assert configuration(d / "c.crt", d / "c.key", cc="fixed").congestion_control_algorithm == "iqn-fixed"
    assert configuration(d / "c.crt", d / "c.key").congestion_control_algorithm == "reno"


def test_only_an_answer_alone_in_its_packet_teaches_the_overhead() -> None:
    assert teaches(1230, 1228) and teaches(1272 - 60, 1272)
    assert not teaches(77, 1230)  # a stray ACK
    assert not teaches(333, 1230)  # the tail of a split answer
    assert not teaches(1292, 1272)  # full-size: split, or packed with retransmissions


def test_the_players_page_connection_uses_the_chosen_window(tmp_path: object) -> None:
    """The player's page connection (its toggles) takes ``--www-cc`` too: over loopback to a
    real OTT page host, a toggle is answered and the connection's controller is the fixed
    window (``fixed``) or aioquic's Reno (the default); the page host's ``--www-streams``
    grant reached the client in the handshake (aioquic's own is 128)."""
    import asyncio
    import json
    import random
    import subprocess
    import sys
    import time
    from pathlib import Path

    from aioquic.quic.congestion.reno import RenoCongestionControl

    from iqn_lab.certs import make_cert
    from iqn_lab.player import h3_connect
    from iqn_lab.quic_cc import PAGE_STREAMS, FixedWindow

    d = Path(str(tmp_path))
    make_cert(d / "c.crt", d / "c.key", "www.iqn.test", ("www.iqn.test",))
    port = random.randrange(20000, 60000)
    ott = subprocess.Popen(
        [sys.executable, "-m", "iqn_lab.ott.server", "--cert", str(d / "c.crt"), "--key", str(d / "c.key"),
         "--media-dir", str(d), "--www-addr", "127.0.0.1", "--media-addr", "127.0.0.1", "--port", str(port),
         "--hosts", "www", "--www-cc", "fixed", "--www-streams", str(PAGE_STREAMS),
         "--log", str(d / "ott.jsonl"), "--ready", str(d / "ready")],
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (d / "ready").exists():
            assert ott.poll() is None and time.monotonic() < deadline, ott.stderr.read() if ott.stderr else ""
            time.sleep(0.05)

        async def toggle(cc: str) -> tuple[int, object]:
            c = await h3_connect("127.0.0.1", port, "www.iqn.test", None, str(d / "c.crt"), cc)
            try:
                assert c._quic._remote_max_streams_bidi == PAGE_STREAMS
                status, _ = await c.send_request("POST", "www.iqn.test", "/api/autoplay",
                                                 json.dumps({"autoplay": False}).encode())
                return status, c._quic._loss._cc
            finally:
                c.close()

        for cc, kind in (("fixed", FixedWindow), ("reno", RenoCongestionControl)):
            status, ctl = asyncio.run(toggle(cc))
            assert status == 200 and type(ctl) is kind, (cc, status, ctl)
    finally:
        ott.terminate()
        ott.wait(10)


def test_www_streams_must_be_positive() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "iqn_lab.ott.server", "--cert", "c", "--key", "k",
                        "--media-dir", ".", "--www-addr", "127.0.0.1", "--media-addr", "127.0.0.1",
                        "--www-streams", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--www-streams must be at least 1, got 0" in r.stderr, r.stderr
