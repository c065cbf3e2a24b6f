"""Lab daemons: started detached with a pid file, stopped by pid only.

``down`` must work after a crash of whoever ran ``up``, so every daemon is
remembered on disk; daemons inside a namespace are also found through the
namespace itself (see ``netns.pids_in``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from . import netns
from .errors import LabError


def spawn(state: Path, name: str, argv: list[str], ns: str | None = None) -> int:
    """Start ``argv`` (inside ``ns`` if given) in its own session; log to state/name.log."""
    full = ["ip", "netns", "exec", ns, *argv] if ns else argv
    with open(state / f"{name}.log", "ab") as log:
        p = subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    (state / f"{name}.pid").write_text(f"{p.pid}\n")
    return p.pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; it only waits for its parent to reap it
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def pid_of(state: Path, name: str) -> int | None:
    try:
        pid = int((state / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def find(*words: str) -> list[int]:
    """Pids whose argv contains every one of ``words`` as an element."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            argv = cmdline(int(entry)).split(" ")
            if all(w in argv for w in words):
                out.append(int(entry))
    return out


def stop(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after ``grace`` seconds."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop_namespace(ns: str) -> None:
    """End every process living in ``ns`` (all of them are the lab's)."""
    for _ in range(3):  # a dying parent may still fork; look again
        pids = [p for p in netns.pids_in(ns) if p != os.getpid()]
        if not pids:
            return
        stop(pids)


def remove_namespaces(names: list[str]) -> list[str]:
    """End every process in each of ``names`` (all of them first: agents detach,
    servers flush), then delete the namespaces; returns "namespace X" for each deleted."""
    for ns in names:
        if netns.exists(ns):
            stop_namespace(ns)
    removed = []
    for ns in names:
        if netns.exists(ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            removed.append(f"namespace {ns}")
    return removed


def last_line(log: Path) -> str:
    """The last non-blank line of a daemon's log: why it exited, usually."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def wait_ready(state: Path, ok: Callable[[], bool], what: str, daemons: list[str], timeout: float) -> None:
    """Until ``ok()``; a LabError naming the daemon and its log's last line as soon
    as one of ``daemons`` (pid files in ``state``) has exited, or ``what`` at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        for d in daemons:
            if pid_of(state, d) is None:
                raise LabError(f"{d} exited during up: {last_line(state / (d + '.log'))}")
        time.sleep(0.1)
    raise LabError(f"{what} not ready after {timeout:.0f} s")
