"""``python -m iqn_qos`` runs the ``iqn-qos`` command line."""

from .launch import main

main()
