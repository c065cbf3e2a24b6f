"""The agent's config file (``iqn-ctl attach --config FILE``, iqn_ctl/live/config.py):
parsing, precedence (flag > interface section > [global] > default) and every
kind of error, each one line naming the file and the key, exit status 2.

No root needed: the file is read and checked before anything is attached.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
from conftest import ROOT

from iqn_ctl.cli import app
from iqn_ctl.live.config import KEYS, ConfigError, load, read

IQN_CTL = str(Path(sys.executable).with_name("iqn-ctl"))
SHIPPED = ROOT / "packaging" / "iqn.toml"


def attach_params() -> list[Any]:
    cmd = typer.main.get_command(app)
    return list(cmd.commands["attach"].params)  # type: ignore[attr-defined]


def defaults() -> dict[str, Any]:
    """Every key's value as ``iqn-ctl attach`` has it with no flag given."""
    out = {}
    for p in attach_params():
        key = next((o[2:] for o in p.opts if o.startswith("--") and o[2:] in KEYS), None)
        if key is not None:
            out[key] = p.default
    return out


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "iqn.toml"
    f.write_text(text)
    return f


def test_every_attach_flag_has_a_key_and_every_key_a_flag() -> None:
    flags = {o[2:] for p in attach_params() for o in p.opts if o.startswith("--")}
    flags -= {"config", "perf-pages", "help"}  # the file itself; --ring-pages' old name
    assert flags == set(KEYS)


def test_parse_and_precedence(tmp_path: Path) -> None:
    f = write(tmp_path, """
# comments are fine
[global]
p = 0.5
n = 6
pairing = false
export = "nats://127.0.0.1:4222"
metrics-port = 9464
state-dir = "/tmp/iqn-state"
watchdog = 2

[interfaces.eth0]
n = 8
hook = "tc"

[interfaces."eth0.100"]
pairing = "on"
cap = 0
""")
    sections = read(f)
    assert sections["global"]["pairing"] == "off" and sections["global"]["export"] == ["nats://127.0.0.1:4222"]
    assert sections["global"]["state-dir"] == Path("/tmp/iqn-state") and sections["global"]["watchdog"] == 2.0
    assert set(sections) == {"global", "eth0", "eth0.100"}
    vals = defaults()
    # no interface named: every section, in file order, all in one process
    shared, cfgs, proc = load(f, [], {**vals, "p": 0.3}, {"p"})
    assert [c.iface for c in cfgs] == ["eth0", "eth0.100"]
    eth0, vlan = cfgs
    assert eth0.params.p == vlan.params.p == 0.3  # the flag beats the file
    assert (eth0.params.n, vlan.params.n) == (8, 6)  # the section beats [global]
    assert (eth0.hook, vlan.hook) == ("tc", "auto")  # the default where nobody says
    assert (eth0.pairing, vlan.pairing) == (False, True)
    assert vlan.cap == 0.0 and eth0.cap is None
    assert eth0.export == ("nats://127.0.0.1:4222",)
    assert eth0.state_dir == vlan.state_dir == Path("/tmp/iqn-state")
    assert (shared.metrics_port, shared.watchdog, proc["daemon"]) == (9464, 2.0, False)
    # interfaces on the command line: only those, with their sections if any
    _, cfgs, _ = load(f, ["eth1", "eth0"], vals, set())
    assert [(c.iface, c.params.n, c.hook) for c in cfgs] == [("eth1", 6, "auto"), ("eth0", 8, "tc")]
    # a process flag beats [global]
    shared, _, _ = load(f, ["eth0"], {**vals, "metrics-port": 9999}, {"metrics-port"})
    assert shared.metrics_port == 9999
    # no file: the flags alone, as before
    shared, cfgs, _ = load(None, ["eth0"], vals, set())
    assert shared.metrics_port is None and cfgs[0].params.n == 4 and cfgs[0].pairing
    with pytest.raises(ConfigError, match="interface eth0 named twice"):  # not one agent on it, silently
        load(None, ["eth0", "eth1", "eth0"], vals, set())


def test_the_shipped_config_parses_and_attaches_nothing_by_itself() -> None:
    """packaging/iqn.toml: every line a comment or a default, so installing it changes nothing."""
    sections = read(SHIPPED)
    assert set(sections) == {"global"}
    shared, cfgs, _ = load(SHIPPED, ["eth0"], defaults(), set())
    assert shared.metrics_port == 9464 and shared.metrics_addr == "127.0.0.1"
    text = SHIPPED.read_text()
    for key in KEYS:  # every key is documented there (commented out)
        assert f"# {key} = " in text or f"\n{key} = " in text, key
    # and the commented values are the defaults (examples aside)
    vals = defaults()
    examples = {"export", "router-id", "export-replicas", "cap", "mitigate", "link-rate", "group"}
    for line in text.split("# -- one section per interface")[0].splitlines():
        body = line.removeprefix("# ").split(" #")[0]
        key = body.partition(" = ")[0]
        if key in KEYS and key not in examples and line.startswith("# "):
            got = tomllib.loads(body)[key]
            want = vals[key]
            assert got == (str(want) if isinstance(want, Path) else want), (key, got, want)


BAD = [
    # (file text, what the one error line must contain)
    ("[global\np = 1\n", "not valid TOML"),
    ("p = 0.2\n", "p: a key outside any section; put it under [global]"),
    ("[agent]\np = 0.2\n", "[agent]: unknown section"),
    ("[global]\nmin_size = 1200\n", "[global] min_size: unknown key (did you mean min-size?)"),
    ("[global]\nfoo = 1\n", "[global] foo: unknown key"),
    ("[interfaces.eth0]\nmetrics-port = 9000\n",
     "[interfaces.eth0] metrics-port: a setting of the whole process: put it in [global]"),
    ("[global]\np = \"fast\"\n", "[global] p: must be a number, got 'fast'"),
    ("[global]\nn = 4.5\n", "[global] n: must be a whole number, got 4.5"),
    ("[global]\nforce = \"yes\"\n", "[global] force: must be true or false"),
    ("[global]\npairing = \"maybe\"\n", "[global] pairing: must be \"on\" or \"off\""),
    ("[global]\nexport = [1, 2]\n", "[global] export: must be a string or a list of strings"),
    ("[interfaces.eth0]\nn = 0\n", "[interfaces.eth0] n: --n must be in 1..1000, got 0"),
    ("[global]\nbacklog = 0\n[interfaces.eth0]\n", "[global] backlog: --backlog must be in"),
    ("[interfaces.eth0]\nvol-sample = 6\n",
     "[interfaces.eth0] vol-sample: --vol-sample must be a power of two in 1..1024, got 6"),
    ("[global]\nmetrics-port = 70000\n[interfaces.eth0]\n",
     "[global] metrics-port: --metrics-port must be in 1..65535, got 70000"),
    ("[global]\nwatchdog = -1\n[interfaces.eth0]\n", "[global] watchdog: --watchdog must be 0"),
    ("[global]\nestimator = \"magic\"\n[interfaces.eth0]\n",
     "[global] estimator: unknown --estimator 'magic'"),
    ("[global]\nmin-size = 1300\n[interfaces.eth0]\n", "[global] min-size: "),
    ("[global]\nlog-level = \"loud\"\n[interfaces.eth0]\n", "[global] log-level: --log-level must be one of"),
    ("[interfaces.eth0]\nboost-share = 2.0\nmitigate = \"eth1\"\n",  # wrong only with mitigate
     "[interfaces.eth0]: --boost-share must be a fraction"),
    # two keys fine alone, wrong together: the sections are named
    ("[global]\ndirection = \"egress\"\n[interfaces.eth0]\nhook = \"xdp\"\n",
     "[global], [interfaces.eth0]: --direction egress needs the TC hook"),
    ("[interfaces.\"a/b\"]\n", "[interfaces.a/b]: 'a/b' is not a valid interface name"),
    ("interfaces = 3\n", "interfaces: must be sections [interfaces.NAME]"),
    ("[global]\np = 0.2\n", "no [interfaces.NAME] section"),
]


@pytest.mark.parametrize(("text", "want"), BAD, ids=[w.split(":")[0][:40] for _, w in BAD])
def test_bad_config_is_one_line_naming_file_and_key(tmp_path: Path, text: str, want: str) -> None:
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(f, [], defaults(), set())
    msg = str(e.value)
    assert msg.startswith(f"{f}: ") and want in msg and "\n" not in msg, msg


def test_the_command_line_says_it_in_one_line_exit_2(tmp_path: Path) -> None:
    """Through the real command (no root needed: nothing is attached), and a
    flag's own error stays the flag's (the file is not blamed for it)."""
    cases = [
        (write(tmp_path, "[interfaces.eth0]\nslot = -5\n"), [],
         "[interfaces.eth0] slot: --slot must be in (0, 86400] seconds, got -5.0"),
        (tmp_path / "missing.toml", ["eth0"], "missing.toml: no such file"),
        (tmp_path, ["eth0"], f"{tmp_path}: not a regular file"),
    ]
    nonutf = tmp_path / "latin1.toml"
    nonutf.write_bytes(b"[global]\nrouter-id = \"r\xe9\"\n")
    cases.append((nonutf, ["eth0"], "not valid TOML"))
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"))
    for path, ifaces, want in cases:
        r = subprocess.run([IQN_CTL, "attach", *ifaces, "--config", str(path)], capture_output=True,
                           text=True, env=env, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith(f"iqn-ctl: error: {path}") and want in lines[0], lines
    ok = write(tmp_path, "[global]\nn = 4\n")
    r = subprocess.run([IQN_CTL, "attach", "eth0", "--config", str(ok), "--n", "0"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "iqn-ctl: error: --n must be in 1..1000, got 0", r.stderr
