"""Names, addresses and the QoS topology of one localisation lab (sans-I/O).

::

    P-srv1 (OTT 1: www .2, media .3)   P-srv2 (OTT 2)
       P-s1 198.19.1.x/24                 P-s2 198.19.2.x/24
          │ uplink ("--fault server")        │
          └────────── P-core ────────────────┘──── P-ops 198.18.200.2 (JetStream, QoS service)
               core links │             │
             P-u1 198.18.101.2     P-u2 198.18.102.2      <- ISP agents (XDP ingress:
               P-rtr1                P-rtr2                  server-to-client packets)
            P-a1 │   P-b1 │          P-c1 │
   ("--fault access")    │               │
            P-suba      P-subb        P-subc     clients 198.18.{1,2,3}.10, .11, ...

Every name carries the lab's prefix P (interface names are at most 15
characters, so P has at most 12). The QoS topology file names the
components the service can blame: ``srv-1``, ``srv-2`` (a server with its
uplink), ``core``, ``rtr-1``, ``rtr-2`` (access routers) and ``sub-a``,
``sub-b``, ``sub-c`` (a subnet with its access link). A single-child chain
cannot be told apart by any measurement: ``rtr-2`` serves only ``sub-c``, so
the two always carry the same blame, and ``core`` is on every path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from iqn_lab.errors import LabError
from iqn_lab.topology import MEDIA_HOST, WWW_HOST

_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,11}$")

OPS_ADDR = "198.18.200.2"
OPS_CORE = "198.18.200.1"
FAULTS = ("access", "server")


@dataclass(frozen=True)
class Server:
    cid: str  # component id
    role: str  # namespace role
    ifname: str  # its uplink (shaped by --fault server)
    core_if: str
    net: str  # /24
    www: str
    media: str
    gw: str


@dataclass(frozen=True)
class Router:
    cid: str
    role: str
    uplink: str  # the agent's interface
    core_if: str
    addr: str
    core_addr: str


@dataclass(frozen=True)
class Subnet:
    cid: str
    role: str
    router: str  # router role
    router_if: str  # the access link, router side (shaped by --fault access)
    client_if: str
    net: str
    gw: str

    def client(self, i: int) -> str:
        """Address of the i-th client (0-based) of this subnet."""
        return f"{self.net.split('/')[0].rsplit('.', 1)[0]}.{10 + i}"


class Plan:
    """Every name and address of the lab with prefix ``prefix``."""

    def __init__(self, prefix: str) -> None:
        if not _PREFIX.match(prefix):
            raise LabError(f"bad lab prefix {prefix!r}: 1-12 characters, lowercase letters and digits, "
                           "starting with a letter (interface names are limited to 15 characters)")
        self.prefix = p = prefix
        self.servers = [
            Server("srv-1", "srv1", f"{p}-s1", f"{p}-k1", "198.19.1.0/24", "198.19.1.2", "198.19.1.3",
                   "198.19.1.1"),
            Server("srv-2", "srv2", f"{p}-s2", f"{p}-k2", "198.19.2.0/24", "198.19.2.2", "198.19.2.3",
                   "198.19.2.1"),
        ]
        self.routers = [
            Router("rtr-1", "rtr1", f"{p}-u1", f"{p}-k3", "198.18.101.2", "198.18.101.1"),
            Router("rtr-2", "rtr2", f"{p}-u2", f"{p}-k4", "198.18.102.2", "198.18.102.1"),
        ]
        self.subnets = [
            Subnet("sub-a", "suba", "rtr1", f"{p}-a1", f"{p}-ca", "198.18.1.0/24", "198.18.1.1"),
            Subnet("sub-b", "subb", "rtr1", f"{p}-b1", f"{p}-cb", "198.18.2.0/24", "198.18.2.1"),
            Subnet("sub-c", "subc", "rtr2", f"{p}-c1", f"{p}-cc", "198.18.3.0/24", "198.18.3.1"),
        ]
        self.ops_if, self.ops_core_if = f"{p}-op", f"{p}-k5"

    @property
    def roles(self) -> list[str]:
        return (["core", "ops"] + [s.role for s in self.servers] + [r.role for r in self.routers]
                + [s.role for s in self.subnets])

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def all_ifnames(self) -> list[str]:
        out = [self.ops_if, self.ops_core_if]
        for s in self.servers:
            out += [s.ifname, s.core_if]
        for r in self.routers:
            out += [r.uplink, r.core_if]
        for sn in self.subnets:
            out += [sn.router_if, sn.client_if]
        return out

    def router(self, role: str) -> Router:
        return next(r for r in self.routers if r.role == role)

    def fault_target(self, fault: str) -> tuple[str, str, str]:
        """(component id, namespace role, interface) the fault shapes: the first subnet's
        access link (router side, toward the clients) or the first server's uplink."""
        if fault == "access":
            sn = self.subnets[0]
            return sn.cid, sn.router, sn.router_if
        if fault == "server":
            sv = self.servers[0]
            return sv.cid, sv.role, sv.ifname
        raise LabError(f"--fault must be one of {', '.join(FAULTS)}, got {fault!r}")

    def players(self, per_subnet: int) -> dict[str, list[dict[str, Any]]]:
        """Player specs per subnet role: client i of every subnet watches server i mod 2."""
        out: dict[str, list[dict[str, Any]]] = {}
        for sn in self.subnets:
            specs = []
            for i in range(per_subnet):
                sv = self.servers[i % len(self.servers)]
                specs.append({"name": f"{sn.cid}-{i:02d}", "www": sv.www, "media": sv.media,
                              "source": sn.client(i), "www_host": WWW_HOST, "media_host": MEDIA_HOST})
            out[sn.role] = specs
        return out

    def component_of(self, client: str, server: str) -> list[str]:
        """The media path (server to client) of a player, as component ids."""
        sv = next(s for s in self.servers if server in (s.www, s.media))
        sn = next(s for s in self.subnets if client.rsplit(".", 1)[0] == s.gw.rsplit(".", 1)[0])
        rt = next(r for r in self.routers if r.role == sn.router)
        return [sv.cid, "core", rt.cid, sn.cid]

    def qos_topology(self) -> dict[str, Any]:
        """The topology file for ``iqn-qos --topology``: components, directed edges (the media
        direction: server to client), and the prefixes that place addresses."""
        comps = [{"id": s.cid, "kind": "server"} for s in self.servers]
        comps.append({"id": "core", "kind": "router"})
        comps += [{"id": r.cid, "kind": "router"} for r in self.routers]
        comps += [{"id": s.cid, "kind": "subnet"} for s in self.subnets]
        edges: list[Any] = [[s.cid, "core"] for s in self.servers]
        edges += [["core", r.cid] for r in self.routers]
        edges += [[self.router(s.router).cid, s.cid] for s in self.subnets]
        attach = [{"prefix": s.net, "node": s.cid, "role": "server"} for s in self.servers]
        attach += [{"prefix": s.net, "node": s.cid} for s in self.subnets]
        return {"components": comps, "edges": edges, "attach": attach}
