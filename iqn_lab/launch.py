"""Entry point of ``iqn-lab``: the lab is an install role.

``pip install iqn`` (the numbers-only install) leaves the lab's modules out;
without them ``iqn-lab`` says so in one line naming the extra
(:mod:`iqn_ctl.extras`) instead of a traceback from the import of its
command line.
"""

from __future__ import annotations

import sys

from iqn_ctl.clikit import early_version
from iqn_ctl.extras import MissingExtra, missing_extra, require


def main() -> None:
    early_version("iqn-lab", sys.argv)
    try:
        require("iqn-lab", "aioquic", "pyroute2", "selenium")
        from .cli import main as run
    except MissingExtra as e:
        print(f"iqn-lab: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except ModuleNotFoundError as e:
        known = missing_extra(e)
        if known is None:
            raise
        print(f"iqn-lab: error: {known}", file=sys.stderr)
        raise SystemExit(2) from None
    run()
