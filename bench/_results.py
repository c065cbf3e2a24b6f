"""Shared by every benchmark: replace (or append) one ``## Section`` of
bench/RESULTS.md, so each bench owns its section and reruns stay idempotent."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(section: str, body: str, path: Path = RESULTS) -> None:
    """``body`` starts with the ``section`` heading line."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(section + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + body
    else:
        nxt = old.find("\n## ", start + len(section))
        new = old[:start] + body.rstrip("\n") + "\n" + (old[nxt:] if nxt >= 0 else "")
    path.write_text(new)
    print(f"\nwrote the '{section}' section of {path}")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the machine line of a section; "?" if none."""
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
