"""A real Prometheus (Debian's ``prometheus``) scrapes a real ISP agent (``iqn-ctl
attach`` with XDP on a testbed veth, ``--metrics-port``) and a real ``iqn-qos
serve`` fed through a real nats-server, and answers queries for a metric of each
through its HTTP API; ``promtool check metrics`` passes on both endpoints.

Everything runs inside the testbed's client namespace (the agent must: its veth
is there), so nothing listens outside it and nothing is reached from the host
but through ``ip netns exec``."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import need
from qos_feed import scenario
from test_agent_live import need_xdp, stop, wait_ready
from test_qos_serve import start_service

from iqn_ctl.live.api import sock_path
from iqn_lab.jetstream import JetStream
from iqn_lab.testbed import PY
from iqn_lab.testbed import Testbed as Lab

DEADLINE = 90.0
HERE = Path(__file__).resolve().parent


def in_ns(ns: str, code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, PY, "-c", code], capture_output=True, text=True,
                          timeout=timeout)


def http_get(ns: str, url: str) -> str:
    r = in_ns(ns, f"import urllib.request, sys; sys.stdout.write(urllib.request.urlopen({url!r}, "
                  "timeout=10).read().decode())")
    return r.stdout if r.returncode == 0 else ""


def prom_query(ns: str, port: int, query: str) -> list[dict[str, Any]]:
    from urllib.parse import quote

    body = http_get(ns, f"http://127.0.0.1:{port}/api/v1/query?query={quote(query)}")
    if not body:
        return []
    got = json.loads(body)
    return list(got["data"]["result"]) if got.get("status") == "success" else []


def wait_until(fn: Any, what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := fn()):
        assert time.monotonic() < deadline, f"gave up waiting {timeout:g} s for {what}"
        time.sleep(0.5)
    return got


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=60)


def test_prometheus_scrapes_the_agent_and_the_qos_service(tmp_path: Path) -> None:
    need_xdp()
    need(bool(shutil.which("prometheus") and shutil.which("promtool")),
         "needs Debian's prometheus and promtool (scripts/setup.sh installs them)")
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    topo, msgs, injected = scenario(tmp_path, "relay-bug", slots=1, lines_per_slot=600, components=300)
    (tmp_path / "msgs.json").write_text(json.dumps(msgs))
    procs: list[subprocess.Popen[str]] = []
    with Lab() as lab:
        ns = lab.cli_ns
        agent_port, prom_port = random.randrange(20000, 40000), random.randrange(40000, 60000)
        with JetStream.start(1, tmp_path / "js", netns=ns) as js:
            # the agent exports to the same broker: its export metrics are linted too
            agent = subprocess.Popen(
                lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(tmp_path / "state"),
                              "--metrics-port", str(agent_port), "--export", js.urls[0]),
                env=env, stderr=subprocess.PIPE, text=True)
            procs.append(agent)
            svc = start_service(js.urls, topo, tmp_path / "qos.duckdb", tmp_path / "serve.log",
                                prefix=("ip", "netns", "exec", ns))
            procs.append(svc.proc)
            try:
                wait_ready(sock_path(tmp_path / "run", lab.cli_if), agent)
                feed = str(tmp_path / "msgs.json")
                code = (f"import asyncio, json, sys; sys.path.insert(0, {str(HERE)!r}); "
                        "from qos_feed import publish; "
                        f"asyncio.run(publish({js.urls!r}, json.load(open({feed!r}))))")
                pub = subprocess.run(["ip", "netns", "exec", ns, PY, "-c", code], capture_output=True,
                                     text=True, timeout=120)
                assert pub.returncode == 0, pub.stderr[-2000:]
                qos_port = int(svc.url.rsplit(":", 1)[1])
                conf = tmp_path / "prometheus.yml"
                conf.write_text(
                    "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                    "scrape_configs:\n"
                    f"  - job_name: iqn-agent\n"
                    f"    static_configs: [{{targets: ['127.0.0.1:{agent_port}']}}]\n"
                    f"  - job_name: iqn-qos\n    static_configs: [{{targets: ['127.0.0.1:{qos_port}']}}]\n")
                chk = subprocess.run(["promtool", "check", "config", str(conf)], capture_output=True,
                                     text=True)
                assert chk.returncode == 0, chk.stdout + chk.stderr
                with (tmp_path / "prometheus.log").open("w") as log:
                    prom = subprocess.Popen(
                        ["ip", "netns", "exec", ns, "prometheus", f"--config.file={conf}",
                         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{prom_port}"],
                        stdout=log, stderr=log, text=True)
                procs.append(prom)
                # the agent's kernel-side counter and the service's ingest counter and estimates,
                # each read back through Prometheus
                q_agent = f'iqn_packets_total{{iface="{lab.cli_if}"}}'
                got = wait_until(lambda: prom_query(ns, prom_port, q_agent),
                                 "Prometheus to have scraped the agent")
                assert got[0]["metric"]["job"] == "iqn-agent"
                rec = wait_until(lambda: [r for r in prom_query(ns, prom_port, 'iqn_qos_ingest_records_total'
                                                                '{type="session"}')
                                          if float(r["value"][1]) >= len(msgs)],
                                 "Prometheus to see every session stored")
                assert rec[0]["metric"]["job"] == "iqn-qos"
                faulty = wait_until(lambda: prom_query(ns, prom_port, "iqn_qos_component_faulty == 1"),
                                    "Prometheus to see the faulty components")
                assert {r["metric"]["component"] for r in faulty} == injected
                up = prom_query(ns, prom_port, "up")
                assert {r["metric"]["job"]: r["value"][1] for r in up} == {"iqn-agent": "1", "iqn-qos": "1"}
                # promtool's lint of both endpoints' exposition
                for url in (f"http://127.0.0.1:{agent_port}/metrics", f"http://127.0.0.1:{qos_port}/metrics"):
                    text = http_get(ns, url)
                    assert "# TYPE" in text, url
                    assert ("iqn_export_connected" in text) == (str(agent_port) in url), url
                    res = promtool_check(text)
                    assert res.returncode == 0, f"{url}: {res.stdout}{res.stderr}"
            finally:
                for p in reversed(procs):
                    stop(p)
