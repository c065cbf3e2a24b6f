"""The shared CLI wrapper: a Ctrl-C ends as exit 130 even when Python wrapped it
(a KeyboardInterrupt raised inside an import surfaces as a RuntimeError whose
cause is the interrupt), and other bugs still show their traceback."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import typer
from iqn_ctl.clikit import friendly_for, make_app
app = make_app("t", "test")
friendly = friendly_for("t")

@app.command()
@friendly
def run(kind: str) -> None:
    if kind == "wrapped":
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from e
    if kind == "plain":
        raise KeyboardInterrupt
    raise RuntimeError("a real bug")

@app.command()
def other() -> None:
    pass

app()
"""


def _run(kind: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT, "run", kind], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_interrupt_wrapped_by_an_import_is_exit_130_without_traceback() -> None:
    for kind in ("wrapped", "plain"):
        r = _run(kind)
        assert r.returncode == 130, (kind, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr


def test_a_real_bug_still_shows_its_traceback() -> None:
    r = _run("bug")
    assert r.returncode == 1, r.stderr
    assert "Traceback" in r.stderr and "a real bug" in r.stderr
