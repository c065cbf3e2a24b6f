"""Configuration templates shared by the lab and the Vagrant VMs.

One copy of the OpenVPN, NAT and shaping configuration keeps the namespace lab
and the VM pair from drifting apart: both fill the same ``@NAME@`` placeholders.
"""

from __future__ import annotations

import re
from pathlib import Path

from iqn_ctl.errors import IqnError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


class TemplateError(IqnError):
    """A template was rendered with a placeholder left unfilled."""


def render(name: str, **values: object) -> str:
    """Fill every ``@KEY@`` of template ``name``; a missing key is an error."""
    text = (TEMPLATE_DIR / name).read_text(encoding="utf-8")

    def fill(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            raise TemplateError(f"template {name}: no value for @{key}@")
        return str(values[key])

    return _PLACEHOLDER.sub(fill, text)


def env_file(name: str) -> dict[str, str]:
    """Read a ``KEY=value`` file (as the VM scripts source it)."""
    out: dict[str, str] = {}
    for line in (TEMPLATE_DIR / name).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out
