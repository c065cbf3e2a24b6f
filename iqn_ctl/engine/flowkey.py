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


@dataclass(frozen=True)
class FlowKey:
    """A flow's 5-tuple in the server-to-client direction (the candidates' direction).

    Its hash is worked out once, when it is made: a flow's key is looked up in a
    dozen dicts (names, raw keys, numbers, the engine's slots, the agent's open
    stalls), and the generated ``__hash__`` rebuilt and hashed the field tuple each
    time (~14 times per new flow: 2 µs of an outage onset's ~10). The value is the
    generated one's, ``hash`` of the field tuple, and it is no dataclass field (not in
    ``fields``, ``astuple``, repr or equality): it lives in a slot of its own, so the
    slots are declared here rather than by ``slots=True``."""

    __slots__ = ("server", "sport", "client", "dport", "family", "_hash")
    server: str
    sport: int
    client: str
    dport: int
    family: int  # 4 or 6

    def __post_init__(self) -> None:
        fields = (self.server, self.sport, self.client, self.dport, self.family)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined,no-any-return]  # the slot __post_init__ set

    def __reduce__(self) -> tuple[type[FlowKey], tuple[str, int, str, int, int]]:
        # made again where it is unpickled: a str's hash differs between processes
        return type(self), (self.server, self.sport, self.client, self.dport, self.family)

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
    return key, info_of(key)


def info_of(key: FlowKey) -> FlowInfo:
    """The names of a flow by 5-tuple (``flow_of(key, "5tuple")[1]``)."""
    return FlowInfo(key.label, key.client, key.server)
