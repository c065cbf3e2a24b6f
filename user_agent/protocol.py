"""The signal this agent sends, defined once for the agent: n toggles of the
autoplay switch every p seconds while the video stalls.

The ISP side has its own definitions (``iqn_ctl.engine.params``): the two
packages share a protocol (docs/contracts.md), not code, so the user agent
installs and runs without the ISP side.
"""

from __future__ import annotations

from .errors import AgentError

DEFAULT_P = 0.2  # seconds between screen grabs, and between signals during a stall
DEFAULT_N = 4  # toggles per signal
P_MIN, P_MAX = 0.02, 60.0


def check_p(p: float) -> float:
    if not P_MIN <= p <= P_MAX:
        raise AgentError(f"--p must be between {P_MIN:g} and {P_MAX:g} seconds, got {p}")
    return p


def check_n(n: int) -> int:
    if n < 2 or n % 2:
        raise AgentError(
            f"--n must be an even number of toggles (>= 2) so the autoplay switch ends as it was, got {n}"
        )
    return n
