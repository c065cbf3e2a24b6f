"""Where the agent's BPF programs' C sources are, and the flags their shared parser needs.

The data plane (``bpf/iqn_xdp.c``) and the boost classifier (``bpf/iqn_boost.c``)
include one link-layer parser, ``bpf/iqn_parse.h``, so both read Ethernet, VLAN
tags, PPPoE and layer-3 frames alike. bcc compiles a source as an in-memory
``/virtual/main.c``, so a quoted include is not found beside the file: every
loader passes :func:`parser_cflags`, which also picks the first parser from the
device type (``IQN_L3``).
"""

from __future__ import annotations

from pathlib import Path

#: the C sources and the header, shipped as package data (pyproject.toml)
BPF_DIR = Path(__file__).resolve().parent / "bpf"


def parser_cflags(l3: bool) -> list[str]:
    """The -I and -D flags of ``iqn_parse.h``: ``l3``, the device's frames start
    at the IP header (:attr:`iqn_ctl.live.devtype.DeviceType.l3`)."""
    return [f"-I{BPF_DIR}", f"-DIQN_L3={int(l3)}"]
