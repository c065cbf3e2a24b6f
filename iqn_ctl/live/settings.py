"""The data plane's settings, defined once: the agent checks them before bcc
loads (seconds of compiling), the loader checks them again for direct users.

Light on purpose (no bcc import), so the CLI and the agent can use it.
"""

from __future__ import annotations

from iqn_ctl.errors import IqnError

XDP_MODES = ("auto", "native", "skb")
DEFAULT_XDP_MODE = "auto"
#: perf ring per CPU, in 4 KiB pages; ~64 bytes an event, so 1024 pages hold
#: 65k events: half a second of 130k candidates/s while the agent is descheduled
DEFAULT_PERF_PAGES = 1024
MAX_PERF_PAGES = 1 << 16
#: the kernel's LRU flow table; the engine's flow table has the same bound
MAX_FLOWS_LIMIT = 1 << 24


class AgentError(IqnError):
    """An expected failure of attach/detach; the message is for the user as is."""


def dataplane_problem(xdp_mode: str, max_flows: int, perf_pages: int) -> str | None:
    """Why these data-plane settings cannot work (a one-line message naming the
    flag), or None."""
    if xdp_mode not in XDP_MODES:
        return f"--xdp-mode must be one of {', '.join(XDP_MODES)}, got {xdp_mode!r}"
    if not 1 <= max_flows <= MAX_FLOWS_LIMIT:
        return f"--max-flows must be in 1..{MAX_FLOWS_LIMIT}, got {max_flows}"
    if perf_pages < 1 or perf_pages & (perf_pages - 1) or perf_pages > MAX_PERF_PAGES:
        return f"--perf-pages must be a power of two up to {MAX_PERF_PAGES}, got {perf_pages}"
    return None
