"""The one error base of IQN's ISP side and lab.

Every expected failure a user caused or can fix (bad file, bad flag, not root,
no such interface, lab not up) raises an :class:`IqnError` subclass whose
message is for the user as is; the command lines print it as one
``<prog>: error: ...`` line and exit with status 2 (:mod:`iqn_ctl.clikit`).
Anything else is a bug and keeps its traceback. ``user_agent`` has its own
base (``user_agent.errors.AgentError``): it depends on nothing here.
"""

from __future__ import annotations


class IqnError(Exception):
    """An expected failure; the message is for the user as is."""


class UserError(IqnError):
    """A failure found by a command itself (a bad combination of options...)."""
