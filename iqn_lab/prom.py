"""A real Prometheus (Debian's ``prometheus``) for the tests: the dashboards'
and alert rules' expressions are only worth what a real server answers.

It runs in a network namespace when asked (the agent's metrics port lives in
the testbed's namespace), scrapes the given targets every second under job
``iqn`` (the job the dashboard and rules select), and answers instant queries
through its HTTP API. Usage::

    with Prometheus.start(workdir, ["127.0.0.1:9464"], netns=lab.cli_ns) as prom:
        prom.query('up{job="iqn"}')   # the result list of /api/v1/query
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iqn_lab.errors import LabError
from iqn_lab.jetstream import free_port

READY_TIMEOUT = 60.0


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    port: int
    netns: str | None
    workdir: Path

    @classmethod
    def start(cls, workdir: Path, targets: Sequence[str], netns: str | None = None,
              job: str = "iqn", rules: Sequence[Path] = ()) -> Prometheus:  # fmt: skip
        exe = shutil.which("prometheus")
        if exe is None:
            raise LabError("prometheus is missing: apt-get install prometheus (scripts/setup.sh does)")
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "prometheus.yml"
        conf.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(r) for r in rules],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }))
        port = free_port()
        argv = [exe, f"--config.file={conf}", f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        log = (workdir / "prometheus.log").open("wb")
        prom = cls(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), port, netns, workdir)
        deadline = time.monotonic() + READY_TIMEOUT
        while prom._get("/-/ready") is None:
            if prom.proc.poll() is not None or time.monotonic() > deadline:
                prom.stop()
                raise LabError(f"prometheus did not start: see {workdir / 'prometheus.log'}")
            time.sleep(0.3)
        return prom

    def _get(self, path: str) -> str | None:
        url = f"http://127.0.0.1:{self.port}{path}"
        code = ("import sys, urllib.request\ntry:\n sys.stdout.write(urllib.request.urlopen(sys.argv[1], "
                "timeout=10).read().decode())\nexcept Exception:\n sys.exit(1)")  # fmt: skip
        argv = [sys.executable, "-c", code, url]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return r.stdout if r.returncode == 0 else None

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant query's result list ([] while Prometheus has no answer)."""
        body = self._get("/api/v1/query?query=" + urllib.parse.quote(expr))
        if body is None:
            return []
        got = json.loads(body)
        return list(got["data"]["result"]) if got.get("status") == "success" else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
