"""The OTT emulator's page-host congestion control (``--www-cc fixed``): a window that
losses never shrink, so a burst of autoplay answers is never held back by pacing and
packed an answer and a half per packet (what a VM under TCG showed with Reno)."""

from __future__ import annotations

from aioquic.quic.congestion.base import create_congestion_control
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.recovery import QuicPacketPacer

from iqn_lab.ott.server import FIXED_WINDOW_DATAGRAMS, MAX_DATAGRAM, WWW_CC, configuration

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


def test_the_pacer_lets_a_burst_of_answers_out_at_once_only_with_the_fixed_window() -> None:
    """aioquic's pacer, fed the window and a 100 ms RTT: how many answers of a burst of
    4 go out at one instant (the rest wait, and then leave packed together)."""
    def at_once(window: int) -> int:
        pacer = QuicPacketPacer(max_datagram_size=MAX_DATAGRAM)
        pacer.update_rate(congestion_window=window, smoothed_rtt=0.1)
        pacer.update_bucket(now=10.0)
        n = 0
        while n < 4 and pacer.next_send_time(now=10.0) is None:
            pacer.update_after_send(now=10.0)
            n += 1
        return n

    assert at_once(window_after_losses(WWW_CC["fixed"])[0]) == 4
    assert at_once(window_after_losses(WWW_CC["reno"])[0]) < 4


def test_configuration_names_the_algorithm(tmp_path: object) -> None:
    from pathlib import Path

    from iqn_lab.certs import make_cert

    d = Path(str(tmp_path))
    make_cert(d / "c.crt", d / "c.key", "www.iqn.test", ("www.iqn.test",))
    assert configuration(d / "c.crt", d / "c.key", cc="fixed").congestion_control_algorithm == "iqn-fixed"
    assert configuration(d / "c.crt", d / "c.key").congestion_control_algorithm == "reno"
