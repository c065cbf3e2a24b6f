"""The OTT emulator as a lab daemon: one service's page host and media host as two processes.

Why two (measured in the localisation lab): on a busy machine one process for
both let the media connections' packets delay the answers to the toggles, which
then left in batches, not one candidate packet each (60 of 337 answers in the
band). The certificate is the lab's ``ott.crt`` / ``ott.key`` in its state dir.
"""

from __future__ import annotations

import sys
from pathlib import Path

from iqn_lab import procs
from iqn_lab.topology import MEDIA_HOST, WWW_HOST


def spawn_service(state: Path, name: str, ns: str, media_dir: Path, www: str, media: str,
                  requests: str | None = None) -> list[str]:
    """Start ``NAME-www`` and ``NAME-media`` in ``ns``, serving ``www.iqn.test`` at
    ``www`` and ``media.iqn.test`` at ``media``; each writes ``state/<daemon>.ready``
    once it listens. ``requests``: log each request to ``state/<requests>-<www|media>.jsonl``.
    Returns the two daemon names (for :func:`iqn_lab.procs.wait_ready`)."""
    names = []
    for hosts in ("www", "media"):
        daemon = f"{name}-{hosts}"
        argv = [sys.executable, "-m", "iqn_lab.ott.server", "--cert", str(state / "ott.crt"),
                "--key", str(state / "ott.key"), "--media-dir", str(media_dir),
                "--www-host", WWW_HOST, "--media-host", MEDIA_HOST, "--www-addr", www,
                "--media-addr", media, "--hosts", hosts]
        if requests is not None:
            argv += ["--log", str(state / f"{requests}-{hosts}.jsonl")]
        argv += ["--ready", str(state / f"{daemon}.ready")]
        procs.spawn(state, daemon, argv, ns=ns)
        names.append(daemon)
    return names


def all_ready(state: Path, daemons: list[str]) -> bool:
    """Every one of ``daemons`` has written its ready file."""
    return all((state / f"{d}.ready").exists() for d in daemons)
