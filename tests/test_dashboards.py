"""packaging/grafana/iqn.json and packaging/prometheus/iqn-rules.yml (issue 20,
point 5): the rules pass ``promtool check rules``, and every dashboard panel's
expression, asked of a real Prometheus scraping a real agent (XDP on a testbed
veth, one real stall, ``--export`` to a broker that is not there so the export
backlog exists), returns at least one series."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from conftest import ROOT, need
from test_agent_live import LEAD, burst_times, need_xdp, poll_until, settled, stop, wait_ready

from iqn_ctl.live.api import request, sock_path
from iqn_lab.jetstream import free_port
from iqn_lab.prom import Prometheus
from iqn_lab.testbed import Testbed as Lab

DASHBOARD = ROOT / "packaging" / "grafana" / "iqn.json"
RULES = ROOT / "packaging" / "prometheus" / "iqn-rules.yml"


def panel_exprs() -> dict[str, str]:
    board = json.loads(DASHBOARD.read_text())
    return {p["title"]: t["expr"] for p in board["panels"] for t in p["targets"]}


def test_rules_pass_promtool() -> None:
    need(shutil.which("promtool") is not None, "needs promtool (Debian's prometheus; scripts/setup.sh)")
    r = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 5 rules found" in r.stdout, r.stdout


def test_every_panel_returns_a_series_from_a_real_agent(tmp_path: Path) -> None:
    need_xdp()
    need(shutil.which("prometheus") is not None, "needs Debian's prometheus (scripts/setup.sh)")
    exprs = panel_exprs()
    assert len(exprs) >= 6
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    with Lab() as lab:
        port, dead = free_port(), free_port()
        agent = subprocess.Popen(
            lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(tmp_path / "state"),
                          "--metrics-port", str(port), "--export", f"nats://127.0.0.1:{dead}"),
            env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            sock = sock_path(tmp_path / "run", lab.cli_if)
            wait_ready(sock, agent)
            with Prometheus.start(tmp_path / "prom", [f"127.0.0.1:{port}"], netns=lab.cli_ns,
                                  rules=[RULES]) as prom:  # fmt: skip
                # the stall must come after the first scrapes, or increase() sees no change
                up = poll_until(lambda: prom.query('up{job="iqn"} == 1'), bool, timeout=60)
                assert up, "prometheus never scraped the agent"
                one = {"name": "v4", "src": lab.srv4, "dst": lab.cli4, "dport": 40001, "frame": 1250,
                       "times": burst_times(0.0, 1)}  # fmt: skip
                snd = lab.send({"lead": LEAD, "flows": [one]})
                out, err = snd.communicate(timeout=60)
                assert snd.returncode == 0, err
                sent = sum(len(v) for v in json.loads(out)["sent"].values())
                st = poll_until(lambda: request(sock, "status"), settled(sent))
                assert settled(sent)(st), st
                # every panel: a series, once Prometheus has scraped the stall (a few scrapes)
                answers: dict[str, list[object]] = {}
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    answers = {t: prom.query(e) for t, e in exprs.items()}
                    if all(answers.values()):
                        break
                    time.sleep(1)
                empty = [t for t, a in answers.items() if not a]
                assert not empty, (empty, {t: exprs[t] for t in empty})
                # the stall itself is in it, not just zeros
                (rate,) = prom.query('sum(increase(iqn_stalls_started_total{job="iqn"}[10m]))')
                assert float(rate["value"][1]) > 0, rate
                rules = prom._get("/api/v1/rules")
                assert rules is not None and json.loads(rules)["data"]["groups"][0]["name"] == "iqn"
        finally:
            stop(agent)
