"""What ``--version`` prints for ``iqn-ctl``, ``iqn-lab`` and ``iqn-qos``: the installed
package's version (from its metadata, so a wheel, the .deb's venv and an
editable checkout all answer) and, when the code runs from a git checkout, the
commit it was built from (``-dirty`` with local changes), so an operator
reporting a problem can say exactly what runs.

``user_agent/version.py`` is its twin: the end-user agent imports nothing of
the project (docs/architecture.md).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
from pathlib import Path

#: the distribution name in pyproject.toml
DIST = "iqn"
#: the checkout this module would be part of (``<root>/iqn_common/version.py``)
ROOT = Path(__file__).resolve().parents[1]


def package_version() -> str:
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:  # run from a tree that was never installed
        return "unknown"


def git_commit(root: Path = ROOT) -> str | None:
    """The checkout's commit (12 hex digits, ``-dirty`` if changed), or None
    outside a checkout, without git, or when git cannot answer quickly. The
    checkout may belong to another user than the one asking (the service runs
    as ``iqn``): it is only read, so git is told to trust it."""
    git = shutil.which("git")
    if git is None or not (root / ".git").exists():
        return None
    try:
        r = subprocess.run(
            [git, "-c", f"safe.directory={root}", "-C", str(root), "describe", "--always", "--dirty",
             "--abbrev=12", "--exclude", "*"],
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    out = r.stdout.strip()
    return out if r.returncode == 0 and out else None


def version_line(prog: str) -> str:
    """``iqn-ctl 0.1.0`` or ``iqn-ctl 0.1.0 (git 0123456789ab)``."""
    commit = git_commit()
    return f"{prog} {package_version()}" + (f" (git {commit})" if commit else "")
