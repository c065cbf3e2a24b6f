"""IQN lab: client - OpenVPN tunnel - router - OTT service, in network namespaces.

The lab lets anyone watch IQN work end to end on one Linux machine, without
YouTube or a second computer, and lets the tests do the same.
"""

from __future__ import annotations
