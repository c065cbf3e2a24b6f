"""One agent process on two real veths, from a config file: one ``/metrics``
with both interfaces as labels, one API socket, and the attach watchdog.

One ``iqn-ctl attach --config FILE`` (no interface on the command line: the
file's two ``[interfaces.NAME]`` sections) runs for the whole module, in the
client namespace of a testbed to which a second veth pair is added. The
tests run in order on it, each changing what the previous left:

1. a signal on each interface: a stall on each, both in one scrape, in
   ``status`` and ``flows``, with the ``--interface`` filter;
2. a foreign XDP program replaces ours on A (no --force): the watchdog says
   ``replaced``, puts IQN at TC ingress beside it, and A sees stalls again;
   on B (``force = true`` in its section) it replaces the foreign program;
3. B is deleted (``gone``) and created again: attached again, stalls again;
4. ``iqn-ctl detach B`` stops B only: A goes on.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_agent_live import DEADLINE, LEAD, burst_times, need_xdp, poll_until, stop, wait_ready

from iqn_ctl.live.api import ApiError, request, sock_path
from iqn_lab.testbed import PY, sh
from iqn_lab.testbed import Testbed as Lab


def add_pair(lab: Lab, srv_if: str, cli_if: str, net: str) -> dict[str, str]:
    """A second veth pair between the testbed's namespaces, on ``net``.0/24 (what
    Testbed does for its own pair); returns what a sender spec needs."""
    sh("ip", "link", "add", srv_if, "netns", lab.srv_ns, "type", "veth", "peer", "name", cli_if,
       "netns", lab.cli_ns)
    srv, cli = f"{net}.1", f"{net}.2"
    sh("ip", "-n", lab.srv_ns, "addr", "add", f"{srv}/24", "dev", srv_if)
    sh("ip", "-n", lab.cli_ns, "addr", "add", f"{cli}/24", "dev", cli_if)
    for ns, dev in ((lab.srv_ns, srv_if), (lab.cli_ns, cli_if)):
        sh("ip", "-n", ns, "link", "set", dev, "up")
    cli_mac, srv_mac = lab.mac(lab.cli_ns, cli_if), lab.mac(lab.srv_ns, srv_if)
    sh("ip", "-n", lab.srv_ns, "neigh", "replace", cli, "lladdr", cli_mac, "dev", srv_if, "nud", "permanent")
    return {"dev": srv_if, "cli_dev": cli_if, "src_mac": srv_mac, "dst_mac": cli_mac, "srv": srv, "cli": cli}


def xdp_name(lab: Lab, dev: str) -> str | None:
    out = sh("ip", "-n", lab.cli_ns, "-j", "-d", "link", "show", "dev", dev).stdout
    xdp = json.loads(out)[0].get("xdp")
    return str(((xdp.get("attached") or [xdp])[0]).get("prog", {}).get("name", "?")) if xdp else None


def foreign_xdp(lab: Lab, dev: str, stays: bool = True) -> None:
    """Another tool's XDP program put on ``dev`` in the mode ours has (native on a
    veth), replacing ours as ``ip link set dev X xdp obj ...`` would (``stays``:
    check it is there; with --force the watchdog may have replaced it already)."""
    load = ("from bcc import BPF; b = BPF(text='int other_prog(struct xdp_md *c) { return XDP_PASS; }');"
            f"BPF.attach_xdp({dev!r}, b.load_func('other_prog', BPF.XDP), 0)")
    subprocess.run(["ip", "netns", "exec", lab.cli_ns, PY, "-c", load], check=True, capture_output=True,
                   timeout=120)
    if stays:
        assert xdp_name(lab, dev) == "other_prog"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need_xdp()
    base = tmp_path_factory.mktemp("multi")
    run = base / "run"
    env = dict(os.environ, IQN_RUN_DIR=str(run))
    port = random.randrange(20000, 60000)
    with Lab() as lab:
        n = int(lab.srv4.split(".")[2])
        a = {"dev": lab.srv_if, "cli_dev": lab.cli_if, "src_mac": lab.srv_mac, "dst_mac": lab.cli_mac,
             "srv": lab.srv4, "cli": lab.cli4}
        b = add_pair(lab, lab.prefix + "T", lab.prefix + "D", f"198.19.{n}")
        cfg = base / "iqn.toml"
        cfg.write_text(
            "# the agent of both interfaces, one process\n"
            f"[global]\nmetrics-port = {port}\nstate-dir = \"{base / 'state'}\"\nwatchdog = 0.2\n"
            f"[interfaces.{lab.cli_if}]\n"
            f"[interfaces.{b['cli_dev']}]\nforce = true\n")
        proc = subprocess.Popen(lab.agent_cmd("attach", "--config", str(cfg)), env=env,
                                stderr=subprocess.PIPE, text=True)
        try:
            for dev in (lab.cli_if, b["cli_dev"]):
                wait_ready(sock_path(run, dev), proc)
            yield {"lab": lab, "a": a, "b": b, "run": run, "env": env, "port": port, "proc": proc,
                   "state": base / "state", "net_b": f"198.19.{n}"}
        finally:
            err = stop(proc)
            sys.stderr.write(err[-4000:])


def status(ag: dict[str, Any], dev: str) -> dict[str, Any]:
    return dict(request(sock_path(ag["run"], dev), "status", iface=dev))


def cli(ag: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ag["lab"].agent_cmd(*args), env=ag["env"], capture_output=True, text=True,
                          timeout=120)


def signal_on(ag: dict[str, Any], side: dict[str, str], dport: int, seed: int) -> subprocess.Popen[str]:
    return ag["lab"].send({**{k: side[k] for k in ("dev", "cli_dev", "src_mac", "dst_mac")}, "lead": LEAD,
                           "flows": [{"name": "x", "src": side["srv"], "dst": side["cli"], "dport": dport,
                                      "frame": 1250, "times": burst_times(0.0, seed)}]})


def one_stall(ag: dict[str, Any], side: dict[str, str], dport: int, seed: int) -> dict[str, Any]:
    """Send one signal on ``side``, wait until its agent ended one more stall and
    check it was exactly one; returns the last status."""
    dev = side["cli_dev"]
    before = status(ag, dev)["stalls_ended"]
    out, err = signal_on(ag, side, dport, seed).communicate(timeout=60)
    assert out, err
    st = poll_until(lambda: status(ag, dev),
                    lambda st: st["stalls_ended"] > before and not st["flows_in_stall"])
    assert st["stalls_ended"] == before + 1, (before, st)
    return st


def scrape(ag: dict[str, Any]) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ag["lab"].cli_ns, PY, "-c",
         f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{ag['port']}/metrics')"
         ".read().decode())"], capture_output=True, text=True, timeout=30, check=True).stdout


def series(text: str, name: str) -> dict[str, float]:
    """``name{labels} value`` lines of a scrape: labels -> value."""
    return {ln.split(" ")[0][len(name):]: float(ln.split(" ")[1])
            for ln in text.splitlines() if ln.startswith(name + "{")}


def test_two_interfaces_one_process_one_metrics(agent: dict[str, Any]) -> None:
    ag = agent
    a, b = ag["a"]["cli_dev"], ag["b"]["cli_dev"]
    sa, sb = signal_on(ag, ag["a"], 40001, 1), signal_on(ag, ag["b"], 40002, 2)
    for s in (sa, sb):
        out, err = s.communicate(timeout=60)
        assert out, err
    for dev in (a, b):
        st = poll_until(lambda d=dev: status(ag, d),
                        lambda st: st["stalls_ended"] >= 1 and not st["flows_in_stall"])
        assert st["stalls_ended"] == 1 and st["iface"] == dev, st
        assert st["attach_state"] == "attached" and st["interfaces"] == [a, b], st
    assert status(ag, a)["pid"] == status(ag, b)["pid"]  # one process
    both = request(sock_path(ag["run"], b), "agents")  # every interface through either name
    assert [x["iface"] for x in both] == [a, b]
    assert request(sock_path(ag["run"], a), "ping")["interfaces"] == [a, b]
    text = scrape(ag)
    ended = series(text, "iqn_stalls_ended_total")
    assert ended == {f'{{iface="{a}"}}': 1.0, f'{{iface="{b}"}}': 1.0}, ended
    state = series(text, "iqn_attach_state")
    assert state[f'{{iface="{a}",state="attached"}}'] == state[f'{{iface="{b}",state="attached"}}'] == 1.0
    assert state[f'{{iface="{a}",state="gone"}}'] == 0.0
    for name in ("iqn_stalls_discarded_total", "iqn_late_events_total", "iqn_evicted_flows_total",
                 "iqn_expired_flows_total", "iqn_lost_events_total"):
        assert set(series(text, name)) == {f'{{iface="{a}"}}', f'{{iface="{b}"}}'}, name
    assert len(series(text, "iqn_build_info")) == 1
    assert text.count("# TYPE iqn_packets_total counter") == 1  # each family once, both interfaces in it
    # status and flows: every interface, or the one asked for
    rows = json.loads(cli(ag, "status", "--json").stdout)
    assert [r["iface"] for r in rows] == sorted([a, b])
    only = json.loads(cli(ag, "status", "--json", "--interface", b).stdout)
    assert [r["iface"] for r in only] == [b]
    flows = json.loads(cli(ag, "flows", "--json").stdout)
    assert sorted({f["iface"] for f in flows}) == sorted([a, b])
    flows_b = json.loads(cli(ag, "flows", "--json", "--interface", b).stdout)
    assert flows_b and {f["iface"] for f in flows_b} == {b}
    assert {f["client"] for f in flows_b} == {ag["b"]["cli"]}
    stalls = [json.loads(x) for x in cli(ag, "stalls", "--json", "--state-dir", str(ag["state"]),
                                         "--interface", a).stdout.splitlines()]
    assert [s["iface"] for s in stalls] == [a]


def test_watchdog_recovers_from_a_foreign_xdp_program(agent: dict[str, Any]) -> None:
    ag = agent
    lab, a, b = ag["lab"], ag["a"]["cli_dev"], ag["b"]["cli_dev"]
    before = status(ag, a)["reattaches"]
    foreign_xdp(lab, a)  # no --force for A: IQN goes beside it, at TC ingress
    st = poll_until(lambda: status(ag, a), lambda st: st["reattaches"] > before)
    assert st["attach_state"] == "attached" and st["hook"] == "tc", st
    assert "replaced by 'other_prog'" in st["attach_note"], st
    assert xdp_name(lab, a) == "other_prog"  # the foreign program stays
    st = one_stall(ag, ag["a"], 40003, 3)
    assert st["hook"] == "tc", st
    assert series(scrape(ag), "iqn_reattaches_total")[f'{{iface="{a}"}}'] >= 1
    # B has force = true in its section: the foreign program is replaced by ours again
    before = status(ag, b)["reattaches"]
    foreign_xdp(lab, b, stays=False)
    st = poll_until(lambda: status(ag, b), lambda st: st["reattaches"] > before)
    assert st["attach_state"] == "attached" and st["hook"] == "xdp", st
    assert "replaced by 'other_prog'" in st["attach_note"], st
    assert xdp_name(lab, b) == "iqn_xdp"
    st = one_stall(ag, ag["b"], 40004, 4)
    assert st["hook"] == "xdp", st


def test_watchdog_reattaches_a_recreated_interface(agent: dict[str, Any]) -> None:
    ag = agent
    lab, b = ag["lab"], ag["b"]
    sh("ip", "-n", lab.cli_ns, "link", "del", b["cli_dev"])  # its peer goes too
    st = poll_until(lambda: status(ag, b["cli_dev"]), lambda st: st["attach_state"] == "gone")
    assert st["attach_state"] == "gone", st
    assert series(scrape(ag), "iqn_attach_state")[f'{{iface="{b["cli_dev"]}",state="gone"}}'] == 1.0
    warn = cli(ag, "status")
    assert f"{b['cli_dev']} is gone" in warn.stderr, warn
    before = st["reattaches"]
    ag["b"] = b = add_pair(lab, b["dev"], b["cli_dev"], ag["net_b"])
    st = poll_until(lambda: status(ag, b["cli_dev"]), lambda st: st["reattaches"] > before)
    assert st["attach_state"] == "attached" and xdp_name(lab, b["cli_dev"]) == "iqn_xdp", st
    st = one_stall(ag, b, 40005, 5)
    assert st["attach_state"] == "attached", st


def test_detach_one_interface_keeps_the_other(agent: dict[str, Any]) -> None:
    ag = agent
    a, b = ag["a"]["cli_dev"], ag["b"]["cli_dev"]
    d = cli(ag, "detach", b)
    assert d.returncode == 0 and "goes on with its other interfaces" in d.stdout, (d.stdout, d.stderr)
    assert xdp_name(ag["lab"], b) is None
    assert not sock_path(ag["run"], b).exists()
    with pytest.raises(ApiError):
        request(sock_path(ag["run"], a), "status", iface=b)
    assert ag["proc"].poll() is None
    rows = json.loads(cli(ag, "status", "--json").stdout)
    assert [r["iface"] for r in rows] == [a] and rows[0]["interfaces"] == [a]
    deadline = time.monotonic() + DEADLINE
    while f'iface="{b}"' in scrape(ag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f'iface="{b}"' not in scrape(ag)
    one_stall(ag, ag["a"], 40006, 6)  # A goes on
