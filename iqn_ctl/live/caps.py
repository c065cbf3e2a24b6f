"""Linux capabilities of this process, so that the agent can run as a dedicated
``iqn`` user with just what it needs instead of uid 0 (issue 20, point 2).

The set was measured, not guessed: the real agent on a testbed veth, run by
setpriv as an unprivileged user with ambient capabilities, one dropped at a time
(docs/agent.md, "Least privilege"). Checks read the effective set from
``/proc/self/status``, so root (all bits) passes as before and a missing
capability is one line that names it.
"""

from __future__ import annotations

from pathlib import Path

#: capability numbers from linux/capability.h
CAP_NUMBERS = {
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}
#: what ``iqn-ctl attach`` and ``detach`` need: load BPF programs and maps
#: (CAP_BPF), attach XDP/TC to an interface (CAP_NET_ADMIN), and bcc's ring
#: buffer / tracing helpers (CAP_PERFMON)
AGENT_CAPS = ("CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON")


def effective(status: Path = Path("/proc/self/status")) -> int:
    """The effective capability mask of this process (0 when it cannot be read)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def missing(needed: tuple[str, ...] = AGENT_CAPS, mask: int | None = None) -> list[str]:
    """The capabilities of ``needed`` that are not in ``mask`` (this process's by default)."""
    have = effective() if mask is None else mask
    return [c for c in needed if not have >> CAP_NUMBERS[c] & 1]


def problem(what: str, needed: tuple[str, ...] = AGENT_CAPS) -> str | None:
    """One line for the user when a capability is missing, else None."""
    gone = missing(needed)
    if not gone:
        return None
    return (f"{what} needs {', '.join(gone)}: run it as root or grant "
            f"{' '.join(needed)} (the systemd unit does: docs/agent.md)")  # fmt: skip
