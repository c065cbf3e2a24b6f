"""The agent's unix-socket API: round trips, errors, and root-only access."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import need, need_root

from iqn_ctl.live.api import ApiError, ApiServer, NoAgent, RawJson, agent_sockets, request, sock_path


def handler(req: dict[str, Any]) -> Any:
    if req["cmd"] == "echo":
        return {"got": req.get("x")}
    if req["cmd"] == "raw":
        return RawJson(b'[{"flow": "a", "state": "stall"}]')
    if req["cmd"] == "boom":
        raise RuntimeError("kaput")
    raise ApiError(f"unknown request {req['cmd']!r}")


@pytest.fixture
def server(tmp_path: Path):
    srv = ApiServer(sock_path(tmp_path / "run", "eth9"), handler).start()
    try:
        yield srv
    finally:
        srv.close()


def test_round_trip_and_modes(server: ApiServer) -> None:
    assert request(server.path, "echo", x=[1, "a"]) == {"got": [1, "a"]}
    assert request(server.path, "raw") == [{"flow": "a", "state": "stall"}]  # pre-serialised answer
    big = "x" * 200_000
    with pytest.raises(ApiError, match="request too large"):
        request(server.path, "echo", x=big)
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700
    assert agent_sockets(server.path.parent) == [("eth9", server.path)]


def test_errors_are_messages(server: ApiServer) -> None:
    with pytest.raises(ApiError, match="unknown request 'nope'"):
        request(server.path, "nope")
    with pytest.raises(ApiError, match="internal error: RuntimeError: kaput"):
        request(server.path, "boom")
    # the server survives both
    assert request(server.path, "echo", x=1) == {"got": 1}


def test_no_agent_and_stale_socket(tmp_path: Path) -> None:
    with pytest.raises(NoAgent, match="no agent socket"):
        request(tmp_path / "x.sock", "status")
    srv = ApiServer(tmp_path / "run" / "y.sock", handler)  # bound, never served...
    srv._sock.close()  # ...and its process "died": the file stays behind
    with pytest.raises(NoAgent, match="stale"):
        request(srv.path, "status")
    assert agent_sockets(tmp_path / "absent") == []
    # a new server replaces the stale file
    srv2 = ApiServer(srv.path, handler).start()
    try:
        assert request(srv2.path, "echo", x=2) == {"got": 2}
    finally:
        srv2.close()
    assert not srv2.path.exists()


def test_refuses_non_root_peer_even_if_chmodded(server: ApiServer) -> None:
    """Defence in depth: with the directory and socket opened up by mistake, an
    unprivileged client still gets a refusal (SO_PEERCRED)."""
    need_root()
    need(subprocess.run(["which", "setpriv"], capture_output=True).returncode == 0, "needs setpriv")
    os.chmod(server.path.parent, 0o755)
    os.chmod(server.path, 0o666)
    for parent in server.path.parents:  # pytest's tmp dirs are 0700
        if str(parent) in ("/", "/tmp"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o055)
    root = str(Path(__file__).resolve().parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {root!r}); from pathlib import Path\n"
        "from iqn_ctl.live.api import request, ApiError\n"
        f"try:\n    request(Path({str(server.path)!r}), 'echo', x=1)\nexcept ApiError as e:\n    print(e)"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30,
    )
    assert "permission denied: the IQN API is for root only" in out.stdout, out.stderr
