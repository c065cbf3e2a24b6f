"""The agent on layer-3 devices over the lab's real OpenVPN tunnel (issue 18
part 2): a signal from the OTT namespace crosses the router (NAT) and the
tunnel; three agents record it at once:

- on the router's OTT-facing veth (Ethernet, XDP): the reference;
- on the client's tun device (ARPHRD_NONE: frames start at the IP header),
  ``--hook auto``: generic XDP, the layer-3 parser;
- on the router's tun device, ``--direction egress``: server-to-client traffic
  leaves the router by the tunnel, where XDP cannot see it; the TC egress hook
  does.

Each stall must match the signal actually sent as closely as the Ethernet
agent's does. The agents run with the forgery guard's pairing on (the
default): while the signal runs, the client keeps sending datagrams to the
server on the flow (as a QUIC client's requests and ACKs do), which each agent's
pairing classifier sees in the other direction (the Ethernet and client-tun
agents: TC egress; the router-tun agent, which watches egress: TC ingress).
(TC ingress on a layer-3 device is held to the classifier by
tests/test_hook_classify.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_agent_live import LEAD, STALL, P, burst_times, need_xdp, poll_until, settled, stop, wait_ready
from test_lab import lab_prefix, need_lab_tools

from iqn_ctl.live.api import request, sock_path
from iqn_lab import topology as T
from iqn_lab.testbed import IQN_CTL, PY

SENDER = str(Path(__file__).resolve().parents[1] / "iqn_lab" / "testbed.py")
CLIENT_PORT = 40041
#: the signal's server: an address of its own in the lab's OTT namespace (the
#: OTT emulator holds UDP 443 on www and media)
SERVER = "198.19.0.9"

# Learn the NAT's address and port for the client's flow: the router forwards
# server-to-client packets only for a connection the client opened (nftables,
# ct state established), as a real QUIC server's answers are.
LISTEN = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(({SERVER!r}, 443))
print("ready", flush=True)
s.settimeout(60)
_, peer = s.recvfrom(2048)
print(f"{{peer[0]}} {{peer[1]}}", flush=True)
"""

# The client's side of the flow while the signal runs (requests/ACKs): what
# the agents' pairing needs; a datagram every 20 ms, for at most a minute.
TALK = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
end = time.monotonic() + 60
s.sendto(b"req", (sys.argv[3], 443))
print("ready", flush=True)
while time.monotonic() < end:
    time.sleep(0.02)
    s.sendto(b"req", (sys.argv[3], 443))
"""


@pytest.fixture(scope="module")
def tunnel_lab() -> Iterator[Any]:
    need_lab_tools()
    need_xdp()
    from iqn_lab.lab import Lab

    lab = Lab(lab_prefix("hk"))
    try:
        lab.up()
        lab.exec("ott", ["ip", "addr", "add", f"{SERVER}/{T.OTT_PLEN}", "dev", lab.names.ott_if], check=True)
        yield lab
    finally:
        lab.down()


def _client_addr(lab: Any) -> str:
    out = lab.exec("client", ["ip", "-j", "-4", "addr", "show", "dev", lab.names.client_tun],
                   capture_output=True, text=True, check=True).stdout
    return str(json.loads(out)[0]["addr_info"][0]["local"])


def _nat_peer(lab: Any, client: str) -> tuple[str, int]:
    """Open the client's flow (one datagram to the server) and return where the
    server must answer: the router's masquerade address and port."""
    listener = lab.popen("ott", [PY, "-c", LISTEN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert listener.stdout.readline().strip() == "ready", listener.stderr.read()
        hello = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                 f"s.bind(({client!r}, {CLIENT_PORT})); s.sendto(b'hi', ({SERVER!r}, 443))")
        lab.exec("client", [PY, "-c", hello], check=True, timeout=30)
        addr, port = listener.stdout.readline().split()
        return addr, int(port)
    finally:
        stop(listener)


def _agent(lab: Any, role: str, iface: str, base: Path, env: dict[str, str], *extra: str) -> Any:
    return lab.popen(role, [IQN_CTL, "attach", iface, "--state-dir", str(base / iface), *extra],
                     env=env, stderr=subprocess.PIPE, text=True)


def _signal(lab: Any, client: str, seed: int) -> dict[str, Any]:
    """Open the client's flow, then send a signal on it at once: an unanswered
    UDP flow leaves the router's connection table after 30 s."""
    peer = _nat_peer(lab, client)
    plan = burst_times(0.0, seed)
    spec = {"lead": LEAD, "flows": [{"name": "x", "src": SERVER, "dst": peer[0], "dport": peer[1],
                                      "frame": 1250, "times": plan}]}
    talker = lab.popen("client", [PY, "-c", TALK, client, str(CLIENT_PORT), SERVER],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert talker.stdout.readline().strip() == "ready", talker.stderr.read()
        r = lab.exec("ott", [PY, SENDER, "send", json.dumps(spec)], capture_output=True, text=True,
                     timeout=60)
    finally:
        stop(talker)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    return {"sent": got["sent"]["x"], "plan": plan, "t0": got["t0"], "peer": peer}


def _stall(sock: Path, state: Path, sig: dict[str, Any]) -> dict[str, Any]:
    """The agent's stall for this signal (from its history), checked to be the
    only one; returns its start and duration errors against the signal actually
    sent (the sender may run late on a loaded box: its observed lag counts)."""
    sent, plan = sig["sent"], sig["plan"]
    st = poll_until(lambda: request(sock, "status"),
                    lambda s: settled(len(sent))(s) and s["stalls_ended"] >= 1)
    assert st["candidates"] == len(sent) and st["lost"] == 0 and st["stalls_ended"] == 1, st
    out = subprocess.run([IQN_CTL, "stalls", "--json", "--state-dir", str(state), "--since", str(sent[0])],
                         capture_output=True, text=True, check=True).stdout
    (rec,) = [json.loads(x) for x in out.splitlines()]
    lag_first = sent[0] - (sig["t0"] + plan[0])
    lag_last = sent[-1] - (sig["t0"] + plan[-1])
    return {"status": st, "rec": rec, "start_err": rec["start"] - (sent[0] - P),
            "dur_err": rec["duration"] - (STALL + lag_last - lag_first)}


def _check(res: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    """As accurate as the Ethernet agent: both within the live tests' bounds
    (start 0.1 s, duration 0.3 s) and within 0.1 s of each other."""
    for r in (res, ref):
        assert abs(r["start_err"]) < 0.1 and abs(r["dur_err"]) < 0.3, (what, r["rec"])
    assert abs(res["rec"]["start"] - ref["rec"]["start"]) < 0.1, (what, res["rec"], ref["rec"])
    assert abs(res["rec"]["duration"] - ref["rec"]["duration"]) < 0.1, (what, res["rec"], ref["rec"])


def test_agents_on_tun_devices_over_openvpn(tunnel_lab: Any, tmp_path: Path) -> None:
    lab = tunnel_lab
    n = lab.names
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    run = tmp_path / "run"
    client = _client_addr(lab)
    agents = {
        "eth": _agent(lab, "router", n.router_ott_if, tmp_path, env),
        "ctun": _agent(lab, "client", n.client_tun, tmp_path, env),
        "rtun": _agent(lab, "router", n.router_tun, tmp_path, env, "--direction", "egress"),
    }
    iface = {"eth": n.router_ott_if, "ctun": n.client_tun, "rtun": n.router_tun}
    try:
        for k, a in agents.items():
            wait_ready(sock_path(run, iface[k]), a)
        sig = _signal(lab, client, seed=31)
        peer = sig["peer"]
        settle = {k: poll_until(lambda k=k: request(sock_path(run, iface[k]), "status"),  # type: ignore[misc]
                                settled(len(sig["sent"]))) for k in agents}
        seen = {k: (st["packets"], st["candidates"], st["stalls_ended"]) for k, st in settle.items()}
        assert all(c == len(sig["sent"]) for _, c, _ in seen.values()), seen
        # every agent paired the signal with the client's datagrams, seen the other way
        for k, st in settle.items():
            assert st["pairing"] == "on" and st["unpaired"] == 0 and st["client_packets"] > 0, (k, st)
        res = {k: _stall(sock_path(run, iface[k]), tmp_path / iface[k], sig) for k in agents}
        hooks = {k: (r["status"]["hook"], r["status"]["xdp_mode"], r["status"]["direction"],
                     r["status"]["link"]) for k, r in res.items()}
        assert hooks == {"eth": ("xdp", "native", "ingress", "ethernet"),
                         "ctun": ("xdp", "skb", "ingress", "l3"),
                         "rtun": ("tc", "", "egress", "l3")}
        assert res["ctun"]["status"]["dev_type"] == "none" and res["ctun"]["status"]["arphrd"] == 65534
        # the tunnel's agents name the client by its tunnel address, the router's by the NAT's
        assert res["eth"]["rec"]["flow"] == f"{SERVER}:443>{peer[0]}:{peer[1]}"
        tunnelled = f"{SERVER}:443>{client}:{CLIENT_PORT}"
        assert res["ctun"]["rec"]["flow"] == res["rtun"]["rec"]["flow"] == tunnelled
        _check(res["ctun"], res["eth"], "client tun, XDP")
        _check(res["rtun"], res["eth"], "router tun, TC egress")
    finally:
        for a in agents.values():
            stop(a)

