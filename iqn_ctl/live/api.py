"""The agent's local API: one JSON request line in, one JSON response line out,
over a unix socket that only root (and the members of the agent's access
group, :mod:`iqn_ctl.live.access`) can reach.

Why a unix socket and not TCP: the flow table names subscribers' addresses, so
it must not be reachable from the network or by unprivileged users. The socket
lives in a 0700 directory with mode 0600 (0750 and 0660, group-owned, when an
access group is set), and the server also checks the peer's uid and groups
(SO_PEERCRED, SO_PEERGROUPS) so a mistaken chmod does not open it up.

Why the run dir must be root's and closed to other writers: the agent (root)
creates, truncates and unlinks files there by name. In a directory another user
can write, that user could plant a symlink named like the pid file and make
root overwrite the file it points to, or a pid file naming a process of their
choice for ``detach`` to kill. So such a directory is refused, not repaired,
and the files in it are opened without following symlinks all the same.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iqn_ctl.errors import IqnError
from iqn_ctl.live.access import Access, peer_allowed, share_socket
from iqn_ctl.live.settings import AgentError

DEFAULT_RUN_DIR = Path(os.environ.get("IQN_RUN_DIR", "/run/iqn"))
MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Any]


class RawJson(bytes):
    """A result already serialised to JSON: the server sends it as is (the
    agent caches its flow table this way, so a client polling fast costs the
    agent almost nothing while nothing changes)."""


class ApiError(IqnError):
    """The agent cannot be reached or refused the request; the message is for the user."""


class NoAgent(ApiError):
    """Nothing listens on the socket (never started, or died without cleaning up)."""


#: an interface name as the kernel accepts it (dev_valid_name): the run dir's
#: file names are made from it, so '../x' must never get that far
IFNAMSIZ = 16


def check_iface_name(iface: str) -> None:
    """Refuse what cannot be an interface name (``'../x'`` would name files outside the run dir)."""
    if (
        not iface or len(iface.encode()) >= IFNAMSIZ or iface in (".", "..")
        or any(c in "/:" or c.isspace() or not c.isprintable() for c in iface)
    ):
        raise AgentError(f"{iface!r} is not a valid interface name")


def sock_path(run_dir: Path, iface: str) -> Path:
    check_iface_name(iface)
    return run_dir / f"{iface}.sock"


def pid_path(run_dir: Path, iface: str) -> Path:
    check_iface_name(iface)
    return run_dir / f"{iface}.pid"


def ensure_private_dir(path: Path, what: str, create: bool = True) -> None:
    """Create ``path`` 0700 if missing (unless ``create`` is false); refuse one we
    do not own or that group or others may write (see the module's docstring);
    an existing one others may read is tightened to 0700, or 0750 when it was
    open to its group (the access group's dirs, :mod:`iqn_ctl.live.access`)."""
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise AgentError(f"refusing {what} {path}: not a directory")
    if st.st_uid != os.geteuid():
        raise AgentError(
            f"refusing {what} {path}: owned by uid {st.st_uid}, not by uid {os.geteuid()} "
            "(another user could plant files in it)"
        )
    if st.st_mode & 0o022:
        raise AgentError(
            f"refusing {what} {path}: writable by group or others (mode {st.st_mode & 0o7777:o}); "
            f"run 'chmod 0700 {path}'"
        )
    if st.st_mode & 0o007:
        path.chmod(stat.S_IMODE(st.st_mode) & 0o750)


def ensure_run_dir(run_dir: Path) -> None:
    """Create the run dir 0700; refuse one that is not safely ours."""
    ensure_private_dir(run_dir, "run dir")


def open_private(path: Path | str, flags: int, what: str) -> int:
    """``os.open`` for the agent's own files (pid file, log): never through a
    symlink, never a FIFO or device, created 0600; refuses a file owned by
    someone else or with other hard links (it would be their file we write).
    A missing file without ``O_CREAT`` raises FileNotFoundError as os.open does."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AgentError(f"refusing {what} {path}: it is a symbolic link (remove it)") from None
        raise AgentError(f"cannot open {what} {path}: {e.strerror}") from None
    st = os.fstat(fd)
    problem = ""
    if not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"owned by uid {st.st_uid}"
    elif st.st_nlink > 1:
        problem = "it has other hard links"
    if problem:
        os.close(fd)
        raise AgentError(f"refusing {what} {path}: {problem} (remove it)")
    os.set_blocking(fd, True)
    return fd


class ApiServer:
    """Serves requests on a background thread; ``handler`` gets the decoded
    request (a dict with at least ``"cmd"``) and returns a JSON-able result.
    ``access``: the group that may connect besides root and this user."""

    def __init__(self, path: Path, handler: Handler, access: Access | None = None) -> None:
        self.path = path
        self.handler = handler
        self.access = access or Access()
        ensure_run_dir(path.parent)
        if path.exists() or path.is_symlink():
            path.unlink()  # stale socket of a dead agent (the caller holds the interface lock)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no chmod, which would follow a symlink
        try:
            self._sock.bind(str(path))
        finally:
            os.umask(old)
        share_socket(path, self.access)
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"iqn-api:{path.name}", daemon=True)
        self.requests = 0

    def start(self) -> ApiServer:
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            with conn:
                try:
                    self._one(conn)
                except OSError:
                    pass  # client went away mid-answer; nothing to tell anyone

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        if not peer_allowed(conn, self.access):
            msg = f"permission denied: the IQN API is for {self.access.describe()}"
            conn.sendall(json.dumps({"ok": False, "error": msg}).encode() + b"\n")
            return
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_REQUEST:
                conn.sendall(b'{"ok": false, "error": "request too large"}\n')
                return
        try:
            req = json.loads(buf)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("expected an object with a 'cmd' string")
        except ValueError as e:
            conn.sendall(json.dumps({"ok": False, "error": f"bad request: {e}"}).encode() + b"\n")
            return
        self.requests += 1
        try:
            resp = {"ok": True, "result": self.handler(req)}
        except ApiError as e:
            resp = {"ok": False, "error": str(e)}
        except Exception as e:  # keep serving; the agent's log gets the details
            import logging

            logging.getLogger("iqn.api").exception("API request %r failed", req.get("cmd"))
            resp = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        result = resp.get("result")
        if isinstance(result, RawJson):
            conn.sendall(b'{"ok": true, "result": ' + result + b"}\n")
        else:
            conn.sendall(json.dumps(resp).encode() + b"\n")

    def close(self, unlink: bool = True) -> None:
        """Stop serving and remove the socket file (unless ``unlink`` is false: the
        caller removes the names it still owns); idempotent."""
        self._stop.set()
        try:
            self._sock.close()
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        if not unlink:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def request(path: Path, cmd: str, timeout: float = 5.0, **args: Any) -> Any:
    """Send one request and return its result; raises :class:`ApiError` with a
    message fit for the user."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise NoAgent(f"no agent socket at {path}") from None
        except ConnectionRefusedError:
            raise NoAgent(f"stale agent socket at {path} (agent not running)") from None
        except PermissionError:
            raise ApiError(f"permission denied on {path}: the IQN API is for root and the agent's group "
                           "(use sudo, or join the group: docs/deploy.md)") from None
        try:
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused early (not root, too large); its reason is still readable
        buf = bytearray()
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
            if buf.endswith(b"\n"):
                break
    except TimeoutError:
        raise ApiError(f"agent at {path} did not answer within {timeout:g} s") from None
    except ConnectionResetError:
        raise NoAgent(f"agent at {path} closed the connection") from None
    finally:
        s.close()
    try:
        resp = json.loads(buf)
    except ValueError:
        raise ApiError(f"agent at {path} sent a garbled answer") from None
    if not resp.get("ok"):
        raise ApiError(str(resp.get("error", "request failed")))
    return resp.get("result")


def agent_sockets(run_dir: Path) -> list[tuple[str, Path]]:
    """(iface, socket path) of every agent socket in ``run_dir``, sorted by iface."""
    try:
        names = sorted(run_dir.iterdir())
    except FileNotFoundError:
        return []
    except PermissionError:
        raise ApiError(f"permission denied on {run_dir}: the IQN API is for root and the agent's group "
                       "(use sudo, or join the group: docs/deploy.md)") from None
    return [(p.name[: -len(".sock")], p) for p in names if p.name.endswith(".sock")]
