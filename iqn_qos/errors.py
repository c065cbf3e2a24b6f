"""The one error base of ``iqn_qos``.

Every expected failure (bad input line, unknown component, empty slot) is a
:class:`QosError` whose message is for the user as is; the CLI prints it as one
``iqn-qos: error: ...`` line and exits 2.
"""

from __future__ import annotations


class QosError(Exception):
    """An error whose message is for the user as is (prefixed ``<file>:<line>:`` when it has one)."""
