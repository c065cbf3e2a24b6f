"""The server-to-client bottleneck: rates, schedules and the tbf qdisc.

Stalls are made on demand by squeezing the router's client-facing link; a
schedule of (seconds, rate) steps lets an experiment script stalls in advance.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from iqn_ctl.errors import IqnError

from .templates import env_file

TC_H_ROOT = 0xFFFFFFFF

_UNITS = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)?\s*$", re.IGNORECASE)
UNLIMITED = ("none", "off", "unlimited")


class RateError(IqnError, ValueError):
    """A rate or schedule the user wrote cannot be understood."""


def parse_rate(text: str) -> int | None:
    """Bits per second for ``1mbit``/``300kbit``/``64000``; None for no limit."""
    if text.strip().lower() in UNLIMITED:
        return None
    m = _RATE.match(text)
    if not m:
        raise RateError(f"bad rate {text!r}: use e.g. 1mbit, 300kbit, 64000 (bit/s) or none")
    bits = int(float(m.group(1)) * _UNITS[(m.group(2) or "bit").lower()])
    if bits < 8_000:
        raise RateError(f"rate {text!r} is below 8kbit, too low to carry a single packet in time")
    return bits


def format_rate(bits: int | None) -> str:
    if bits is None:
        return "none"
    for unit, f in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits % f == 0:
            return f"{bits // f}{unit}"
    return f"{bits}bit"


@dataclass(frozen=True)
class Step:
    at: float  # seconds after the schedule starts
    rate: int | None  # bit/s, None = unlimited


def parse_schedule(text: str) -> list[Step]:
    """``0:1mbit,20:300kbit,40:none`` -> steps sorted by time."""
    steps: list[Step] = []
    for part in text.split(","):
        if not part.strip():
            continue
        at, sep, rate = part.partition(":")
        if not sep:
            raise RateError(f"bad schedule step {part!r}: use SECONDS:RATE, e.g. 20:300kbit")
        try:
            t = float(at)
        except ValueError:
            raise RateError(f"bad schedule step {part!r}: {at!r} is not a number of seconds") from None
        if t < 0:
            raise RateError(f"bad schedule step {part!r}: time must be >= 0")
        steps.append(Step(t, parse_rate(rate)))
    if not steps:
        raise RateError("empty schedule: use e.g. 0:1mbit,20:300kbit,40:none")
    return sorted(steps, key=lambda s: s.at)


def tbf_params() -> tuple[int, int]:
    """(burst bytes, latency ms) from the template shared with the router VM."""
    env = env_file("shaping.env")
    return int(env["TBF_BURST_BYTES"]), int(env["TBF_LATENCY_MS"])


def apply_rate(netns: str, ifname: str, bits: int | None) -> None:
    """Set (or with None remove) the tbf on ``ifname`` in ``netns``."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    burst, latency_ms = tbf_params()
    with IPRoute(netns=netns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise RateError(f"no interface {ifname} in namespace {netns}")
        if bits is None:
            try:
                ipr.tc("del", index=idx[0], parent=TC_H_ROOT)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL):  # no root qdisc: already unlimited
                    raise
            return
        ipr.tc("replace", "tbf", idx[0], rate=f"{bits}bit", burst=burst, latency=f"{latency_ms}ms")


def current_rate(netns: str, ifname: str) -> int | None:
    """The tbf rate now on ``ifname`` (bit/s), or None when unshaped."""
    from pyroute2 import IPRoute

    with IPRoute(netns=netns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        for q in ipr.get_qdiscs(index=idx[0]):
            if q.get_attr("TCA_KIND") == "tbf" and q["parent"] == TC_H_ROOT:
                parms = q.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")
                return int(parms["rate"]) * 8
    return None
