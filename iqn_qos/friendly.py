"""One error wrapper for every ``iqn-qos`` command.

``iqn_qos`` is its own room (it imports nothing of ``iqn_ctl``), so it cannot
reuse ``iqn_ctl.clikit``; this is its single copy, used by :mod:`iqn_qos.cli`
and the commands it registers (:mod:`iqn_qos.cli_synth`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from .errors import QosError

F = TypeVar("F", bound=Callable[..., object])


def friendly(fn: F) -> F:
    """Expected errors (:class:`QosError`) end as one ``iqn-qos: error: ...`` line
    on stderr and exit status 2; a closed pipe and Ctrl-C end quietly."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except QosError as e:
            typer.echo(f"iqn-qos: error: {e}", err=True)
            raise typer.Exit(2) from None
        except BrokenPipeError:
            sys.stderr.close()
            raise typer.Exit(0) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
