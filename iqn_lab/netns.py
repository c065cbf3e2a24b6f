"""Per-thread network-namespace switching.

Python 3.11 has no ``os.setns``; pyroute2's helpers are wrapped for mocking and
change more state than we need. A socket belongs to the namespace it was created
in, so entering a namespace just long enough to create a socket lets this process
capture on, or connect into, a lab namespace without spawning helpers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from iqn_ctl.errors import IqnError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(IqnError):
    """A namespace could not be entered or found; the message is for the user."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(err)}")


def exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


def names() -> list[str]:
    """Named namespaces, as ``ip netns list`` shows them."""
    if not NETNS_RUN_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_RUN_DIR.iterdir())


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with this thread in namespace ``name``, then switch back."""
    try:
        target = os.open(NETNS_RUN_DIR / name, os.O_RDONLY)
    except FileNotFoundError:
        raise NetnsError(f"no network namespace {name!r}") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def ns_socket(name: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket that lives in namespace ``name`` (usable from any thread)."""
    with entered(name):
        return socket.socket(family, kind, proto)


def _inode(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (for a crash-proof ``down``)."""
    ino = _inode(NETNS_RUN_DIR / name)
    if ino is None:
        return []
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _inode(f"/proc/{entry}/ns/net") == ino:
            out.append(int(entry))
    return out
