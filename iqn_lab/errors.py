"""The lab package's one error base: expected failures with a message for the user."""

from __future__ import annotations

from iqn_ctl.errors import IqnError


class LabError(IqnError):
    """An expected failure (not root, missing tool, lab not up); message for the user."""
