"""Synthetic media lines with known faults, for tests and benchmarks (sans-I/O).

The topology is shaped like the enterprise of the QoSaaS paper (Wang et al.,
Section 6): cities (PoPs) on a plane, every ordered pair of cities joined by a
site-to-site link that is a component of its own in each direction (loss is
asymmetric), wired and wireless client subnets in the cities, and media and
relay servers in a few hub cities.  About 4,000 components by default.

A session (a media line) flows from a server to a client subnet over

    [server, server's city, link server-city>client-city, client's city, subnet]

(the link and the second city are left out when both ends share a city).  Per
slot only a small part of the enterprise is busy: a few popular cities, about
one subnet per 100 lines and one server per 350 lines, so ~5,000 lines touch
~150 components, as in the paper.  Clients mostly use servers of their nearest
hub.  A unit is one second of playback; session lengths are lognormal (median
3 minutes), capped at the slot; the count of good units of a line is binomial
with the product over its path of (1 - p_i) (the model the MLE assumes; real
stalls are burstier).  Every component has a small background rate (< 0.05 %),
the injected faults are far above it.

Scenarios (the paper's three cases, a control, and a random one):

* ``healthy``: background only;
* ``wireless-ap``: one busy wireless subnet (an AP gateway) losing 4.6 % on
  average over a day, up to 20 % at the 14:00 busy hour, 1.6 % at night;
* ``link-direction``: one direction of the longest hub-to-hub link degrading
  from 3 % to 10 % over the run; the reverse direction carries lines and is
  healthy;
* ``relay-bug``: two relay servers in different hubs with the same bug (5 %);
* ``random-k``: k components of random kinds, each at a rate in [2 %, 12 %].

Components on which a fault is injected are kept busy in every slot (else the
fault would be invisible), and a forced subnet (server) brings a second subnet
(server) of its city along, so a city is not confounded with its only busy
subnet or server.  Everything is
drawn from one seeded numpy Generator: the same arguments give the same lines.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import QosError
from .lines import MediaLine

SCENARIOS = ("healthy", "wireless-ap", "link-direction", "relay-bug", "random-k")
T0 = 1_700_006_400  # 2023-11-15 00:00 UTC: a multiple of every usual slot length
KINDS = ("city", "link", "media-server", "relay-server", "wired-subnet", "wireless-subnet")
LINES_PER_SUBNET = 100
LINES_PER_SERVER = 350
SUBNETS_PER_CITY = 4  # busy subnets per busy city
OTHER_HUB = 0.1  # affinity of a client for a server outside its home hub
MEDIAN_SESSION_S = 180.0
SESSION_SIGMA = 0.9
MIN_SESSION_S = 5


@dataclass(frozen=True, slots=True)
class World:
    """The synthetic enterprise, as arrays over component indices.

    Indices: cities ``0..C-1``, then the C(C-1) directed links, then servers,
    then subnets.  ``link(a, b)`` gives a link's index.
    """

    ids: tuple[str, ...]
    kinds: tuple[str, ...]
    n_cities: int
    coords: np.ndarray  # (C, 2) km
    hubs: np.ndarray  # city indices hosting servers
    home_hub: np.ndarray  # per city: nearest hub
    w_city: np.ndarray  # popularity of a city's clients
    server_city: np.ndarray
    server_relay: np.ndarray  # bool
    w_server: np.ndarray
    subnet_city: np.ndarray
    subnet_wireless: np.ndarray  # bool
    w_subnet: np.ndarray
    background: np.ndarray  # p per component, all < 0.0005

    @property
    def first_server(self) -> int:
        return self.n_cities * self.n_cities

    @property
    def first_subnet(self) -> int:
        return self.first_server + self.server_city.size

    def link(self, a: int, b: int) -> int:
        """Component index of the directed link from city a to city b (a != b)."""
        c = self.n_cities
        return c + a * (c - 1) + (b if b < a else b - 1)

    def link_ends(self, ix: int) -> tuple[int, int]:
        c = self.n_cities
        a, r = divmod(ix - c, c - 1)
        return a, (r if r < a else r + 1)

    def subnet_ix(self, i: int) -> int:
        return self.first_subnet + i

    def server_ix(self, i: int) -> int:
        return self.first_server + i

    def prefix(self, subnet: int) -> str:
        """The client /24 of subnet number ``subnet`` (10.0.0.0/8, one /24 each)."""
        return f"10.{subnet // 256}.{subnet % 256}.0/24"

    def server_addr(self, server: int) -> str:
        """The address of server number ``server`` (172.16.0.0/12, 250 per /24)."""
        return f"172.{16 + server // 62500}.{server // 250 % 250}.{server % 250 + 1}"


def _sizes(components: int) -> tuple[int, int, int]:
    """Cities, servers, subnets for a total of about ``components``.

    Links (C(C-1)) take about 55 %, servers 5 %, subnets the rest, as in an
    enterprise whose WAN is meshed between a few dozen sites.
    """
    if components < 20:
        raise QosError(f"--components must be at least 20, got {components}")
    c = max(3, int((1 + math.sqrt(1 + 4 * 0.55 * components)) / 2))
    servers = max(4, round(0.05 * components))
    subnets = components - c * c - servers  # c cities + c(c-1) links = c*c
    if subnets < 2 * c:
        c = max(3, int(math.sqrt(components / 2)))
        subnets = components - c * c - servers
    return c, servers, max(2 * c, subnets)


def make_world(components: int, rng: np.random.Generator) -> World:
    """A random enterprise of about ``components`` components."""
    c, n_srv, n_sub = _sizes(components)
    coords = rng.uniform(0, 4000, size=(c, 2))
    n_hubs = max(2, round(c / 8))
    w_city = 1.0 / np.arange(1, c + 1) ** 0.8
    rng.shuffle(w_city)
    hubs = np.sort(rng.choice(c, size=n_hubs, replace=False, p=w_city / w_city.sum()))
    d = np.linalg.norm(coords[:, None, :] - coords[None, hubs, :], axis=2)
    home_hub = hubs[np.argmin(d, axis=1)]
    server_city = hubs[rng.integers(0, n_hubs, size=n_srv)]
    server_city[:n_hubs] = hubs  # every hub hosts at least one server
    server_relay = rng.random(n_srv) < 0.25
    server_relay[:2] = True  # at least two relays, for relay-bug
    w_server = rng.lognormal(0, 1.0, size=n_srv)
    subnet_city = rng.integers(0, c, size=n_sub)
    subnet_city[:c] = np.arange(c)  # every city has a subnet ...
    subnet_city[c : 2 * c] = np.arange(c)  # ... two, in fact
    subnet_wireless = rng.random(n_sub) < 0.4
    subnet_wireless[:c] = True  # every city has a wireless subnet
    subnet_wireless[c : 2 * c] = False
    w_subnet = rng.lognormal(0, 1.0, size=n_sub)

    ids = [f"c{i:02d}" for i in range(c)]
    kinds = ["city"] * c
    for a in range(c):
        for b in range(c):
            if a != b:
                ids.append(f"c{a:02d}>c{b:02d}")
                kinds.append("link")
    per_city: dict[tuple[int, str], int] = {}
    for i in range(n_srv):
        tag = "relay" if server_relay[i] else "media"
        k = per_city[(int(server_city[i]), tag)] = per_city.get((int(server_city[i]), tag), 0) + 1
        ids.append(f"c{server_city[i]:02d}-{tag}{k}")
        kinds.append(f"{tag}-server")
    for i in range(n_sub):
        tag = "wl" if subnet_wireless[i] else "wd"
        k = per_city[(int(subnet_city[i]), tag)] = per_city.get((int(subnet_city[i]), tag), 0) + 1
        ids.append(f"c{subnet_city[i]:02d}-{tag}{k}")
        kinds.append("wireless-subnet" if subnet_wireless[i] else "wired-subnet")
    background = 10 ** rng.uniform(-5.0, -3.3, size=len(ids))
    return World(
        ids=tuple(ids), kinds=tuple(kinds), n_cities=c, coords=coords, hubs=hubs, home_hub=home_hub,
        w_city=w_city, server_city=server_city, server_relay=server_relay, w_server=w_server,
        subnet_city=subnet_city, subnet_wireless=subnet_wireless, w_subnet=w_subnet,
        background=background,
    )


def topology_json(world: World) -> dict[str, Any]:
    """The world as a topology document: components, directed edges, prefix attachments.

    A site-to-site link component is the directed edge between its two cities
    (``"via"`` names it); subnets and servers hang off their city.
    """
    c = world.n_cities
    comps = [{"id": i, "kind": k} for i, k in zip(world.ids, world.kinds, strict=True)]
    edges: list[dict[str, str]] = []
    for a in range(c):
        for b in range(c):
            if a != b:
                edges.append({"from": world.ids[a], "to": world.ids[b], "via": world.ids[world.link(a, b)]})
    for i, city in enumerate(world.server_city.tolist()):
        sid = world.ids[world.server_ix(i)]
        edges += [{"from": sid, "to": world.ids[city]}, {"from": world.ids[city], "to": sid}]
    for i, city in enumerate(world.subnet_city.tolist()):
        nid = world.ids[world.subnet_ix(i)]
        edges += [{"from": nid, "to": world.ids[city]}, {"from": world.ids[city], "to": nid}]
    attach = [{"prefix": world.prefix(i), "component": world.ids[world.subnet_ix(i)], "role": "client"}
              for i in range(world.subnet_city.size)]
    attach += [{"prefix": world.server_addr(i) + "/32", "component": world.ids[world.server_ix(i)],
                "role": "server"} for i in range(world.server_city.size)]
    return {"components": comps, "edges": edges, "attach": attach}


@dataclass(frozen=True, slots=True)
class Fault:
    """A component's injected bad-unit rate, one value per slot."""

    component: int
    p: np.ndarray


@dataclass(slots=True)
class _Force:
    """What must be busy in every slot for the faults to be visible."""

    cities: set[int] = field(default_factory=set)
    subnets: set[int] = field(default_factory=set)
    servers: set[int] = field(default_factory=set)
    pairs: set[tuple[int, int]] = field(default_factory=set)  # (server city, client city) boosted


def wireless_ap_profile(hours: np.ndarray) -> np.ndarray:
    """The paper's AP gateway: mean 4.6 % over a day, 20 % at the 14:00 peak.

    p(h) = a + b * ((1 + cos(2 pi (h - 14) / 24)) / 2)^12; the bump's daily mean
    is C(24, 12) / 4^12, so a + b = 0.20 and a + b * mean = 0.046 fix a, b.
    """
    mean_bump = math.comb(24, 12) / 4**12
    b = (0.20 - 0.046) / (1 - mean_bump)
    a = 0.20 - b
    return a + b * ((1 + np.cos(2 * np.pi * (hours - 14.0) / 24.0)) / 2) ** 12


def _subnets_of(world: World, city: int) -> np.ndarray:
    return np.flatnonzero(world.subnet_city == city)


def _force_subnet(world: World, force: _Force, s: int) -> None:
    """Busy subnet s, its city, and a second subnet of that city (so they are separable)."""
    city = int(world.subnet_city[s])
    force.subnets.add(s)
    force.cities.add(city)
    others = [int(o) for o in _subnets_of(world, city) if o != s]
    if others:
        force.subnets.add(max(others, key=lambda o: world.w_subnet[o]))


def _force_server(world: World, force: _Force, r: int) -> None:
    """Busy server r and a second server of its city (else city and server always go together)."""
    force.servers.add(r)
    others = [int(o) for o in np.flatnonzero(world.server_city == world.server_city[r]) if o != r]
    if others:
        force.servers.add(max(others, key=lambda o: world.w_server[o]))


def _force_city(world: World, force: _Force, city: int) -> None:
    subs = sorted(_subnets_of(world, city).tolist(), key=lambda o: -world.w_subnet[o])
    for s in subs[:2]:
        force.subnets.add(int(s))
    force.cities.add(city)


def _force_link(world: World, force: _Force, a: int, b: int) -> None:
    """Lines from servers in city a to clients in city b (a must host servers)."""
    srv = np.flatnonzero(world.server_city == a)
    _force_server(world, force, int(srv[np.argmax(world.w_server[srv])]))
    _force_city(world, force, b)
    force.pairs.add((a, b))


def make_faults(
    scenario: str, world: World, rng: np.random.Generator, hours: np.ndarray, k: int
) -> tuple[list[Fault], _Force]:
    """The injected faults of ``scenario`` (p per slot) and what they need kept busy."""
    force = _Force()
    slots = hours.size
    popular = np.argsort(-world.w_city)
    if scenario == "healthy":
        return [], force
    if scenario == "wireless-ap":
        city = int(popular[0])
        wl = [int(s) for s in _subnets_of(world, city) if world.subnet_wireless[s]]
        s = max(wl, key=lambda o: world.w_subnet[o])
        _force_subnet(world, force, s)
        return [Fault(world.subnet_ix(s), wireless_ap_profile(hours))], force
    if scenario == "link-direction":
        hubs = world.hubs
        d = np.linalg.norm(world.coords[hubs][:, None] - world.coords[hubs][None], axis=2)
        i, j = np.unravel_index(np.argmax(d), d.shape)
        a, b = int(hubs[i]), int(hubs[j])
        _force_link(world, force, a, b)
        _force_link(world, force, b, a)  # the healthy reverse direction is busy too
        ramp = np.linspace(0.03, 0.10, slots) if slots > 1 else np.array([0.06])
        return [Fault(world.link(a, b), ramp)], force
    if scenario == "relay-bug":
        relays = np.flatnonzero(world.server_relay)
        by_hub: dict[int, int] = {}
        for r in sorted(relays.tolist(), key=lambda o: -world.w_server[o]):
            by_hub.setdefault(int(world.server_city[r]), r)
        pick = list(by_hub.values())[:2]
        if len(pick) < 2:
            pick = sorted(relays.tolist(), key=lambda o: -world.w_server[o])[:2]
        faults = []
        for r in pick:
            _force_server(world, force, r)
            faults.append(Fault(world.server_ix(r), np.full(slots, 0.05)))
        return faults, force
    if scenario == "random-k":
        if k < 1:
            raise QosError(f"-k must be at least 1 for random-k, got {k}")
        chosen: set[int] = set()
        faults = []
        kinds = ("subnet", "city", "link", "server")
        for _ in range(100 * k):
            if len(faults) == k:
                break
            kind = kinds[int(rng.integers(0, 4))]
            top = popular[: max(3, world.n_cities // 3)]
            if kind == "subnet":
                city = int(rng.choice(top))
                s = int(rng.choice(_subnets_of(world, city)))
                ix = world.subnet_ix(s)
                if ix not in chosen:
                    _force_subnet(world, force, s)
            elif kind == "city":
                city = int(rng.choice(top))
                ix = city
                if ix not in chosen:
                    _force_city(world, force, city)
            elif kind == "link":
                a, b = int(rng.choice(world.hubs)), int(rng.choice(top))
                if a == b:
                    continue
                ix = world.link(a, b)
                if ix not in chosen:
                    _force_link(world, force, a, b)
            else:
                r = int(rng.integers(0, world.server_city.size))
                ix = world.server_ix(r)
                if ix not in chosen:
                    _force_server(world, force, r)
            if ix in chosen:
                continue
            chosen.add(ix)
            faults.append(Fault(ix, np.full(slots, float(rng.uniform(0.02, 0.12)))))
        return faults, force
    raise QosError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")


@dataclass(frozen=True, slots=True)
class Slot:
    """One slot of synthetic lines and its ground truth.

    ``truth`` holds the true p of every component on at least one line of the
    slot; ``injected`` the components whose p was injected (a fault).
    """

    start: float
    lines: list[MediaLine]
    truth: dict[str, float]
    injected: frozenset[str]


def _slot_lines(
    world: World, force: _Force, p: np.ndarray, start: float, slot_s: int, n_lines: int,
    rng: np.random.Generator, addresses: bool,
) -> Slot:
    c = world.n_cities
    n_sub_act = min(world.subnet_city.size, max(2, round(n_lines / LINES_PER_SUBNET)))
    n_city_act = min(c, max(1, round(n_sub_act / SUBNETS_PER_CITY)))
    n_srv_act = min(world.server_city.size, max(2, round(n_lines / LINES_PER_SERVER)))

    cities = set(rng.choice(c, size=n_city_act, replace=False, p=world.w_city / world.w_city.sum()).tolist())
    cities |= force.cities
    cand = np.flatnonzero(np.isin(world.subnet_city, sorted(cities)))
    wc = world.w_subnet[cand]
    pick = rng.choice(cand, size=min(cand.size, n_sub_act), replace=False, p=wc / wc.sum())
    subs = np.array(sorted(set(pick.tolist()) | force.subnets))
    srv_pick = rng.choice(world.server_city.size, size=n_srv_act, replace=False,
                          p=world.w_server / world.w_server.sum())
    srvs = np.array(sorted(set(srv_pick.tolist()) | force.servers))

    # a forced (faulty) component is a busy one
    w_sub = world.w_subnet[subs].copy()
    forced = np.isin(subs, sorted(force.subnets))
    w_sub[forced] = np.maximum(w_sub[forced], 2.0 * float(w_sub.mean()))
    w_srv = world.w_server[srvs].copy()
    forced = np.isin(srvs, sorted(force.servers))
    w_srv[forced] = np.maximum(w_srv[forced], float(w_srv.mean()))

    sub_city = world.subnet_city[subs]
    srv_city = world.server_city[srvs]
    aff = np.where(world.home_hub[sub_city][:, None] == srv_city[None, :], 1.0, OTHER_HUB)
    for a, b in force.pairs:
        aff[np.ix_(sub_city == b, srv_city == a)] = 2.0
    cum = np.cumsum(aff * w_srv[None, :], axis=1)

    li_sub = rng.choice(subs.size, size=n_lines, p=w_sub / w_sub.sum())
    rows = cum[li_sub]
    u = rng.random(n_lines) * rows[:, -1]
    li_srv = np.minimum((rows <= u[:, None]).sum(axis=1), srvs.size - 1)

    cc = sub_city[li_sub]
    cs = srv_city[li_srv]
    none = len(world.ids)  # a padding index with p = 0
    same = cc == cs
    link = np.where(same, none, c + cs * (c - 1) + np.where(cc < cs, cc, cc - 1))
    path = np.stack([world.first_server + srvs[li_srv], cs, link, np.where(same, none, cc),
                     world.first_subnet + subs[li_sub]], axis=1)
    pp = np.append(p, 0.0)
    q = np.prod(1.0 - pp[path], axis=1)
    n = np.clip(np.rint(rng.lognormal(math.log(MEDIAN_SESSION_S), SESSION_SIGMA, n_lines)),
                min(MIN_SESSION_S, slot_s), slot_s).astype(np.int64)
    m = rng.binomial(n, q)
    t = np.round(start + rng.uniform(0, slot_s, n_lines), 3)

    ids = (*world.ids, "")
    lines = []
    for i in range(n_lines):
        row = path[i]
        pth = tuple(ids[j] for j in row.tolist() if j != none)
        if addresses:
            s_i, n_i = int(srvs[li_srv[i]]), int(subs[li_sub[i]])
            client = f"10.{n_i // 256}.{n_i % 256}.{1 + i % 250}"
            lines.append(MediaLine(float(t[i]), pth, int(n[i]), int(m[i]), client=client,
                                   server=world.server_addr(s_i), kind="video"))
        else:
            lines.append(MediaLine(float(t[i]), pth, int(n[i]), int(m[i])))
    on = np.unique(path[path != none])
    truth = {world.ids[j]: float(p[j]) for j in on.tolist()}
    return Slot(start, lines, truth, frozenset())


def iter_slots(
    scenario: str = "healthy", *, slots: int = 1, slot_s: int = 900, lines_per_slot: int = 5000,
    components: int = 4000, seed: int = 0, k: int = 3, t0: float = T0, addresses: bool = False,
) -> tuple[World, list[Fault], Iterator[Slot]]:
    """The enterprise, its faults, and a lazy iterator over the slots' lines.

    Slot i starts at ``t0 + i * slot_s``; the hour of day (for the AP's busy
    hour) is taken from the middle of the slot, t0 being midnight.
    """
    if scenario not in SCENARIOS:
        raise QosError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    for name, v in (("--slots", slots), ("--slot", slot_s), ("--lines-per-slot", lines_per_slot)):
        if v < 1:
            raise QosError(f"{name} must be at least 1, got {v}")
    rng = np.random.default_rng(seed)
    world = make_world(components, rng)
    hours = ((np.arange(slots) + 0.5) * slot_s / 3600.0) % 24.0
    faults, force = make_faults(scenario, world, rng, hours, k)

    def gen() -> Iterator[Slot]:
        for i in range(slots):
            p = world.background.copy()
            for f in faults:
                p[f.component] = f.p[i]
            s = _slot_lines(world, force, p, t0 + i * slot_s, slot_s, lines_per_slot, rng, addresses)
            inj = frozenset(world.ids[f.component] for f in faults if world.ids[f.component] in s.truth)
            yield Slot(s.start, s.lines, s.truth, inj)

    return world, faults, gen()


def generate(scenario: str = "healthy", **kw: Any) -> tuple[World, list[Fault], list[Slot]]:
    """:func:`iter_slots`, all slots in a list."""
    world, faults, it = iter_slots(scenario, **kw)
    return world, faults, list(it)


def truth_rows(slot: Slot) -> Iterator[dict[str, Any]]:
    """Ground-truth records of a slot: every component on a line, its true p, injected or not."""
    for comp in sorted(slot.truth):
        yield {"slot": slot.start, "component": comp, "p": slot.truth[comp],
               "injected": comp in slot.injected}
