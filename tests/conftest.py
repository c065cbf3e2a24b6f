"""Shared test plumbing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "paper"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, why: str) -> None:
    """Skip when a capability is missing on a developer box; fail in CI, where
    every test must run for real."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must run this test but: {why}")
    pytest.skip(why)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root")


@pytest.fixture
def cli_python() -> list[str]:
    """Run the CLI as a user would, in a subprocess of this interpreter."""
    return [sys.executable, "-m", "iqn_ctl"]
