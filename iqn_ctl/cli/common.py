"""What every ``iqn-ctl`` command shares: the typer app, the error wrapper,
the options of the signal and candidate parameters, time formatting.

Every expected failure (bad file, bad flag value, missing privilege) ends as
one ``iqn-ctl: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from iqn_ctl.engine import params as P
from iqn_ctl.engine.params import ParamError
from iqn_ctl.errors import UserError

app = typer.Typer(
    name="iqn-ctl",
    help="IQN ISP agent: infer video stalls from in-band signals (live XDP, pcap or trace replay).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., object])


def fail(msg: str, code: int = 2) -> typer.Exit:
    typer.echo(f"iqn-ctl: error: {msg}", err=True)
    return typer.Exit(code)


def friendly(fn: F) -> F:
    """Turn expected errors into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        from iqn_ctl.evaluate.traces import TraceError

        try:
            return fn(*args, **kwargs)
        except (UserError, ParamError, TraceError) as e:
            raise fail(str(e)) from None
        except _capture_error() as e:  # type: ignore[misc]
            raise fail(str(e)) from None
        except BrokenPipeError:
            sys.stderr.close()
            raise typer.Exit(0) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _capture_error() -> type[Exception]:
    try:
        from iqn_ctl.capture.pcap import CaptureError

        return CaptureError
    except ImportError:  # pragma: no cover - pcap module always ships
        return UserError


# shared options ---------------------------------------------------------------
OptP = typer.Option(P.DEFAULT_P, "--p", help="signalling interval p of the end-user agent, seconds")
OptN = typer.Option(P.DEFAULT_N, "--n", help="toggles per signal n")
OptMin = typer.Option(P.DEFAULT_MIN_SIZE, "--min-size", help="smallest candidate Ethernet frame, bytes")
OptMax = typer.Option(P.DEFAULT_MAX_SIZE, "--max-size", help="largest candidate Ethernet frame, bytes")
OptPort = typer.Option(P.DEFAULT_PORT, "--port", help="server UDP port of candidates")
OptJson = typer.Option(False, "--json", help="machine-readable output")


def _fmt_time(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
