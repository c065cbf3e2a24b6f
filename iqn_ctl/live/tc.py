"""Attach BPF programs at an interface's TC hooks (the ``clsact`` qdisc).

XDP sees a packet before anything else, but an interface holds one XDP
program (bcc cannot share it through libxdp's dispatcher), XDP sees ingress
only, and some devices (tunnels) offer it only in generic mode. The TC hooks
have none of these limits: any number of classifiers run in turn at ingress
and at egress, after whatever XDP program is there. The data plane uses them
for ``--hook tc`` and to see the client's side of a flow (egress); both go
through this one module so that detach and crash clean-up find every filter
IQN added by its name.

Every filter IQN adds is a direct-action ``bpf`` classifier whose program
name starts with :data:`NAME_PREFIX`; :func:`detach` removes exactly those
and leaves foreign filters (and the qdisc, if anything else uses it) alone.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any, Literal

from iqn_ctl.errors import IqnError
from iqn_ctl.extras import hint

Direction = Literal["ingress", "egress"]
#: the clsact qdisc's two pseudo-parents (TC_H_CLSACT with TC_H_MIN_INGRESS / _EGRESS)
PARENTS: dict[str, int] = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
#: program names of IQN's classifiers start with this (BPF names keep 15 characters)
NAME_PREFIX = "iqn_"
#: the filter priority IQN uses unless told otherwise (lower runs first)
DEFAULT_PRIO = 0xC000


class TcError(IqnError):
    """A one-line reason a TC classifier could not be attached or removed."""


@dataclass(frozen=True)
class TcFilter:
    """One BPF classifier on a clsact hook."""

    direction: Direction
    prio: int
    handle: int
    name: str

    @property
    def ours(self) -> bool:
        return self.name.startswith(NAME_PREFIX)


def _ipr() -> Any:
    try:
        from pyroute2 import IPRoute
    except ImportError:  # pragma: no cover - a dependency of the project
        raise TcError(hint("pyroute2") or "pyroute2 is missing") from None
    return IPRoute()


def _index(iface: str) -> int:
    try:
        return socket.if_nametoindex(iface)
    except (OSError, ValueError):
        raise TcError(f"no such network interface: {iface!r}") from None


def ensure_clsact(iface: str) -> bool:
    """Add the clsact qdisc to ``iface`` unless it is there; True if this call added it."""
    idx = _index(iface)
    with _ipr() as ipr:
        try:
            ipr.tc("add", "clsact", idx)
        except Exception as e:  # pyroute2's NetlinkError carries the errno as .code
            if getattr(e, "code", None) == errno.EEXIST:
                return False
            raise TcError(f"cannot add the clsact qdisc to {iface}: {e}") from None
    return True


def filters(iface: str, direction: Direction) -> list[TcFilter]:
    """The BPF classifiers at ``direction`` of ``iface``, in priority order."""
    idx = _index(iface)
    found = []
    with _ipr() as ipr:
        try:
            msgs = ipr.get_filters(idx, parent=PARENTS[direction])
        except Exception as e:
            if getattr(e, "code", None) in (errno.EINVAL, errno.ENOENT):
                return []  # no clsact qdisc: no filters
            raise TcError(f"cannot list the {direction} filters of {iface}: {e}") from None
        for m in msgs:
            if m.get_attr("TCA_KIND") != "bpf" or not m["handle"]:
                continue  # the per-priority chain header carries no program
            name = m.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") or ""
            found.append(TcFilter(direction, m["info"] >> 16, m["handle"], str(name)))
    return sorted(found, key=lambda f: f.prio)


def attach(iface: str, fd: int, name: str | bytes, direction: Direction,
           prio: int = DEFAULT_PRIO) -> TcFilter:
    """Attach the loaded SCHED_CLS program ``fd`` (named ``name``) at ``direction``.

    The program runs in direct-action mode: its return code is the verdict
    (IQN's classifier returns TC_ACT_UNSPEC, -1: the next filter runs as if it
    were not there; TC_ACT_OK would end the chain). Any filter of ours already at
    ``prio`` is replaced, so a restarted agent does not stack copies.
    """
    name = name.decode() if isinstance(name, bytes) else name
    if not name.startswith(NAME_PREFIX):
        raise TcError(f"program name {name!r} must start with {NAME_PREFIX!r} (detach finds it so)")
    idx = _index(iface)
    ensure_clsact(iface)
    for f in filters(iface, direction):
        if f.ours and f.prio == prio:
            _delete(idx, f)
    with _ipr() as ipr:
        try:
            ipr.tc("add-filter", "bpf", idx, ":1", fd=fd, name=name,
                   parent=PARENTS[direction], classid=1, direct_action=True, prio=prio)
        except Exception as e:
            raise TcError(f"cannot attach {name} at {direction} of {iface}: {e}") from None
    return TcFilter(direction, prio, 1, name)


def _delete(idx: int, f: TcFilter) -> None:
    with _ipr() as ipr:
        try:
            ipr.tc("del-filter", "bpf", idx, f.handle, parent=PARENTS[f.direction],
                   prio=f.prio)
        except Exception as e:
            if getattr(e, "code", None) not in (errno.ENOENT, errno.EINVAL):
                raise TcError(f"cannot remove {f.name} from {f.direction}: {e}") from None


def detach(iface: str, directions: tuple[Direction, ...] = ("ingress", "egress"),
           names: tuple[str, ...] | None = None) -> list[TcFilter]:
    """Remove every IQN classifier from ``iface`` (only those named in ``names``
    when given: the agent's, not the lab's ``iqn_jitter``); the clsact qdisc
    goes too if nothing else is left on it. Returns what was removed (empty if
    nothing). A vanished interface has nothing to remove."""
    try:
        idx = _index(iface)
    except TcError:
        return []
    removed = []
    for d in directions:
        for f in filters(iface, d):
            if f.ours and (names is None or f.name in names):
                _delete(idx, f)
                removed.append(f)
    if removed and not any(filters(iface, d) for d in ("ingress", "egress")):
        with _ipr() as ipr:
            try:
                ipr.tc("del", "clsact", idx)
            except Exception:
                pass  # someone else's qdisc setup, or already gone: not ours to force
    return removed
