"""``--version`` on every command, and the long-running commands' logging
(``--log-level``, ``--log-format text|json``, no time stamp under the journal)
(issue 20 item 3, the parts that are not the config file)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from test_agent_live import need_xdp, poll_until, stop, wait_ready

from iqn_ctl.live.api import request, sock_path
from iqn_lab.testbed import Testbed

BIN = Path(sys.executable).parent
COMMANDS = ("iqn-ctl", "iqn-lab", "iqn-qos", "iqn-agent")
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def _commit() -> str | None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return None
    r = subprocess.run(["git", "-c", f"safe.directory={ROOT}", "-C", str(ROOT), "rev-parse", "HEAD"],
                       capture_output=True, text=True)
    return r.stdout.strip()[:12] if r.returncode == 0 else None


def test_version_on_every_command() -> None:
    """Each console script prints its name, the package's version from its
    metadata and, in a checkout, the commit (as ``git rev-parse`` has it)."""
    from importlib.metadata import version

    want = version("iqn")
    commit = _commit()
    for cmd in COMMANDS:
        r = subprocess.run([str(BIN / cmd), "--version"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stderr == "", (cmd, r.stderr)
        m = re.fullmatch(rf"{cmd} (\S+)(?: \(git ([0-9a-f]{{12}})(-dirty)?\))?\n", r.stdout)
        assert m is not None, r.stdout
        assert m.group(1) == want
        assert m.group(2) == commit, (r.stdout, commit)


def test_version_outside_a_checkout(tmp_path: Path) -> None:
    from iqn_common import version as v
    from user_agent import version as uv

    for mod in (v, uv):
        assert mod.git_commit(tmp_path) is None
    assert v.version_line("iqn-ctl").startswith(f"iqn-ctl {v.package_version()}")


@pytest.mark.parametrize("argv", [
    ["iqn-ctl", "attach", "lo", "--log-level", "loud"],
    ["iqn-ctl", "attach", "lo", "--log-format", "xml"],
    ["iqn-qos", "serve", "--nats", "nats://127.0.0.1:1", "--topology", "t.yaml", "--store", "s.db",
     "--log-level", "verbose"],
    ["iqn-qos", "serve", "--nats", "nats://127.0.0.1:1", "--topology", "t.yaml", "--store", "s.db",
     "--log-format", "logfmt"],
])
def test_bad_log_options_are_one_line(argv: list[str], tmp_path: Path) -> None:
    r = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    flag = "--log-level" if "--log-level" in argv else "--log-format"
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"{argv[0]}: error: {flag} must be"), r.stderr
    assert not list(tmp_path.iterdir())  # nothing created: the store is not opened


LOG_SNIPPET = """
import logging, sys
mod = __import__(sys.argv[1], fromlist=["configure"])
mod.configure(sys.argv[2], sys.argv[3])
log = logging.getLogger("iqn.test")
log.debug("quiet")
log.info("hello %s", "there", extra={"flow": "a>b", "n": 3})
try:
    1 / 0
except ZeroDivisionError:
    log.exception("boom")
"""


def _log_lines(module: str, level: str, fmt: str, journal: str | None) -> list[str]:
    """What a process configured by ``module.configure`` writes to its stderr,
    a pipe; ``journal``: "match" sets JOURNAL_STREAM to that pipe's device and
    inode (as systemd does for the journal's stream), "other" to something else."""
    r, w = os.pipe()
    st = os.fstat(w)
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    if journal == "match":
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    elif journal == "other":
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
    p = subprocess.Popen([sys.executable, "-c", LOG_SNIPPET, module, level, fmt], stderr=w, env=env)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    assert p.wait(30) == 0
    return out.splitlines()


@pytest.mark.parametrize("module", ["iqn_common.logsetup"])
def test_text_format_and_the_journal(module: str) -> None:
    """Time-stamped text, but not when stderr is the journal's stream; an
    unrelated JOURNAL_STREAM (inherited, stderr elsewhere) changes nothing;
    --log-level debug lets debug lines through."""
    plain = _log_lines(module, "info", "text", None)
    assert STAMP.match(plain[0]) and plain[0].endswith(" INFO hello there"), plain
    assert not any("quiet" in ln for ln in plain)
    other = _log_lines(module, "info", "text", "other")
    assert STAMP.match(other[0]), other
    journal = _log_lines(module, "debug", "text", "match")
    assert journal[:2] == ["DEBUG quiet", "INFO hello there"], journal
    assert journal[2] == "ERROR boom" and "ZeroDivisionError" in "\n".join(journal)


@pytest.mark.parametrize("module", ["iqn_common.logsetup"])
def test_json_format(module: str) -> None:
    """One object per line: ts, level, logger, msg, the record's extra fields,
    and exc for a traceback; the same shape from both twins."""
    lines = _log_lines(module, "warning", "json", "match")
    (boom,) = [json.loads(ln) for ln in lines]  # info is below --log-level warning
    assert boom["level"] == "error" and boom["msg"] == "boom" and "ZeroDivisionError" in boom["exc"]
    (hello, boom) = [json.loads(ln) for ln in _log_lines(module, "info", "json", None)]
    assert set(hello) == {"ts", "level", "logger", "msg", "flow", "n"}
    assert (hello["level"], hello["logger"], hello["msg"], hello["flow"], hello["n"]) == (
        "info", "iqn.test", "hello there", "a>b", 3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", hello["ts"])


def test_agent_logs_json_with_stall_fields(tmp_path: Path) -> None:
    """The real agent with --log-format json: every stderr line is a JSON
    object, and a signal's stall start and end carry their fields."""
    need_xdp()
    from test_agent_live import burst_times

    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    env.pop("JOURNAL_STREAM", None)
    with Testbed() as lab:
        agent = subprocess.Popen(
            lab.agent_cmd("attach", lab.cli_if, "--state-dir", str(tmp_path / "s"), "--log-format", "json",
                          "--log-level", "debug"),
            env=env, stderr=subprocess.PIPE, text=True)
        try:
            sock = sock_path(tmp_path / "run", lab.cli_if)
            wait_ready(sock, agent)
            snd = lab.send({"lead": 0.3, "flows": [{"name": "x", "src": lab.srv4, "dst": lab.cli4,
                                                    "dport": 40031, "frame": 1250,
                                                    "times": burst_times(0.0, 31)}]})
            _, err = snd.communicate(timeout=60)
            assert snd.returncode == 0, err
            poll_until(lambda: request(sock, "status"), lambda s: s["stalls_ended"] >= 1)
        finally:
            out = stop(agent)
    recs: list[dict[str, Any]] = [json.loads(ln) for ln in out.splitlines()]  # every line is JSON
    flow = f"{lab.srv4}:443>{lab.cli4}:40031"
    (start,) = [r for r in recs if r.get("event") == "stall_start"]
    (end,) = [r for r in recs if r.get("event") == "stall_end"]
    for r in (start, end):
        assert (r["logger"], r["level"], r["iface"], r["flow"], r["client"]) == (
            "iqn.agent", "info", lab.cli_if, flow, lab.cli4), r
        assert r["msg"].startswith(f"{lab.cli_if}: stall ")
    assert end["start"] == pytest.approx(start["start"], abs=1e-3)
    assert end["duration"] > 1 and end["candidates"] > 0
