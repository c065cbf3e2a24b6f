"""Who may read what the agent keeps: root, the agent's own user, and the
members of one group (``--group``, default ``iqn``).

Why a group: on a router the agent runs as the system user ``iqn`` (the unit,
docs/deploy.md), and the operators who run ``iqn-ctl flows``, ``status`` and
``stalls`` are people, not root. Adding them to the group lets them read the
live view and the history without sudo; everybody else still cannot, because
both name subscribers' addresses. What the group gets:

- the run dir and the state dir: ``0750``, group-owned (list and enter, never
  write: the agent creates and unlinks files there by name, api.py);
- the API socket: ``0660`` (connecting to a unix socket needs write permission
  on it) and, behind that, the server's peer check (SO_PEERCRED and
  SO_PEERGROUPS): a peer must be root, the agent's user, or in the group. The
  API only answers read requests (``ping``, ``status``, ``flows``);
- the history, ``stalls.sqlite`` and its ``-wal``/``-shm`` files: ``0640``
  (readers open it read-only; the -shm is read, never written, by them).

The default group is used only if it exists (a development box has none:
everything stays root's, as before); a ``--group`` that does not exist is an
error. The daemon's log and the pid file stay the agent's own (0600).
"""

from __future__ import annotations

import grp
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from iqn_ctl.live.settings import AgentError

DEFAULT_GROUP = "iqn"
#: SO_PEERGROUPS (Linux >= 4.13): the peer's supplementary groups; Python 3.11 has no name for it
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: room for this many supplementary groups in one getsockopt (Python's limit is 1024 bytes);
#: a peer in more groups than that is let in only by its primary gid
MAX_PEER_GROUPS = 256
DIR_MODE, FILE_MODE, SOCK_MODE = 0o750, 0o640, 0o660


@dataclass(frozen=True)
class Access:
    """The group that may read the agent's socket and history (None: nobody but root and us)."""

    gid: int | None = None
    name: str = ""

    def describe(self) -> str:
        return f"root and group {self.name}" if self.gid is not None else "root only"


def resolve(name: str | None) -> Access:
    """``--group``: a group name or number; None means the default, if it exists."""
    if name is None:
        try:
            return Access(grp.getgrnam(DEFAULT_GROUP).gr_gid, DEFAULT_GROUP)
        except KeyError:
            return Access()
    if name == "":
        return Access()  # --group '': private to root, even where the default group exists
    try:
        g = grp.getgrgid(int(name)) if name.isdigit() else grp.getgrnam(name)
    except (KeyError, OverflowError):
        raise AgentError(f"--group {name}: no such group (create it: groupadd --system {name})") from None
    return Access(g.gr_gid, g.gr_name)


def _share(path: Path, access: Access, mode: int) -> None:
    """Give ``path`` (ours, in a directory only we can write) to the group, with ``mode``."""
    if access.gid is None:
        return
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        raise AgentError(f"refusing to share {path}: not a file of this agent's user (remove it)")
    try:
        if st.st_gid != access.gid:
            os.chown(path, -1, access.gid, follow_symlinks=False)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
    except PermissionError:
        raise AgentError(
            f"cannot give {path} to group {access.name}: the agent's user must be root or a member of it"
        ) from None


def share_dir(path: Path, access: Access) -> None:
    _share(path, access, DIR_MODE)


def share_socket(path: Path, access: Access) -> None:
    _share(path, access, SOCK_MODE)


def share_history(db: Path, access: Access) -> None:
    """The history file and the WAL files SQLite keeps beside it while it is open."""
    share_dir(db.parent, access)
    for suffix in ("", "-wal", "-shm"):
        _share(Path(f"{db}{suffix}"), access, FILE_MODE)


def peer_allowed(conn: socket.socket, access: Access) -> bool:
    """Whether the process at the other end of ``conn`` may use the API."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, gid = struct.unpack("3i", creds)
    if uid in (0, os.geteuid()):
        return True
    if access.gid is None:
        return False
    if gid == access.gid:
        return True
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
    except OSError:  # more groups than that, or an old kernel: the primary gid said no
        return False
    return access.gid in struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
