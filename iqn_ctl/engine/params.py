"""Signalling and filter parameters shared by the data plane, the engine and the CLI.

Everything the inference needs is derived from the two numbers the end-user
agent is configured with, p and n, so that a deployment with another signalling
interval or toggle count needs no re-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

from iqn_ctl.errors import IqnError

DEFAULT_P = 0.2
DEFAULT_N = 4
DEFAULT_PORT = 443
DEFAULT_MIN_SIZE = 1180
DEFAULT_MAX_SIZE = 1288
MAX_FRAME = 65535
#: flows tracked at once, in the kernel's table and the engine's (least recent dropped)
DEFAULT_MAX_FLOWS = 65536
#: the most toggles per signal a flag may ask for: the tracker keeps a window of
#: n arrivals, and an agent toggling a thousand times every p is no video player
MAX_N = 1000
#: new flows one server address may open per second (and in one burst) before its
#: further new flows are refused: one source cannot flood the flow table (0: no limit)
DEFAULT_SOURCE_RATE = 1000.0
#: the count decoder: a stall signalled by C candidates lasted (C/n + COUNT_OFFSET) p.
#: The end-user agent's protocol ``edges`` sends exactly the count this decodes to
#: within p/n (user_agent.protocol.COUNT_OFFSET: same value, checked by a test);
#: for the paper's protocol it is the half look of screenshot phase.
COUNT_OFFSET = 0.5
#: protocol ``edges``: the end-user agent looks at the player this many times per p
#: (a model parameter of engine.synth; user_agent.protocol.LOOKS_PER_P)
EDGES_LOOKS_PER_P = 5
#: Signal shaping in the data plane (docs/dataplane.md, "Bursts"): consecutive
#: candidates of one flow at most this far apart (s) belong to one burst, and
#: the kernel writes one ring-buffer record per burst. A burst's toggles leave
#: the player a few ms apart; a larger gap would only hold a short burst back
#: longer before user space sees it (the stall-visible latency).
BURST_GAP = 0.004
#: the most candidates one burst record carries (a burst holds min(n, this)):
#: the record keeps each one's time, so the engine sees every arrival exactly
BURST_MAX = 12


class ParamError(IqnError, ValueError):
    """A parameter combination that cannot work; the message is shown to the user as is."""


@dataclass(frozen=True, slots=True)
class SignalParams:
    """The end-user agent's signalling: a burst of ``n`` toggles every ``p`` seconds.

    The windows are the paper's: a stall starts once ``n`` candidates fall in
    ``w_start = 1.5 p`` (one burst, with room for jitter) and ends once fewer
    than ``n`` fall in ``w_end = 4 p`` (several missing bursts in a row).
    """

    p: float = DEFAULT_P
    n: int = DEFAULT_N

    def __post_init__(self) -> None:
        if not (self.p > 0 and self.p < 3600):
            raise ParamError(f"--p must be a positive number of seconds, got {self.p}")
        if not 1 <= self.n <= MAX_N:
            raise ParamError(f"--n must be in 1..{MAX_N}, got {self.n}")

    @property
    def w_start(self) -> float:
        return 1.5 * self.p

    @property
    def w_end(self) -> float:
        return 4.0 * self.p


@dataclass(frozen=True, slots=True)
class CandidateFilter:
    """Which packets are candidates: server-to-client UDP from ``port`` with an
    Ethernet frame length in ``[min_size, max_size]`` (headers included, as in the paper)."""

    port: int = DEFAULT_PORT
    min_size: int = DEFAULT_MIN_SIZE
    max_size: int = DEFAULT_MAX_SIZE

    def __post_init__(self) -> None:
        if not 0 < self.port <= 65535:
            raise ParamError(f"--port must be in 1..65535, got {self.port}")
        if self.min_size < 0 or self.max_size > MAX_FRAME:
            raise ParamError(
                f"sizes must lie in 0..{MAX_FRAME}, got --min-size {self.min_size} --max-size {self.max_size}"
            )
        if self.min_size > self.max_size:
            raise ParamError(
                f"--min-size {self.min_size} is larger than --max-size {self.max_size}"
            )


# -- the data plane's forgery guard (docs/dataplane.md, "Forged signals") --------------

#: a candidate counts only if its flow's client sent a datagram to the server port
#: within this many seconds: an RTT, the server's answer time and the path's
#: jitter (the paper sees about 1 s) fit with room to spare
DEFAULT_PAIR_WINDOW = 2.0
#: the longest --pair-window accepted: longer only widens an attacker's chance
MAX_PAIR_WINDOW = 60.0
#: signal bursts per second one client address may send, in viewers' worth:
#: a household behind one address (or a NAT) watches a few videos at once
CAP_VIEWERS = 10


def pair_credits(n: int) -> int:
    """Candidates a flow may bank ahead of its client's packets: a few bursts' worth,
    so a client that coalesces its requests into fewer datagrams still gets its
    answers through."""
    return 4 * n


def default_cap(p: float) -> float:
    """Default per-client cap on signal bursts per second: :data:`CAP_VIEWERS`
    viewers each signalling once every p."""
    return CAP_VIEWERS / p
