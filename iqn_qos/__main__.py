"""``python -m iqn_qos`` runs the ``iqn-qos`` command line."""

from .cli import main

main()
