"""A flow's name: the 5-tuple in the candidates' direction and its label.

The label (``server:port>client:port``, IPv6 addresses in brackets) is a
contract (docs/contracts.md): the ``flow`` field of every JSON record, the
live agent's and pcap replay's alike, so it is formatted here and only here.
"""

from __future__ import annotations

from dataclasses import dataclass


def flow_label(server: str, sport: int, client: str, dport: int) -> str:
    """``server:sport>client:dport``; IPv6 addresses in brackets."""
    if ":" in server:
        return f"[{server}]:{sport}>[{client}]:{dport}"
    return f"{server}:{sport}>{client}:{dport}"


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A flow's 5-tuple in the server-to-client direction (the candidates' direction)."""

    server: str
    sport: int
    client: str
    dport: int
    family: int  # 4 or 6

    @property
    def label(self) -> str:
        return flow_label(self.server, self.sport, self.client, self.dport)
