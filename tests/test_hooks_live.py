"""The TC hook live (issue 12 item 5): on a real veth the XDP and the TC entry
see the same frames with the same band length (VLAN tags that the stack moved
into skb->vlan_tci included); ``--hook auto`` takes XDP on a free interface
and TC beside someone else's XDP program; the agent on ``--hook tc`` next to a
foreign XDP program (which stays attached) infers a real signal, says so in
``status`` and the metrics, and ``detach`` removes only IQN's classifier, also
after the agent was SIGKILLed."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from test_agent_live import (
    LEAD,
    STALL,
    P,
    burst_times,
    cli,
    need_xdp,
    poll_until,
    settled,
    stop,
    wait_ready,
)
from test_xdp_prog import FILT, FOREIGN, lab  # noqa: F401  (the lab fixture)

from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import PY
from iqn_lab.testbed import Testbed as Bed

LO, HI = FILT.min_size, FILT.max_size

# Both entries attached at once on the client veth (XDP first, then TC ingress),
# each with its own maps: whatever one records the other must record the same.
BOTH = textwrap.dedent("""
    import json, sys, time
    from iqn_ctl.engine.params import CandidateFilter
    from iqn_ctl.live.datapath import Datapath
    from iqn_ctl.live.layout import decode_key
    iface, want = sys.argv[1], int(sys.argv[2])
    dps = {h: Datapath(iface, CandidateFilter(), hook=h) for h in ("xdp", "tc")}
    modes = {h: dp.attach() for h, dp in dps.items()}
    print(json.dumps(modes), flush=True)
    sys.stdin.readline()  # the sender is done
    got = {h: [] for h in dps}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and min(len(v) for v in got.values()) < want:
        for h, dp in dps.items():
            got[h] += [(decode_key(k).label, int.from_bytes(k[34:36], "big")) for k, _ in dp.poll(50)]
    time.sleep(0.02)  # short bursts still open are read once their gap has passed
    for h, dp in dps.items():
        got[h] += [(decode_key(k).label, int.from_bytes(k[34:36], "big")) for k, _ in dp.poll(100)]
        got[h + "_counters"] = dp.counters()
        dp.close()
    print(json.dumps(got), flush=True)
""")


def test_xdp_and_tc_record_the_same_frames_and_lengths() -> None:
    """Band edges (one byte in and out) untagged and VLAN-tagged, IPv4 and IPv6:
    the TC entry records exactly what XDP records (burst records; each size
    has flows of its own, so a record's client port tells its frame size). A tagged
    frame reaches TC ingress with its tag moved to skb->vlan_tci by the stack
    (skb->len 4 bytes short): without adding it back, 1,289-byte tagged frames
    would count and 1,180-byte ones would not."""
    need_xdp()
    with Bed() as bed:
        sizes = (LO - 1, LO, HI, HI + 1)
        flows: list[dict[str, Any]] = []
        for i, n in enumerate(sizes):
            flows += [
                {"name": f"v4-{n}", "src": bed.srv4, "dst": bed.cli4, "dport": 42000 + i, "frame": n,
                 "times": [0.0, 0.01]},
                {"name": f"v6-{n}", "src": bed.srv6, "dst": bed.cli6, "dport": 42100 + i, "frame": n,
                 "times": [0.0, 0.01]},
                {"name": f"vl-{n}", "src": bed.srv4v, "dst": bed.cli4v, "dport": 42200 + i, "frame": n,
                 "vlan": bed.vlan_id, "times": [0.0, 0.01]},
            ]
        want = 2 * 3 * 2  # in band: 2 sizes x 3 kinds x 2 packets
        both = subprocess.Popen(["ip", "netns", "exec", bed.cli_ns, PY, "-c", BOTH, bed.cli_if, str(want)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            assert both.stdout is not None and both.stdin is not None
            line = both.stdout.readline()
            assert line, both.stderr.read() if both.stderr else ""
            assert json.loads(line) == {"xdp": "native", "tc": "tc"}
            out, err = bed.send({"lead": LEAD, "flows": flows}).communicate(timeout=60)
            assert out, err
            both.stdin.write("go\n")
            both.stdin.flush()
            got = json.loads(both.stdout.readline())
        finally:
            stop(both)
    xdp, tc = sorted(map(tuple, got["xdp"])), sorted(map(tuple, got["tc"]))
    assert xdp == tc
    assert sorted(sizes[dport % 100] for _, dport in xdp) == sorted([LO, HI] * 6)
    vlan = [lab_ for lab_, _ in tc if lab_.startswith(bed.srv4v)]
    assert len(vlan) == 4  # both tagged edges, twice
    assert got["tc_counters"]["parse_errors"] == got["xdp_counters"]["parse_errors"] == 0


# Datagrams whose payload is in page frags (sendfile on a connected UDP socket
# splices the file's pages): at the next hop's TC ingress the skb is non-linear,
# data_end - data covers the headers only.
SPLICED = textwrap.dedent("""
    import os, socket, sys, tempfile
    src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    f = tempfile.TemporaryFile()
    f.write(bytes(n - 42))
    f.flush()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 443))
    s.connect((dst, 51234))
    for _ in range(4):
        assert os.sendfile(s.fileno(), f.fileno(), 0, n - 42) == n - 42
""")


def test_tc_measures_non_linear_skbs_whole(lab: Any) -> None:  # noqa: F811
    from test_xdp_prog import C4, S4

    from iqn_ctl.live.datapath import Datapath

    with Datapath(lab.router, FILT, hook="tc") as dp:
        assert dp.attach() == "tc"
        for n in (LO, HI, HI + 1):  # each size alone: the counter says which lengths were in band
            before = dp.counters()["candidates"]
            subprocess.run(["ip", "netns", "exec", lab.ns, PY, "-c", SPLICED, S4, C4, str(n)], check=True,
                           timeout=60)
            want = 4 if n <= HI else 0
            deadline = time.monotonic() + 10
            while dp.counters()["candidates"] - before < want and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.1)  # nothing more may come
            assert dp.counters()["candidates"] - before == want, n
        got: list[tuple[bytes, float]] = []
        deadline = time.monotonic() + 10
        while len(got) < 8 and time.monotonic() < deadline:
            got += dp.poll(50)
        time.sleep(0.02)
        got += dp.poll(100)  # nothing more may come
        assert len(got) == 8
        assert dp.counters()["parse_errors"] == 0


def test_auto_takes_xdp_on_a_free_interface_and_tc_beside_a_foreign_program(lab: Any) -> None:  # noqa: F811
    from bcc import BPF

    from iqn_ctl.live import tc
    from iqn_ctl.live.datapath import Datapath, xdp_program_on

    with Datapath(lab.router, FILT, hook="auto") as dp:
        assert dp.attach() == "native" and dp.hook == "xdp" and dp.describe() == "XDP native"
        assert xdp_program_on(lab.router) == (dp.prog_id, "iqn_xdp")
        assert tc.filters(lab.router, "ingress") == []
    other = BPF(text=FOREIGN)
    fn = other.load_func(b"foreign_xdp", BPF.XDP)
    try:
        BPF.attach_xdp(lab.router.encode(), fn, BPF.XDP_FLAGS_SKB_MODE)
        with Datapath(lab.router, FILT, hook="auto") as dp:
            assert dp.attach() == "tc" and dp.hook == "tc" and dp.describe() == "TC ingress"
            assert xdp_program_on(lab.router)[1] == "foreign_xdp"  # type: ignore[index]
            assert [f.name for f in tc.filters(lab.router, "ingress")] == ["iqn_tc"]
        assert tc.filters(lab.router, "ingress") == []
        assert xdp_program_on(lab.router)[1] == "foreign_xdp"  # type: ignore[index]
    finally:
        BPF.remove_xdp(lab.router.encode(), BPF.XDP_FLAGS_SKB_MODE)
        other.cleanup()


# A foreign classifier at priority 5 that counts what it sees in a map and
# returns TC_ACT_OK (ends the chain, as most do): IQN's, which returns no
# verdict, must run before it and leave it seeing every packet.
FOREIGN_TC = textwrap.dedent("""
    import sys
    from bcc import BPF
    from pyroute2 import IPRoute
    b = BPF(text=("BPF_ARRAY(%s, u64, 1);"
                  "int other_cls(struct __sk_buff *skb) { int k = 0; u64 *c = %s.lookup(&k);"
                  " if (c) __sync_fetch_and_add(c, 1); return 0; }" % (sys.argv[2], sys.argv[2])).encode())
    fn = b.load_func(b"other_cls", BPF.SCHED_CLS)
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=sys.argv[1])[0]
        try:
            ipr.tc("add", "clsact", idx)
        except Exception:
            pass
        ipr.tc("add-filter", "bpf", idx, ":1", fd=fn.fd, name="other_cls", parent=0xFFFFFFF2,
               classid=1, direct_action=True, prio=5)
""")


def _foreign_count(name: str) -> int:
    dump = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "name", name], capture_output=True,
                                     text=True, check=True).stdout)
    return int(dump[0]["value"]) if isinstance(dump[0]["value"], int) else int.from_bytes(
        bytes(int(b, 16) for b in dump[0]["value"]), "little")


def _tc_names(bed: Bed) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", bed.cli_ns, "tc", "filter", "show", "dev", bed.cli_if,
                          "ingress"], capture_output=True, text=True, check=True).stdout
    return sorted({w for w in out.split() if w.startswith(("iqn_", "other_"))})


def test_agent_on_tc_beside_a_foreign_xdp_program(tmp_path: Path) -> None:
    need_xdp()
    need(shutil.which("bpftool") is not None, "needs bpftool (sudo bash scripts/setup.sh)")
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    port = random.randrange(20000, 60000)
    with Bed() as bed:
        bed.attach_foreign_xdp("other_prog")
        cnt = f"oc{uuid.uuid4().hex[:10]}"  # the map's name, unique on the machine
        subprocess.run(["ip", "netns", "exec", bed.cli_ns, PY, "-c", FOREIGN_TC, bed.cli_if, cnt], check=True,
                       capture_output=True, timeout=120)
        assert _tc_names(bed) == ["other_cls"]
        agent = subprocess.Popen(
            bed.agent_cmd("attach", bed.cli_if, "--hook", "tc", "--state-dir", str(tmp_path / "s"),
                          "--metrics-port", str(port)),
            env=env, stderr=subprocess.PIPE, text=True)
        try:
            sock = sock_path(tmp_path / "run", bed.cli_if)
            wait_ready(sock, agent)
            assert bed.xdp_on_client() == "other_prog" and _tc_names(bed) == ["iqn_tc", "other_cls"]
            plan = burst_times(0.0, 21)
            out, err = bed.send({"lead": LEAD, "flows": [
                {"name": "x", "src": bed.srv4, "dst": bed.cli4, "dport": 40031, "frame": 1250,
                 "times": plan}]}).communicate(timeout=60)
            assert out, err
            got = json.loads(out)
            sent = got["sent"]["x"]
            st = poll_until(lambda: request(sock, "status"), settled(len(sent)))
            where = (st["hook"], st["direction"], st["xdp_mode"], st["link"])
            assert where == ("tc", "ingress", "", "ethernet")
            assert st["dev_type"] == "ether" and st["arphrd"] == 1
            assert st["candidates"] == len(sent) and st["lost"] == 0 and st["stalls_ended"] == 1
            assert _foreign_count(cnt) >= st["packets"] >= len(sent)  # it ran after ours on every one
            table = cli(bed, env, "status").stdout
            assert " tc/ingress " in table, table
            metrics = subprocess.run(
                ["ip", "netns", "exec", bed.cli_ns, PY, "-c",
                 f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics')"
                 ".read().decode())"], capture_output=True, text=True, timeout=30).stdout
            info = [ln for ln in metrics.splitlines() if ln.startswith("iqn_dataplane_info{")]
            assert len(info) == 1 and 'hook="tc"' in info[0] and 'direction="ingress"' in info[0], info
            (rec,) = [json.loads(x) for x in cli(bed, env, "stalls", "--json", "--state-dir",
                                                 str(tmp_path / "s")).stdout.splitlines()]
            lag_first = sent[0] - (got["t0"] + plan[0])
            lag_last = sent[-1] - (got["t0"] + plan[-1])
            assert rec["duration"] == pytest.approx(STALL + lag_last - lag_first, abs=0.3)
            assert rec["start"] == pytest.approx(sent[0] - P, abs=0.1)
            # killed: its classifier outlives it; detach removes it and nothing else
            agent.send_signal(signal.SIGKILL)
            agent.wait(timeout=10)
            assert _tc_names(bed) == ["iqn_tc", "other_cls"]
            d = cli(bed, env, "detach", bed.cli_if)
            assert d.returncode == 0 and "removed the IQN TC classifier" in d.stdout, (d.stdout, d.stderr)
            assert _tc_names(bed) == ["other_cls"] and bed.xdp_on_client() == "other_prog"
        finally:
            stop(agent)
