"""Signals an off-path sender cannot forge (issue 12, item 4): the data
plane's forgery guard, live on real veths with real XDP and a real TC egress
classifier, and its kernel logic through BPF_PROG_TEST_RUN.

The forger knows the viewer's address, spoofs any source (the real server's
among them), sends from port 443 with exact candidate sizes and the exact
n-every-p timing, and guesses the viewer's port, but cannot see the viewer's
traffic. Pairing (``iqn_tc_egress`` notes the client's datagrams to the
server port as they leave the interface; ``pair_check`` in ``iqn_xdp``
accepts a candidate only on a flow whose client sent one within the window,
spending a credit) keeps every forged candidate out of user space; the same
traffic against an agent with ``--pairing off`` records the forged stalls,
which shows that the check is what stops them. The per-client cap
(``client_cap``) bounds what one client address gets into user space, and an
unpaired flood cannot spend a real viewer's share.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_agent_live import cli, need_xdp, poll_until, stop, wait_ready

from iqn_ctl.capture.frames import udp_frame
from iqn_ctl.engine.params import CandidateFilter, SignalParams
from iqn_ctl.engine.synth import SignalModel, signal_times
from iqn_ctl.engine.tracker import StallEnded, StallTracker
from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import PY
from iqn_lab.testbed import Testbed as Lab

PRM = SignalParams()
LEAD = 1.0
SIGNAL_S = 3.0
REAL_PORT = 40050
#: the forger's guesses at the viewer's port (the real one is not among them:
#: it would have to guess it, one in ~28,000 for Linux's ephemeral range)
GUESSES = (41000, 41001, 41002, 41003, 41004, 41005, 41006, 41007)
#: an unpaired in-band flood at the viewer, mid-stall: far more than its cap
FLOOD = 1500
#: --cap in the pairing lab: 10 bursts/s = 40 candidates/s, 40 banked
CAP = 10.0
#: a paired flood (a client that really asks that often) on the viewer's IPv6 address
PAIRED_FLOOD = 400


def forger_sources(lab: Lab) -> list[str]:
    """The real server, the testbed's second server address and one nobody has."""
    return [lab.srv4, lab.srv4b, lab.srv4.rsplit(".", 1)[0] + ".77"]


def spec_for(lab: Lab, paired_flood: bool) -> dict[str, Any]:
    model = SignalModel(params=PRM)
    flows: list[dict[str, Any]] = [{
        "name": "real", "src": lab.srv4, "dst": lab.cli4, "dport": REAL_PORT, "frame": 1250,
        "times": [float(t) for t in signal_times([(0.0, SIGNAL_S)], model, np.random.default_rng(1))]}]
    sizes = (1180, 1212, 1250, 1288)  # exact in-band sizes, edges included
    for i, src in enumerate(forger_sources(lab)):
        for j, port in enumerate(GUESSES):
            rng = np.random.default_rng(100 + 10 * i + j)
            flows.append({
                "name": f"forged-{src}-{port}", "src": src, "dst": lab.cli4, "dport": port,
                "frame": sizes[(i + j) % 4], "raw": True, "request": False,
                "times": [float(t) for t in signal_times([(0.0, SIGNAL_S)], model, rng)]})
    flows.append({"name": "flood", "src": lab.srv4b, "dst": lab.cli4, "dport": GUESSES[0], "frame": 1250,
                  "raw": True, "request": False,
                  "times": [1.0 + 0.5 * i / FLOOD for i in range(FLOOD)]})
    if paired_flood:
        flows.append({"name": "paired", "src": lab.srv6, "dst": lab.cli6, "dport": 40060, "frame": 1250,
                      "times": [1.0 + i / PAIRED_FLOOD for i in range(PAIRED_FLOOD)]})
    return {"lead": LEAD, "flows": flows}


def reference(times: list[float]) -> tuple[float, float]:
    """(start, end) of the one stall the reference engine infers from ``times``."""
    tr = StallTracker(PRM, reorder=0.0)
    evs = tr.feed(np.array(times)) + tr.advance(times[-1] + 5.0) + tr.close()
    (e,) = [e for e in evs if isinstance(e, StallEnded)]
    return e.start, e.end


#: another IQN tool's egress classifier (as the lab's delay line attaches one): it must
#: survive the agent's attach and detach, which find their own filter by name
OTHER_IQN_EGRESS = """
from bcc import BPF
from iqn_ctl.live import tc
b = BPF(text=b"int iqn_other(struct __sk_buff *s) {{ return 0; }}")
tc.attach({iface!r}, b.load_func(b"iqn_other", BPF.SCHED_CLS).fd, "iqn_other", "egress")
"""


def run_agent(lab: Lab, tmp: Path, extra: tuple[str, ...]) -> tuple[subprocess.Popen[str], dict[str, str]]:
    env = dict(os.environ, IQN_RUN_DIR=str(tmp / "run"))
    agent = subprocess.Popen(lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(tmp / "s"), *extra),
                             env=env, stderr=subprocess.PIPE, text=True)
    return agent, env


def test_forged_signals_record_nothing_with_pairing_and_everything_without(tmp_path: Path) -> None:
    """Two labs, the same forger in both at once: 24 forged n-every-p signals
    (3 spoofed sources x 8 guessed ports) and a 1,500-packet in-band flood at
    the viewer, beside the viewer's real signal. With pairing (default) and
    ``--cap 10``: no forged candidate reaches user space, not one forged stall,
    the real stall is inferred as the reference engine infers it from the sent
    times, every forged packet is counted ``unpaired``, and a paired flood on
    the viewer's other address is cut to its cap (``capped``). With
    ``--pairing off``: every forged signal becomes a stall record."""
    need_xdp()
    with Lab() as on_lab, Lab() as off_lab:
        on_tmp, off_tmp = tmp_path / "on", tmp_path / "off"
        subprocess.run(["ip", "netns", "exec", on_lab.cli_ns, PY, "-c",
                        OTHER_IQN_EGRESS.format(iface=on_lab.cli_if)], check=True, capture_output=True,
                       timeout=120)
        a_on, env_on = run_agent(on_lab, on_tmp, ("--cap", str(CAP)))
        a_off, env_off = run_agent(off_lab, off_tmp, ("--pairing", "off", "--cap", "0"))
        try:
            s_on, s_off = sock_path(on_tmp / "run", on_lab.cli_if), sock_path(off_tmp / "run", off_lab.cli_if)
            wait_ready(s_on, a_on)
            wait_ready(s_off, a_off)
            snd_on, snd_off = on_lab.send(spec_for(on_lab, True)), off_lab.send(spec_for(off_lab, False))
            out_on, err_on = snd_on.communicate(timeout=120)
            out_off, err_off = snd_off.communicate(timeout=120)
            assert snd_on.returncode == 0 and snd_off.returncode == 0, err_on + err_off
            sent_on, sent_off = json.loads(out_on)["sent"], json.loads(out_off)["sent"]
            total_on = sum(len(v) for v in sent_on.values())
            total_off = sum(len(v) for v in sent_off.values())
            st_on = poll_until(lambda: request(s_on, "status"),
                               lambda s: s["candidates"] >= total_on and s["flows_in_stall"] == 0)
            st_off = poll_until(lambda: request(s_off, "status"),
                                lambda s: s["candidates"] >= total_off and s["flows_in_stall"] == 0)
            flows_on = request(s_on, "flows", kernel=False)
            rec_on = [json.loads(x) for x in cli(on_lab, env_on, "stalls", "--json", "--state-dir",
                                                 str(on_tmp / "s")).stdout.splitlines()]
            rec_off = [json.loads(x) for x in cli(off_lab, env_off, "stalls", "--json", "--state-dir",
                                                  str(off_tmp / "s")).stdout.splitlines()]
            shown = cli(on_lab, env_on, "status").stdout
            # pairing attaches the egress classifier; --pairing off attaches none
            hooks = (on_lab.egress_classifiers(), off_lab.egress_classifiers())
        finally:
            log_on, log_off = stop(a_on), stop(a_off)
        left = on_lab.egress_classifiers()  # an agent stopped by SIGTERM removes its classifier
    assert hooks == (["iqn_tc_egress", "iqn_other"], []) and left == ["iqn_other"], (hooks, left)
    forged_on = sum(len(v) for k, v in sent_on.items() if k.startswith("forged") or k == "flood")
    real, paired = sent_on["real"], sent_on["paired"]
    # pairing: the viewer has its one real stall, inferred as from the real signal alone ...
    viewer = [r for r in rec_on if r["client"] == on_lab.cli4]
    assert [r["flow"] for r in viewer] == [f"{on_lab.srv4}:443>{on_lab.cli4}:{REAL_PORT}"], rec_on
    start, end = reference(real)
    assert viewer[0]["start"] == pytest.approx(start, abs=0.1), (viewer[0], start)
    assert viewer[0]["end"] == pytest.approx(end, abs=0.1), (viewer[0], end)
    # ... not one forged candidate reached user space, and each was counted
    assert st_on["candidates"] == total_on, (st_on, total_on)  # all arrived: counts below are exact
    assert {f["flow"].rsplit(":", 1)[1] for f in flows_on} == {str(REAL_PORT), "40060"}, flows_on
    assert st_on["pairing"] == "on" and st_on["unpaired"] == forged_on, (st_on, forged_on, log_on[-2000:])
    assert st_on["events"] == len(real) + len(paired) - st_on["capped"], st_on
    # the cap: the paired flood got its bucket (40) and its rate (40/s) over its span, no more;
    # the unpaired flood at the viewer spent none of the viewer's tokens (the stall above)
    accepted = len(paired) - st_on["capped"]
    per_s = CAP * PRM.n
    assert st_on["capped"] > 0 and accepted <= per_s + per_s * (paired[-1] - paired[0]) + PRM.n, st_on
    assert f"unpaired {forged_on}" in shown and "pairing on" in shown, shown
    # without pairing the same forger records a stall on every forged flow
    forged_flows = {f"{src}:443>{off_lab.cli4}:{port}" for src in forger_sources(off_lab) for port in GUESSES}
    assert st_off["pairing"] == "off" and st_off["unpaired"] == 0, st_off
    assert forged_flows <= {r["flow"] for r in rec_off}, (sorted(r["flow"] for r in rec_off), log_off[-2000:])
    real_off = [r for r in rec_off if r["flow"].endswith(f":{REAL_PORT}")]
    assert len(real_off) == 1
    assert real_off[0]["start"] == pytest.approx(reference(sent_off["real"])[0], abs=0.1), real_off


# -- the kernel logic, packet by packet (BPF_PROG_TEST_RUN) ---------------------------------


S4, C4 = "198.18.1.1", "198.18.1.2"


def guard_datapath(**kw: Any) -> Any:
    from iqn_ctl.live.datapath import Datapath
    from iqn_ctl.live.settings import Guard

    return Datapath("lo", CandidateFilter(), guard=Guard(**kw))


def test_pairing_window_and_credits_in_the_kernel() -> None:
    """No client packet: unpaired. One client packet: one candidate, the next
    unpaired (credits). A client packet on another port or from another
    client pairs nothing. Credits bank up to their bound, no further. A window
    that has passed pairs nothing."""
    need_xdp()
    from iqn_ctl.live import bpf_testrun

    cand = udp_frame(S4, C4, 443, 5000, frame_len=1250)
    req = udp_frame(C4, S4, 5000, 443, frame_len=80)
    with guard_datapath(pairing=True, credits=3, cap=0.0) as dp:
        xdp, egress = bpf_testrun.TestRunner(dp.prog_fd), bpf_testrun.TestRunner(dp.egress_fd)

        def emitted(frame: bytes = cand) -> bool:
            before = dp.counters()["unpaired"]
            xdp.run(frame)
            return dp.counters()["unpaired"] == before

        assert not emitted()
        egress.run(req)
        assert emitted() and not emitted()
        egress.run(udp_frame(C4, S4, 5001, 443, frame_len=80))  # another connection of the client
        egress.run(udp_frame("198.18.1.3", S4, 5000, 443, frame_len=80))  # another client
        egress.run(udp_frame(C4, S4, 5000, 8443, frame_len=80))  # not to the server port
        assert not emitted()
        for _ in range(10):
            egress.run(req)
        assert [emitted() for _ in range(5)] == [True] * 3 + [False] * 2  # banked 3, not 10
        c = dp.counters()
        assert c["client_packets"] == 13 and c["candidates"] == 9 and c["unpaired"] == 5, c
    with guard_datapath(pairing=True, window=0.05, cap=0.0) as dp:
        xdp, egress = bpf_testrun.TestRunner(dp.prog_fd), bpf_testrun.TestRunner(dp.egress_fd)
        egress.run(req)
        import time

        time.sleep(0.2)  # past the 50 ms window (the egress stamp is the coarse clock: a tick early)
        xdp.run(cand)
        assert dp.counters()["unpaired"] == 1


def test_client_cap_in_the_kernel_is_per_client_and_after_pairing() -> None:
    """--cap 5 with n 4: 20 candidates banked per client. Without pairing,
    a burst of 100 to one client gets 20 through, another client its own 20;
    with pairing, unpaired candidates spend nothing of the client's bucket."""
    need_xdp()
    from iqn_ctl.live import bpf_testrun

    with guard_datapath(pairing=False, cap=5.0) as dp:
        xdp = bpf_testrun.TestRunner(dp.prog_fd)
        xdp.run(udp_frame(S4, C4, 443, 5000, frame_len=1250), repeat=100)
        assert dp.counters()["capped"] == 80
        xdp.run(udp_frame(S4, "198.18.1.3", 443, 5000, frame_len=1250), repeat=100)
        assert dp.counters()["capped"] == 160
    with guard_datapath(pairing=True, cap=5.0) as dp:
        xdp, egress = bpf_testrun.TestRunner(dp.prog_fd), bpf_testrun.TestRunner(dp.egress_fd)
        xdp.run(udp_frame("198.18.9.9", C4, 443, 6000, frame_len=1250), repeat=500)  # forged, unpaired
        cand, req = udp_frame(S4, C4, 443, 5000, frame_len=1250), udp_frame(C4, S4, 5000, 443, frame_len=80)
        for _ in range(20):
            egress.run(req)
            xdp.run(cand)
        c = dp.counters()
        assert (c["unpaired"], c["capped"]) == (500, 0), c
