"""The error base of IQN: a failure the user caused or can fix, whose message
is for the user as is (the CLIs print it as one ``...: error:`` line, exit 2)."""

from __future__ import annotations


class UserError(Exception):
    """An error whose message is for the user as is."""
