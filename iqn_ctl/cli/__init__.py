"""The ``iqn-ctl`` command line (typer): one app, the commands in modules.

:mod:`.common` holds the app, the error wrapper and the shared options;
:mod:`.offline` (replay, evaluate) and :mod:`.agent` (attach, detach, flows,
stalls, status) register their commands on it when imported here.
"""

from __future__ import annotations

from . import offline  # noqa: F401  (registers replay/evaluate, first in --help)

# isort: split
from . import agent  # noqa: F401  (registers attach/detach/flows/stalls/status)
from .common import app

__all__ = ["app", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
