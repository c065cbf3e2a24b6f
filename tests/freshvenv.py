"""A wheel of this checkout installed into a fresh venv without system site
packages: what a user's `pip install` gets, for the install-footprint tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

#: what a wheel build must not copy (venvs, caches, results, the paper data)
SKIP = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build", "dist", "data",
                              "results", ".*_cache", ".hypothesis")  # fmt: skip


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]


def wheel_and_venv(work: Path) -> tuple[Path, Path]:
    """Build this checkout's wheel in ``work/dist`` and an empty venv in
    ``work/venv`` (no system site packages: nothing of Debian's leaks in)."""
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "-w", str(work / "dist"), str(src)], cwd=work)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (wheel,) = (work / "dist").glob("iqn-*.whl")
    venv = work / "venv"
    r = run(["/usr/bin/python3", "-m", "venv", str(venv)])
    assert r.returncode == 0, r.stderr
    return wheel, venv
