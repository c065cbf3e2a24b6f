"""packaging/systemd/iqn-ctl@.service: it verifies, and its command lines, with
the instance name put in the way systemd does, attach and detach the agent.

No systemd runs here, so the unit is checked with ``systemd-analyze verify``
(offline) and its ExecStart/ExecStopPost lines are expanded like systemd expands
them (``%i`` is the instance as written in the unit name, i.e. escaped: an
interface ``wan-1`` is ``iqn-ctl@wan\\x2d1``; ``%I`` is it unescaped) and run
against a real veth whose name has a '-' in it, stopped with the unit's
KillSignal and after a crash.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

from conftest import ROOT, need
from test_agent_live import DEADLINE, need_xdp, stop, wait_ready

from iqn_ctl.live.api import sock_path
from iqn_lab.testbed import Testbed as Lab
from iqn_lab.testbed import sh

UNIT = ROOT / "packaging" / "systemd" / "iqn-ctl@.service"
CONFIG_UNIT = ROOT / "packaging" / "systemd" / "iqn-ctl.service"
PREFIX = "/opt/iqn"  # where the unit expects the checkout (docs/agent.md)


def settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of the unit (all sections), comments and blanks skipped."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def escape(name: str) -> str:
    return sh("systemd-escape", name).stdout.strip()


def expand(cmd: str, instance: str, env: dict[str, str]) -> list[str]:
    """An Exec line as systemd runs it (config_parse_exec): split into words
    (quotes and C escapes resolved) first, then specifiers in each word (only those
    this unit may use; any other fails the test so it is emulated before it is
    relied on: so ``%i`` stays escaped, ``wan\x2d1``), then at exec time ``$VAR``
    (split at whitespace) and ``${VAR}`` (in place)."""
    unescaped = sh("systemd-escape", "--unescape", instance).stdout.strip()
    spec = {"i": instance, "I": unescaped, "%": "%"}

    def one(m: re.Match[str]) -> str:
        assert m.group(1) in spec, f"specifier %{m.group(1)} in {cmd!r} is not emulated here"
        return spec[m.group(1)]

    words = [re.sub(r"%(.)", one, w) for w in shlex.split(cmd)]
    argv: list[str] = []
    for w in words:
        m = re.fullmatch(r"\$(\w+)", w)
        if m:
            argv.extend(env.get(m.group(1), "").split())
            continue
        argv.append(re.sub(r"\$\{(\w+)\}", lambda x: env.get(x.group(1), ""), w))
    assert argv and argv[0].startswith("/"), argv  # systemd wants an absolute path, no prefix here
    return argv


def installed(tmp_path: Path) -> str:
    """The unit as installed from this checkout: the install prefix is this tree,
    its state directory a temporary one (nothing else changes)."""
    return UNIT.read_text().replace(PREFIX + "/", f"{ROOT}/").replace("/var/lib/iqn", str(tmp_path / "state"))


def test_unit_verifies(tmp_path: Path) -> None:
    need(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (Debian package systemd)")
    d = tmp_path / "units"
    d.mkdir()
    (d / UNIT.name).write_text(installed(tmp_path))
    r = subprocess.run(["systemd-analyze", "verify", str(d / "iqn-ctl@eth0.service")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_config_unit_verifies_and_runs_the_shipped_config(tmp_path: Path) -> None:
    """packaging/systemd/iqn-ctl.service: every interface of /etc/iqn/iqn.toml in one process."""
    need(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (Debian package systemd)")
    d = tmp_path / "units"
    d.mkdir()
    text = CONFIG_UNIT.read_text().replace(PREFIX + "/", f"{ROOT}/")
    (d / CONFIG_UNIT.name).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(d / CONFIG_UNIT.name)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    (start,) = settings(text)["ExecStart"]
    assert shlex.split(start)[1:] == ["attach", "--config", "/etc/iqn/iqn.toml"]
    assert "BindsTo" not in settings(text)


def test_unit_commands_attach_and_detach_a_dashed_interface(tmp_path: Path) -> None:
    need_xdp()
    need(shutil.which("systemd-escape") is not None, "needs systemd-escape (Debian package systemd)")
    unit = settings(installed(tmp_path))
    env_unit = dict(kv.split("=", 1) for kv in unit.get("Environment", []))
    (start,) = unit["ExecStart"]
    (stop_post,) = unit["ExecStopPost"]
    kill = signal.Signals[unit["KillSignal"][0]]
    timeout = float(unit["TimeoutStopSec"][0])
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    run = tmp_path / "run"
    with Lab() as lab:
        name = f"{lab.prefix}-c"  # interface names with '-' are common (wan-1, veth-x)
        sh("ip", "-n", lab.cli_ns, "link", "set", "dev", lab.cli_if, "down")
        sh("ip", "-n", lab.cli_ns, "link", "set", "dev", lab.cli_if, "name", name)
        sh("ip", "-n", lab.cli_ns, "link", "set", "dev", name, "up")
        lab.cli_if = name
        instance = escape(name)  # systemctl start iqn-ctl@$(systemd-escape wan-1)
        assert instance != name
        # the device the unit starts with and after is the interface's own device unit; not bound
        # to it: the agent's watchdog attaches again when the interface comes back
        device = sh("systemd-escape", "--path", "--suffix=device", f"/sys/subsystem/net/devices/{name}")
        assert re.sub(r"%i", lambda _: instance, unit["WantedBy"][0]) == device.stdout.strip()
        assert re.sub(r"%i", lambda _: instance, unit["After"][0]).split()[0] == device.stdout.strip()
        assert "BindsTo" not in unit

        def ns(cmd: str) -> list[str]:
            return ["ip", "netns", "exec", lab.cli_ns, *expand(cmd, instance, env_unit)]

        # 1. start, stop with KillSignal: the agent detaches itself; ExecStopPost finds nothing
        agent = subprocess.Popen(ns(start), env=env, stderr=subprocess.PIPE, text=True)
        try:
            wait_ready(sock_path(run, name), agent)
            assert lab.xdp_on_client() == "iqn_xdp"
            agent.send_signal(kill)
            code = agent.wait(timeout)
        finally:
            err = stop(agent)
        assert code == 0, err
        assert f"{name}: detached" in err, err
        assert lab.xdp_on_client() is None and not sock_path(run, name).exists()
        post = subprocess.run(ns(stop_post), env=env, capture_output=True, text=True, timeout=DEADLINE)
        assert post.returncode == 0, post.stderr
        assert post.stdout.strip() == f"{name}: nothing attached to {name}", post.stdout

        # 2. a crash (SIGKILL) leaves program, socket and pid file; ExecStopPost removes them
        agent = subprocess.Popen(ns(start), env=env, stderr=subprocess.PIPE, text=True)
        try:
            wait_ready(sock_path(run, name), agent)
            agent.kill()
            agent.wait(DEADLINE)
        finally:
            stop(agent)
        assert lab.xdp_on_client() == "iqn_xdp" and sock_path(run, name).exists()
        post = subprocess.run(ns(stop_post), env=env, capture_output=True, text=True, timeout=DEADLINE)
        assert post.returncode == 0, post.stderr
        assert "removed the IQN XDP program" in post.stdout, post.stdout
        assert lab.xdp_on_client() is None
        assert not sock_path(run, name).exists() and not (run / f"{name}.pid").exists()
