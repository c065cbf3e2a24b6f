"""A lab of its own, driven through the ``iqn-lab`` command: traffic reaches
the OTT only through the tunnel, and ``down`` leaves nothing behind, even
after the state directory (pid files) was lost in a crash."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from iqn_lab import netns
from tests.test_lab import lab_prefix, need_lab_tools, wait_for


def iqn_lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iqn_lab.cli", *args], capture_output=True, text=True)


def leftovers(prefix: str) -> list[str]:
    found = [f"netns {n}" for n in netns.names() if n.startswith(prefix + "-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link {w}" for w in links.split() if w.startswith(prefix + "-")]
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if f"/{prefix}/" in cmd or f"{prefix}-router" in cmd:
                found.append(f"process {pid}: {cmd.replace(chr(0), ' ')[:80]}")
    if Path("/run/iqn-lab", prefix).exists():
        found.append("state directory")
    return found


def test_tunnel_only_then_down_leaves_nothing_even_after_a_crash() -> None:
    need_lab_tools()
    from iqn_lab import topology as T
    from iqn_lab.capture import ICMP, Capture
    from iqn_lab.lab import Lab

    prefix = lab_prefix("lc")
    lab = Lab(prefix)
    try:
        r = iqn_lab("up", "--prefix", prefix, "--rate", "1mbit")
        assert r.returncode == 0, r.stderr
        assert f"lab {prefix} up in" in r.stdout and f"{prefix}-r1" in r.stdout
        assert lab.rate() == 1_000_000

        def ping() -> int:
            return lab.exec("client", ["ping", "-c", "2", "-i", "0.2", "-W", "1", T.OTT_WWW],
                            capture_output=True).returncode  # fmt: skip

        # Through the tunnel: the access link carries only OpenVPN's UDP.
        with Capture(lab.router_ns, f"{prefix}-r0") as access:
            assert ping() == 0
        assert access.frames and all(f.proto == 17 and 1194 in (f.sport, f.dport) for f in access.frames)

        # Stop the tunnel: the client's packets go out unencrypted and the router drops them.
        openvpn_client = lab.health().daemons["openvpn-client"]
        assert openvpn_client is not None
        os.kill(openvpn_client, signal.SIGTERM)
        wait_for(lambda: not lab.health().tunnel, 10, "the tunnel to go down")
        with Capture(lab.router_ns, f"{prefix}-r0") as access, Capture(lab.router_ns, f"{prefix}-r1") as ott:
            assert ping() != 0
            time.sleep(0.2)
        assert any(f.proto == ICMP and f.dst == T.OTT_WWW for f in access.frames)  # it did try
        assert not [f for f in ott.frames if f.proto == ICMP]  # nothing reached the OTT side

        # `up` repairs a broken lab.
        r = iqn_lab("up", "--prefix", prefix, "--schedule", "0:2mbit,600:none")
        assert r.returncode == 0, r.stderr
        assert lab.health().up and ping() == 0
        wait_for(lambda: lab.rate() == 2_000_000, 10, "the schedule's first step")

        # Crash: the state directory with the pid files is gone, daemons and the
        # schedule runner still run.
        shutil.rmtree(f"/run/iqn-lab/{prefix}")
        assert any(n.startswith(prefix) for n in netns.names())
        r = iqn_lab("down", "--prefix", prefix)
        assert r.returncode == 0, r.stderr
        assert leftovers(prefix) == []
        r = iqn_lab("down", "--prefix", prefix)  # twice is fine
        assert r.returncode == 0 and "nothing to do" in r.stdout
        r = iqn_lab("status", "--prefix", prefix)
        assert r.returncode == 0 and "down" in r.stdout
    finally:
        lab.down()
    assert leftovers(prefix) == []
