"""The data plane's settings, defined once: the agent checks them before bcc
loads (seconds of compiling), the loader checks them again for direct users.

Light on purpose (no bcc import), so the CLI and the agent can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from iqn_ctl.engine.params import DEFAULT_PAIR_WINDOW, MAX_PAIR_WINDOW
from iqn_ctl.errors import IqnError

XDP_MODES = ("auto", "native", "skb")
DEFAULT_XDP_MODE = "auto"
#: --hook: where the classifier runs. auto: XDP unless another XDP program holds
#: the interface (or XDP cannot attach there), then a TC (clsact) classifier
HOOKS = ("auto", "xdp", "tc")
DEFAULT_HOOK = "auto"
#: --direction: the TC hook can see either direction; XDP sees ingress only
DIRECTIONS = ("ingress", "egress")
DEFAULT_DIRECTION = "ingress"
#: the BPF ring buffer shared by all CPUs, in 4 KiB pages; 64 bytes a record,
#: so 4096 pages (16 MiB) hold 262k records: a quarter second of 1 M
#: candidates/s while the agent is descheduled
DEFAULT_RING_PAGES = 4096
#: the old name (a per-CPU perf buffer before the ring buffer); same flag value now
DEFAULT_PERF_PAGES = DEFAULT_RING_PAGES
#: 1 GiB: the kernel caps a ring buffer below 4 GiB; this is far more than enough
MAX_RING_PAGES = 1 << 18
MAX_PERF_PAGES = MAX_RING_PAGES
#: --backlog: candidates (in burst records) the agent holds when it falls behind,
#: oldest shed past it. Sized for an outage's onset, not for a sustained
#: overload: 50,000 flows that start stalling within one p put the agent 1.3-3 s
#: behind the ring (bench/RESULTS.md "Live agent at scale: an outage's onset");
#: at the ~800,000 candidates/s the bench box offers meanwhile, 1.1-2.5 M
#: candidates waited.
#: The former 262,144 shed there, and shedding a stalling flow's oldest
#: candidates ends its stall early and starts it again (two events, each a log
#: line, a history row and a counter read), which costs more work than the
#: candidates saved: the agent then fed 0.18 of what was offered, against all
#: of it with room to wait. Memory: ~140 bytes a candidate measured when the
#: late sender split bursts into 2.5 records (up to ~600 MB at this limit),
#: ~50 with whole bursts of 4.
DEFAULT_BACKLOG = 1 << 22
MAX_BACKLOG = 1 << 26
#: non-candidate datagrams from the port counted 1 in this many, each weighted
#: by it (IQN_VOL_SAMPLE, --vol-sample; a power of two): the volume arrays are
#: estimates, candidates exact; 1 counts every one (exact volumes)
DEFAULT_VOL_SAMPLE = 8
MAX_VOL_SAMPLE = 1024
#: the kernel's LRU flow table; the engine's flow table has the same bound
MAX_FLOWS_LIMIT = 1 << 24


class AgentError(IqnError):
    """An expected failure of attach/detach; the message is for the user as is."""


def dataplane_problem(xdp_mode: str, max_flows: int, ring_pages: int,
                      vol_sample: int = DEFAULT_VOL_SAMPLE) -> str | None:
    """Why these data-plane settings cannot work (a one-line message naming the
    flag), or None."""
    if xdp_mode not in XDP_MODES:
        return f"--xdp-mode must be one of {', '.join(XDP_MODES)}, got {xdp_mode!r}"
    if not 1 <= max_flows <= MAX_FLOWS_LIMIT:
        return f"--max-flows must be in 1..{MAX_FLOWS_LIMIT}, got {max_flows}"
    if ring_pages < 1 or ring_pages & (ring_pages - 1) or ring_pages > MAX_RING_PAGES:
        return f"--ring-pages must be a power of two up to {MAX_RING_PAGES}, got {ring_pages}"
    v = vol_sample
    if isinstance(v, bool) or not 1 <= v <= MAX_VOL_SAMPLE or v & (v - 1):
        return f"--vol-sample must be a power of two in 1..{MAX_VOL_SAMPLE}, got {v}"
    return None


def hook_problem(hook: str, direction: str) -> str | None:
    """Why this --hook/--direction pair cannot work (one line naming the flag), or None."""
    if hook not in HOOKS:
        return f"--hook must be one of {', '.join(HOOKS)}, got {hook!r}"
    if direction not in DIRECTIONS:
        return f"--direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}"
    if hook == "xdp" and direction == "egress":
        return "--direction egress needs the TC hook (XDP sees ingress only): use --hook tc or auto"
    return None


@dataclass(frozen=True, slots=True)
class Guard:
    """The data plane's forgery guard (``iqn_xdp.c``: pair_check, client_cap).

    ``pairing``: a candidate needs a client packet on its flow within
    ``window`` seconds (seen by the TC egress program), spending one of at most
    ``credits`` banked; off for one-directional taps. ``cap``: signal bursts
    per second per client address (n candidates each) after pairing, 0 for
    no cap. ``Datapath`` without a guard checks nothing (the library's
    mechanism); the agent always passes one (its policy, on by default)."""

    pairing: bool = True
    window: float = DEFAULT_PAIR_WINDOW
    credits: int = 16
    cap: float = 0.0

    def cflags(self, n: int) -> list[str]:
        """The -D constants of iqn_xdp.c for a signal of ``n`` candidates."""
        per_s = self.cap * n
        cap_ns = round(1e9 / per_s) if per_s > 0 else 0
        depth = max(n, math.ceil(per_s))
        return [
            f"-DIQN_PAIRING={int(self.pairing)}",
            f"-DIQN_PAIR_WINDOW_NS={round(self.window * 1e9)}ULL",
            f"-DIQN_PAIR_CREDITS={self.credits}",
            f"-DIQN_CAP_NS={cap_ns}ULL",
            f"-DIQN_CAP_DEPTH={depth}",
        ]


def guard_problem(window: float, cap: float, credits: int = 16) -> str | None:
    """Why these guard settings cannot work (naming the flag), or None."""
    if not 0 < window <= MAX_PAIR_WINDOW:
        return f"--pair-window must be in (0, {MAX_PAIR_WINDOW:g}] seconds, got {window}"
    if not 0 <= cap < 1e7:
        return f"--cap must be a number of bursts per second >= 0 (0: no cap), got {cap}"
    if not 1 <= credits <= 1 << 20:
        return f"pair credits must be in 1..{1 << 20}, got {credits}"
    return None
