"""One error type for everything the user can fix (no display, bad config, bad flag)."""

from __future__ import annotations


class AgentError(Exception):
    """Expected failure; ``iqn-agent`` prints the message as one line and exits 2."""
