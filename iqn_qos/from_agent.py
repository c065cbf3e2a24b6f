"""Media lines from the ISP agent's history: ``iqn-qos from-agent STATE_DIR``.

The IQN agent (``iqn-ctl attach``) writes, per client that signals and per
slot, how long the client watched and how long it stalled to the ``sessions``
table of its SQLite history (docs/qos.md, "From the ISP agent"). One row is one
media line: a unit is one second of playback, a bad unit a stalled second, so
``n = round(watched_s)``, ``m = n - round(stalled_s)``, ``t`` the slot's start.

``iqn_qos`` does not import ``iqn_ctl``: the table's documented shape (record
version :data:`RECORD_VERSION`) is the whole contract, read with ``sqlite3``
through a read-only URI, so this never writes to (or creates) the agent's file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from .errors import QosError
from .ingest import session_line
from .lines import MediaLine
from .topology import Topology

#: the agent's history file inside its state dir
DB_NAME = "stalls.sqlite"
#: the newest record version this reader understands
RECORD_VERSION = 1
_COLUMNS = ("id", "v", "router", "client", "server", "slot", "watched_s", "stalled_s")


def history_file(state: Path) -> Path:
    """The history file: ``STATE_DIR/stalls.sqlite``, or the file itself when given one."""
    return state / DB_NAME if state.is_dir() else state


def _open(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise QosError(f"{path}: no IQN agent history here (see 'iqn-ctl attach --state-dir')")
    if not path.is_file():
        raise QosError(f"{path}: not a file")
    try:
        # as_uri() percent-encodes the path: a raw '?' or '#' would end the file name early
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=10.0)
        have = {str(r[1]) for r in db.execute("PRAGMA table_info(sessions)")}
    except sqlite3.Error as e:
        raise QosError(f"{path}: cannot read the IQN agent history ({e})") from None
    missing = [c for c in _COLUMNS if c not in have]
    if not have:
        db.close()
        raise QosError(f"{path}: no sessions table (written by an agent that records no watched time; "
                       "upgrade the agent and let it run for a slot)")
    if missing:
        db.close()
        raise QosError(f"{path}: sessions table lacks {', '.join(missing)}: not an IQN agent history")
    return db


def read_sessions(
    state: Path, router: str | None = None, topology: Topology | None = None
) -> Iterator[MediaLine]:
    """One media line per sessions row with at least one watched second, oldest slot first.
    ``router`` replaces the router id the agent recorded (its host name)."""
    path = history_file(state)
    db = _open(path)
    try:
        rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM sessions ORDER BY slot, id").fetchall()
    except sqlite3.Error as e:
        raise QosError(f"{path}: cannot read the sessions table ({e})") from None
    finally:
        db.close()
    for rid, v, rtr, client, server, slot, watched, stalled in rows:
        where = f"{path}: sessions row {rid}"
        if not isinstance(v, int) or v > RECORD_VERSION:
            raise QosError(f"{where}: record version {v!r} is newer than this iqn-qos reads "
                           f"({RECORD_VERSION}); upgrade iqn-qos")
        try:
            line = session_line(router if router is not None else str(rtr), str(client), str(server),
                                slot, watched, stalled, topology)
        except QosError as e:
            raise QosError(f"{where}: {e}") from None
        if line is not None:
            yield line

