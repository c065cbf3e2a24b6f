"""``iqn-qos synth``: synthetic media lines with known faults (see :mod:`iqn_qos.synth`).

Kept apart from :mod:`iqn_qos.cli` (which calls :func:`register`) so the
generator's options live beside the generator.  Writes media lines as JSON
lines (the input contract) to stdout or ``--out``, the topology it used to
``--topology-out`` and the ground truth to ``--truth-out``: one JSON line per
slot and component on a line, ``{"slot", "component", "p", "injected"}``.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import IO

import typer

from .errors import QosError
from .friendly import friendly
from .lines import to_json
from .synth import SCENARIOS, T0, iter_slots, topology_json, truth_rows


def _open(path: Path, stack: ExitStack) -> IO[str]:
    try:
        return stack.enter_context(path.open("w"))
    except OSError as e:
        raise QosError(f"{path}: {e.strerror}") from None


def synth(
    scenario: str = typer.Option("healthy", "--scenario", help=f"one of: {', '.join(SCENARIOS)}"),
    slots: int = typer.Option(4, "--slots", help="number of slots"),
    slot: int = typer.Option(900, "--slot", help="slot length, seconds"),
    lines_per_slot: int = typer.Option(5000, "--lines-per-slot", help="media lines per slot"),
    components: int = typer.Option(4000, "--components", help="size of the enterprise (about)"),
    seed: int = typer.Option(0, "--seed", help="random seed: same seed, same lines"),
    k: int = typer.Option(3, "-k", help="faulty components for --scenario random-k"),
    start: int = typer.Option(T0, "--start", help="epoch of the first slot (a midnight)"),
    addresses: bool = typer.Option(False, "--addresses", help="also give each line client/server addresses"),
    out: Path | None = typer.Option(None, "--out", help="media lines file (default: stdout)"),
    topology_out: Path | None = typer.Option(None, "--topology-out", help="write the topology (JSON)"),
    truth_out: Path | None = typer.Option(None, "--truth-out", help="write the ground truth (JSON lines)"),
) -> None:
    """Synthetic media lines from an enterprise with injected faults (tests, benchmarks)."""
    world, _faults, it = iter_slots(
        scenario, slots=slots, slot_s=slot, lines_per_slot=lines_per_slot, components=components,
        seed=seed, k=k, t0=start, addresses=addresses,
    )
    with ExitStack() as stack:
        dest = _open(out, stack) if out is not None else sys.stdout
        truth = _open(truth_out, stack) if truth_out is not None else None
        if topology_out is not None:
            json.dump(topology_json(world), _open(topology_out, stack))
        for s in it:
            dest.write("".join(to_json(ln) + "\n" for ln in s.lines))
            if truth is not None:
                truth.write("".join(json.dumps(r) + "\n" for r in truth_rows(s)))
        dest.flush()


def register(app: typer.Typer) -> None:
    """Add the ``synth`` command to ``app`` (the ``iqn-qos`` app of :mod:`iqn_qos.cli`).

    This module does not import :mod:`iqn_qos.cli` (no import cycle); it maps
    its errors the same way.
    """
    app.command("synth")(friendly(synth))
