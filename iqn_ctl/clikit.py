"""What the ``iqn-ctl`` and ``iqn-lab`` command lines share: the typer app's
settings, the error wrapper, time formatting.

A library module (no commands), so the lab's CLI can use it without importing
``iqn_ctl.cli``. The wrapper is the one place where an expected failure
(:class:`~iqn_ctl.errors.IqnError`) becomes one ``<prog>: error: ...`` line on
stderr and exit status 2.
"""

from __future__ import annotations

import datetime as dt
import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from iqn_common.version import version_line
from iqn_ctl.errors import IqnError
from iqn_ctl.extras import missing_extra

F = TypeVar("F", bound=Callable[..., object])
USER_ERROR_EXIT = 2


def make_app(name: str, help: str) -> typer.Typer:
    """A typer app with the house settings: help on no arguments, no shell
    completion, plain tracebacks for bugs, and ``--version``."""
    app = typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_enable=False)  # fmt: skip

    def show_version(value: bool) -> None:
        if value:
            typer.echo(version_line(name))
            raise typer.Exit()

    @app.callback()
    def _options(
        version: bool = typer.Option(
            False, "--version", is_eager=True, callback=show_version,
            help="print the version (and the git commit when run from a checkout) and exit",
        ),
    ) -> None:
        pass

    return app


def early_version(prog: str, argv: list[str]) -> None:
    """``PROG --version`` before anything else is imported, for entry points that
    first check their install role: the version answers on any install."""
    if argv[1:] == ["--version"]:
        print(version_line(prog))
        raise SystemExit(0)


def fail(prog: str, msg: str, code: int = USER_ERROR_EXIT) -> typer.Exit:
    typer.echo(f"{prog}: error: {msg}", err=True)
    return typer.Exit(code)


def _interrupted(e: BaseException) -> bool:
    """Whether ``e`` was caused by Ctrl-C: Python wraps a KeyboardInterrupt raised
    while a module is being imported (a dataclass's ``__set_name__``, say) in a
    RuntimeError, which must still end as an interrupt (exit 130), not a traceback."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def friendly_for(prog: str, permission_hint: str | None = None) -> Callable[[F], F]:
    """The error wrapper of command line ``prog``.

    ``permission_hint``, when given, turns a stray ``PermissionError`` into a
    user error too (the lab's commands touch namespaces and need root)."""

    def friendly(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: object, **kwargs: object) -> object:
            try:
                return fn(*args, **kwargs)
            except IqnError as e:
                raise fail(prog, str(e)) from None
            except ModuleNotFoundError as e:
                known = missing_extra(e)  # an optional module of an install role
                if known is None:
                    raise
                raise fail(prog, str(known)) from None
            except PermissionError as e:
                if permission_hint is None:
                    raise
                raise fail(prog, f"{e.strerror or e}: {permission_hint}") from None
            except BrokenPipeError:
                sys.stderr.close()
                raise typer.Exit(0) from None
            except KeyboardInterrupt:
                raise typer.Exit(130) from None
            except Exception as e:
                if _interrupted(e):  # Ctrl-C that landed inside an import or a __set_name__
                    raise typer.Exit(130) from None
                raise

        return wrapper  # type: ignore[return-value]

    return friendly


def fmt_time(t: float) -> str:
    """Epoch seconds as UTC with milliseconds, as every table prints them.

    A time no calendar date can hold (past year 9999, before year 1, NaN) comes
    back as plain epoch seconds: a garbled file's times are shown, not a traceback."""
    try:
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    except (ValueError, OverflowError, OSError):
        return f"{t:.3f} s epoch"
