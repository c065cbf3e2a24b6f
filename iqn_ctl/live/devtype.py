"""What an interface's frames start with, from its device type (ARPHRD_*).

Ethernet devices hand the data plane an Ethernet header first; layer-3
devices (tun, WireGuard, PPP, IP-in-IP and GRE tunnels) hand it the IP header,
with no link header at all. The loader compiles the classifier with the
matching first parser (``IQN_L3`` in iqn_xdp.c); everything after the link
header is the same code. The type comes from netlink (``ifi_type``), not
/sys/class/net, so it is right inside a network namespace whose sysfs was not
remounted.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from iqn_ctl.errors import IqnError

#: ARPHRD_* (linux/if_arp.h) whose frames start with a 14-byte Ethernet header
#: (loopback's is all zeros but present)
ETHERNET_TYPES = {1: "ether", 772: "loopback"}
#: ARPHRD_* whose frames start at the IP header (the version nibble says which)
L3_TYPES = {
    65534: "none",  # tun (IFF_TUN), WireGuard
    512: "ppp",
    519: "rawip",
    768: "ipip",
    769: "ip6tnl",
    776: "sit",
    778: "ipgre",
    823: "ip6gre",
}


class DeviceTypeError(IqnError):
    """The interface is of a type the classifier cannot parse, or is gone."""


@dataclass(frozen=True)
class DeviceType:
    """An interface's ARPHRD type and what the classifier makes of it."""

    arphrd: int
    name: str
    #: frames start at the IP header (no link header)
    l3: bool

    @property
    def link(self) -> str:
        """"ethernet" or "l3", as status shows it."""
        return "l3" if self.l3 else "ethernet"


def classify_type(arphrd: int) -> DeviceType:
    """The :class:`DeviceType` of an ARPHRD number; DeviceTypeError for one
    the classifier cannot parse (its first bytes are neither Ethernet nor IP)."""
    if arphrd in ETHERNET_TYPES:
        return DeviceType(arphrd, ETHERNET_TYPES[arphrd], False)
    if arphrd in L3_TYPES:
        return DeviceType(arphrd, L3_TYPES[arphrd], True)
    known = sorted({**ETHERNET_TYPES, **L3_TYPES}.items())
    raise DeviceTypeError(
        f"device type {arphrd} is not supported (frames neither Ethernet nor IP); supported: "
        + ", ".join(f"{n} ({v})" for n, v in known)
    )


def device_type(iface: str) -> DeviceType:
    """The device type of ``iface`` in the current network namespace."""
    try:
        idx = socket.if_nametoindex(iface)
    except (OSError, ValueError):
        raise DeviceTypeError(f"no such network interface: {iface!r}") from None
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            msg = ipr.get_links(idx)[0]
        except Exception as e:  # NetlinkError: gone between the two calls
            raise DeviceTypeError(f"cannot read the device type of {iface}: {e}") from None
    return classify_type(int(msg["ifi_type"]))
