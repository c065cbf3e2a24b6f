"""What every ``iqn-ctl`` command shares: the typer app, the error wrapper,
the options of the signal and candidate parameters, time formatting.

Every expected failure (bad file, bad flag value, missing privilege) ends as
one ``iqn-ctl: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import typer

from iqn_ctl.clikit import fmt_time, friendly_for, make_app
from iqn_ctl.engine import params as P
from iqn_ctl.engine.discard import DEFAULT_BULK_RATIO
from iqn_ctl.engine.estimators import DEFAULT_ESTIMATOR, ESTIMATORS
from iqn_ctl.engine.flowkey import KEY_MODES
from iqn_ctl.errors import UserError

__all__ = [
    "DEFAULT_BULK_RATIO", "OptBulkRatio", "OptEstimator", "OptJson", "OptKey", "OptMax", "OptMin", "OptN",
    "OptP", "OptPort", "UserError", "app", "check_estimator", "fmt_time", "friendly",
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
# what the live agent and a capture replay do with the engine's stalls: defined
# once, so `replay` with the agent's flags records what the agent recorded
OptEstimator = typer.Option(
    DEFAULT_ESTIMATOR, "--estimator", help=f"one of: {', '.join(sorted(ESTIMATORS))}"
)
OptKey = typer.Option(
    "5tuple", "--key", help=f"{' or '.join(KEY_MODES)}: a flow per connection, or one per client"
)
OptBulkRatio = typer.Option(
    DEFAULT_BULK_RATIO, "--bulk-ratio",
    help="discard a stall whose flow carried more than this many full-size packets' worth of "
         "other traffic per candidate during it (a video flow, not a signal); 0 keeps every stall",
)


def check_estimator(name: str) -> None:
    if name not in ESTIMATORS:
        raise UserError(f"unknown --estimator {name!r}; choose one of {', '.join(sorted(ESTIMATORS))}")

_fmt_time = fmt_time
