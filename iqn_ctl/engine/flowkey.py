"""A flow's name: the 5-tuple in the candidates' direction and its label.

The label (``server:port>client:port``, IPv6 addresses in brackets) is a
contract (docs/contracts.md): the ``flow`` field of every JSON record, the
live agent's and pcap replay's alike, so it is formatted here and only here.
"""

from __future__ import annotations

from collections.abc import Hashable
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


#: ``--key``: a flow per connection (the 5-tuple), or one per client address
KEY_MODES = ("5tuple", "client")


@dataclass(slots=True)
class FlowInfo:
    """How a flow is named to people: the flow label, its client and server."""

    label: str
    client: str
    server: str


def flow_of(key: FlowKey, key_mode: str) -> tuple[Hashable, FlowInfo]:
    """The engine's flow for a connection under ``--key`` and its names: the
    5-tuple itself, or with ``client`` the client address (all of a client's
    connections are one flow, labelled by the client). The live agent and
    capture replay both group connections here, so they group alike."""
    if key_mode == "client":
        return key.client, FlowInfo(key.client, key.client, key.server)
    if key_mode != "5tuple":
        raise ValueError(f"--key must be one of {', '.join(KEY_MODES)}, got {key_mode!r}")
    return key, FlowInfo(key.label, key.client, key.server)
