"""What every ``iqn-ctl`` command shares: the typer app, the error wrapper,
the options of the signal and candidate parameters, time formatting.

Every expected failure (bad file, bad flag value, missing privilege) ends as
one ``iqn-ctl: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import typer

from iqn_ctl.clikit import fmt_time, friendly_for, make_app
from iqn_ctl.engine import params as P
from iqn_ctl.errors import UserError

__all__ = [
    "OptJson", "OptMax", "OptMin", "OptN", "OptP", "OptPort", "UserError", "app", "fmt_time", "friendly",
]

app = make_app(
    "iqn-ctl", "IQN ISP agent: infer video stalls from in-band signals (live XDP, pcap or trace replay)."
)
friendly = friendly_for("iqn-ctl")


# shared options ---------------------------------------------------------------
OptP = typer.Option(P.DEFAULT_P, "--p", help="signalling interval p of the end-user agent, seconds")
OptN = typer.Option(P.DEFAULT_N, "--n", help="toggles per signal n")
OptMin = typer.Option(P.DEFAULT_MIN_SIZE, "--min-size", help="smallest candidate Ethernet frame, bytes")
OptMax = typer.Option(P.DEFAULT_MAX_SIZE, "--max-size", help="largest candidate Ethernet frame, bytes")
OptPort = typer.Option(P.DEFAULT_PORT, "--port", help="server UDP port of candidates")
OptJson = typer.Option(False, "--json", help="machine-readable output")

_fmt_time = fmt_time
