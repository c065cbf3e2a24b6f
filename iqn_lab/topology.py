"""Names and addresses of one lab instance.

Everything a lab creates carries its prefix, so two labs (and the tests) can
coexist and ``down`` can find every piece even after a crash. Addresses come
from 198.18.0.0/15 (RFC 2544, benchmarking) and exist only inside the lab's
namespaces, so the same addresses can be reused by every instance.

::

    client ns                    router ns                          ott ns
    PFX-c0 198.18.0.2/30 ──veth── PFX-r0 198.18.0.1/30
     └ PFX-tc 198.18.8.2 ══OpenVPN (UDP 1194)══ PFX-tr 198.18.8.1
                                 PFX-r1 198.19.0.1/24 ──veth── PFX-o0 198.19.0.2 www
                                 (NAT, ISP agent here)               198.19.0.3 media
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from iqn_ctl.errors import IqnError

ROLES = ("client", "router", "ott")
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,11}$")

UNDERLAY_CLIENT = "198.18.0.2"
UNDERLAY_ROUTER = "198.18.0.1"
UNDERLAY_PLEN = 30
TUN_NET = "198.18.8.0"
TUN_ROUTER = "198.18.8.1"
OTT_NET_ROUTER = "198.19.0.1"
OTT_WWW = "198.19.0.2"
OTT_MEDIA = "198.19.0.3"
OTT_PLEN = 24
OPENVPN_PORT = 1194
WWW_HOST = "www.iqn.test"
MEDIA_HOST = "media.iqn.test"


class PrefixError(IqnError, ValueError):
    """A lab prefix that cannot name namespaces and interfaces."""


@dataclass(frozen=True)
class Names:
    prefix: str

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise PrefixError(
                f"bad lab prefix {self.prefix!r}: 1-12 characters, lowercase letters and digits, "
                "starting with a letter (interface names are limited to 15 characters)"
            )

    def ns(self, role: str) -> str:
        if role not in ROLES:
            raise PrefixError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        return f"{self.prefix}-{role}"

    @property
    def client_if(self) -> str:
        """Client's underlay veth (its 'home network')."""
        return f"{self.prefix}-c0"

    @property
    def router_client_if(self) -> str:
        """Router's client-facing veth; the bottleneck shapes its egress."""
        return f"{self.prefix}-r0"

    @property
    def router_ott_if(self) -> str:
        """Router's OTT-facing veth, where the ISP agent attaches: server-to-client
        packets arrive here outside the tunnel."""
        return f"{self.prefix}-r1"

    @property
    def ott_if(self) -> str:
        return f"{self.prefix}-o0"

    @property
    def client_tun(self) -> str:
        return f"{self.prefix}-tc"

    @property
    def router_tun(self) -> str:
        return f"{self.prefix}-tr"

    def all_ifnames(self) -> list[str]:
        return [self.client_if, self.router_client_if, self.router_ott_if, self.ott_if]
