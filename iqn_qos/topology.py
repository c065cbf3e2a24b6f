"""The system graph: components, directed edges, and where prefixes attach.

A topology file (YAML or JSON) looks like::

    components:                      # nodes: subnets, cities/PoPs, routers, servers
      - {id: wifi-3, kind: subnet}
      - {id: paris, kind: city}
      - {id: relay-1, kind: server}
      - {id: paris>lyon, kind: link}  # a directed network segment as a component
    edges:                           # directed adjacency between nodes
      - {from: wifi-3, to: paris}                 # plain adjacency: not a component
      - {from: paris, to: lyon, via: paris>lyon}  # the edge is the component paris>lyon
      - {from: lyon, to: paris, id: lyon>paris}   # an undeclared id is declared, kind "edge"
      - [relay-1, paris]                          # short form of plain adjacency
    attach:                          # longest prefix wins; "component" is a synonym of "node"
      - {prefix: 10.3.0.0/16, node: wifi-3}
      - {prefix: 192.0.2.0/24, node: relay-1, role: server}   # role is informative only

Only edges that name a component (``via`` or ``id``) are components: a subnet's
single uplink would otherwise always appear with the subnet and the two could
never be told apart.  GraphML (published topologies, read with networkx):
nodes with an optional ``kind`` and ``prefixes`` (comma-separated) attribute;
every GraphML edge is a component with id ``"<from>><to>"`` (undirected graphs
get both directions).

A resolved path is the shortest directed path (fewest hops; ties go to the
first-declared edges) in the media direction, from the server's node to the
client's node, listed as node, [edge component,] node, ..., node: a segment
degrades in one direction, and what stalls a viewer is the server-to-client one.
Parsing builds plain data; only :func:`load_topology` touches the file system.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import QosError

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


#: BFS trees (one per server node) kept before the cache starts over
TREE_CACHE = 1024


def edge_id(a: str, b: str) -> str:
    """Default id of the directed edge a -> b."""
    return f"{a}>{b}"


@dataclass
class Topology:
    """Components (nodes and directed edges), adjacency, and prefix attachments."""

    kinds: dict[str, str] = field(default_factory=dict)  # component id -> kind ("edge" for edges)
    adj: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)  # node -> [(next, edge id)]
    attach: list[tuple[Net, str]] = field(default_factory=list)  # longest prefix first
    _index: tuple[int, dict[int, list[tuple[int, dict[int, str]]]]] | None = field(
        default=None, repr=False, compare=False)  # built from ``attach`` on first use
    _trees: dict[str, dict[str, tuple[str, str | None] | None]] = field(
        default_factory=dict, repr=False, compare=False)  # server node -> its BFS tree

    @property
    def components(self) -> set[str]:
        return set(self.kinds)

    def add_node(self, cid: str, kind: str = "node") -> None:
        if cid in self.kinds:
            raise QosError(f"component {cid!r} declared twice")
        self.kinds[cid] = kind
        self.adj.setdefault(cid, [])

    def add_edge(self, a: str, b: str, eid: str | None = None) -> None:
        """Adjacency a -> b; ``eid`` (declared or new, kind "edge") makes the edge a component."""
        for n in (a, b):
            if n not in self.adj:
                raise QosError(f"edge {a}->{b}: unknown node {n!r}")
        if eid is not None and eid not in self.kinds:
            self.kinds[eid] = "edge"
        self.adj[a].append((b, eid))
        self._trees.clear()

    def add_prefix(self, prefix: str, node: str) -> None:
        if node not in self.adj:
            raise QosError(f"prefix {prefix}: unknown node {node!r}")
        try:
            net = ipaddress.ip_network(prefix, strict=False)
        except ValueError as e:
            raise QosError(f"bad prefix {prefix!r}: {e}") from None
        self.attach.append((net, node))
        self.attach.sort(key=lambda a: -a[0].prefixlen)

    def node_of(self, addr: str) -> str:
        """The node an address attaches to (longest matching prefix).

        One dict lookup per prefix length present (longest first), not a scan of every
        prefix: the live service places every session's two addresses, and an
        enterprise has thousands of prefixes."""
        version, val = _parse_ip(addr)
        if self._index is None or self._index[0] != len(self.attach):
            self._index = (len(self.attach), _prefix_index(self.attach))
        bits = 32 if version == 4 else 128
        for plen, table in self._index[1].get(version, ()):
            node = table.get(val >> (bits - plen))
            if node is not None:
                return node
        raise QosError(f"address {addr} attaches to no component (no prefix matches)")

    def resolve(self, client: str, server: str) -> tuple[str, ...]:
        """The component path of a session, in the media direction: from ``server`` to ``client``.

        Video (and IQN's stalls) flow from the server to the viewer, so a degraded
        segment is the server-to-client direction of a link (BFS, fewest hops)."""
        return self.path_between(self.node_of(server), self.node_of(client), client, server)

    def path_between(self, src: str, dst: str, client: str = "", server: str = "") -> tuple[str, ...]:
        """:meth:`resolve` from the two addresses' nodes (the live service places each address
        once and caches it); ``client``/``server`` only name them in the error."""
        prev = self._trees.get(src)
        if prev is None:
            # one BFS tree per server node, kept: a service resolves many clients per server
            prev = {src: None}
            queue = deque([src])
            while queue:
                u = queue.popleft()
                for v, eid in self.adj[u]:
                    if v not in prev:
                        prev[v] = (u, eid)
                        queue.append(v)
            if len(self._trees) >= TREE_CACHE:
                self._trees.clear()
            self._trees[src] = prev
        if dst not in prev:
            raise QosError(f"no directed path from server {server} ({src}) to client {client} ({dst})")
        out = [dst]
        step = prev[dst]
        while step is not None:
            u, eid = step
            out += [eid, u] if eid is not None else [u]
            step = prev[u]
        return tuple(reversed(out))


def _parse_ip(addr: str) -> tuple[int, int]:
    """(IP version, address as an int), exactly as :func:`ipaddress.ip_address` reads it.

    A dotted quad in its canonical form (what agents write) goes through the C parser
    (``inet_pton``, checked by printing it back): ``ipaddress`` costs ~30 us an address,
    most of the service's decode when clients are new; anything else takes ``ipaddress``."""
    try:
        packed = socket.inet_pton(socket.AF_INET, addr)
        if socket.inet_ntop(socket.AF_INET, packed) == addr:
            return 4, int.from_bytes(packed, "big")
    except (OSError, ValueError, TypeError):
        pass
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise QosError(f"bad address {addr!r}") from None
    return ip.version, int(ip)


def _prefix_index(attach: list[tuple[Net, str]]) -> dict[int, list[tuple[int, dict[int, str]]]]:
    """IP version -> [(prefix length, {network bits: node})], longest prefix first; the
    first-attached node wins on an exact duplicate prefix, as the scan did."""
    by: dict[int, dict[int, dict[int, str]]] = {}
    for net, node in attach:
        bits = net.max_prefixlen
        table = by.setdefault(net.version, {}).setdefault(net.prefixlen, {})
        table.setdefault(int(net.network_address) >> (bits - net.prefixlen), node)
    return {v: sorted(t.items(), key=lambda kv: -kv[0]) for v, t in by.items()}


def _parse_edge(e: Any) -> tuple[str, str, str | None]:
    if isinstance(e, list | tuple) and len(e) == 2:
        return str(e[0]), str(e[1]), None
    if isinstance(e, Mapping) and "from" in e and "to" in e:
        eid = e.get("via", e.get("id"))
        return str(e["from"]), str(e["to"]), (str(eid) if eid is not None else None)
    raise QosError(f"bad edge {e!r}: expected [from, to] or {{from, to, id}}")


def topology_from_dict(doc: Any) -> Topology:
    """Build a :class:`Topology` from a parsed YAML/JSON document (sans-I/O)."""
    if not isinstance(doc, Mapping):
        raise QosError("topology: expected a mapping with 'components', 'edges', 'attach'")
    topo = Topology()
    for c in doc.get("components") or []:
        if isinstance(c, str):
            topo.add_node(c)
        elif isinstance(c, Mapping) and "id" in c:
            topo.add_node(str(c["id"]), str(c.get("kind", "node")))
        else:
            raise QosError(f"topology: bad component {c!r}: expected an id or {{id, kind}}")
    for e in doc.get("edges") or []:
        topo.add_edge(*_parse_edge(e))
    for a in doc.get("attach") or []:
        node = a.get("node", a.get("component")) if isinstance(a, Mapping) else None
        if not isinstance(a, Mapping) or "prefix" not in a or node is None:
            raise QosError(f"topology: bad attachment {a!r}: expected {{prefix, node}}")
        topo.add_prefix(str(a["prefix"]), str(node))
    return topo


def topology_to_dict(topo: Topology) -> dict[str, Any]:
    """The inverse of :func:`topology_from_dict` (for generators writing topology files)."""
    nodes = [{"id": c, "kind": k} for c, k in topo.kinds.items() if k != "edge"]
    edges = [
        {"from": a, "to": b} | ({"id": eid} if eid else {}) for a, outs in topo.adj.items() for b, eid in outs
    ]
    attach = [{"prefix": str(net), "node": node} for net, node in topo.attach]
    return {"components": nodes, "edges": edges, "attach": attach}


def _from_graphml(path: Path) -> Topology:
    import networkx as nx

    try:
        g = nx.read_graphml(path)
    except Exception as e:  # networkx raises a zoo of parser errors
        raise QosError(f"{path}: not a readable GraphML file ({e})") from None
    topo = Topology()
    for node, data in g.nodes(data=True):
        topo.add_node(str(node), str(data.get("kind", "node")))
    for a, b in g.edges():
        topo.add_edge(str(a), str(b), edge_id(str(a), str(b)))
        if not g.is_directed():
            topo.add_edge(str(b), str(a), edge_id(str(b), str(a)))
    for node, data in g.nodes(data=True):
        for pfx in str(data.get("prefixes", "")).split(","):
            if pfx.strip():
                topo.add_prefix(pfx.strip(), str(node))
    return topo


def load_topology(path: str | Path) -> Topology:
    """Read a topology file: ``.graphml`` via networkx, ``.json`` as JSON, anything else as YAML."""
    p = Path(path)
    try:
        text = p.read_text() if p.suffix.lower() != ".graphml" else ""
    except OSError as e:
        raise QosError(f"{p}: {e.strerror}") from None
    if p.suffix.lower() == ".graphml":
        return _from_graphml(p)
    try:
        if p.suffix.lower() == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except (ValueError, Exception) as e:  # json.JSONDecodeError / yaml.YAMLError
        raise QosError(f"{p}: not a readable topology file ({e})") from None
    try:
        return topology_from_dict(doc)
    except QosError as e:
        raise QosError(f"{p}: {e}") from None
