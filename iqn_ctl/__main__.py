"""``python -m iqn_ctl`` runs the CLI (same as the ``iqn-ctl`` script)."""

from .cli import main

main()
