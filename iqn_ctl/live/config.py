"""The agent's config file, ``/etc/iqn/iqn.toml`` (``iqn-ctl attach --config FILE``).

Why a file: a router's agent is set up once and then started by systemd; a
line of flags in ``IQN_ARGS`` is hard to review, cannot differ per interface,
and a typo in it is found only when the unit fails. The file has two kinds of
section::

    [global]              # every interface's settings
    p = 0.2
    metrics-port = 9464

    [interfaces.eth0]     # one section per interface: these override [global] for it
    hook = "auto"

    [interfaces."eth0.100"]   # names with a dot are quoted
    pairing = "off"

Every ``attach`` flag has a key: its long name without ``--`` (``min-size``,
``metrics-port``). Keys of the process, not of an interface (:data:`PROCESS_KEYS`:
the metrics address and port, the state and run dirs, ``--daemon``, the watchdog
period, logging) may only be in ``[global]``. Precedence, highest first: a flag
on the command line (or its environment variable), the interface's section,
``[global]``, the built-in default. With interfaces named on the command line
only those are attached (their sections apply, others are ignored); with none,
every ``[interfaces.NAME]`` section is attached, all in one process.

A file that cannot be read or parsed, an unknown section or key, or a value
of the wrong type or out of range is one line naming the file and the key
(:class:`ConfigError`, exit 2); nothing is attached.
"""

from __future__ import annotations

import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iqn_ctl.engine.params import CandidateFilter, SignalParams
from iqn_ctl.errors import IqnError
from iqn_ctl.live.agent import AgentConfig
from iqn_ctl.live.api import check_iface_name
from iqn_ctl.live.supervisor import Shared

if TYPE_CHECKING:
    from iqn_ctl.live.mitigate import MitigateConfig

#: the file the systemd units and the Debian package use
DEFAULT_CONFIG = Path("/etc/iqn/iqn.toml")

#: key -> type of its value in the file ("int", "float", "str", "bool", "on-off",
#: "strings": a string or a list of them). Keys are the attach flags' long names.
KEYS: dict[str, str] = {
    "p": "float", "n": "int", "min-size": "int", "max-size": "int", "port": "int",
    "xdp-mode": "str", "key": "str", "max-flows": "int", "redact": "bool", "force": "bool",
    "estimator": "str", "ring-pages": "int", "bulk-ratio": "float", "source-rate": "float",
    "slot": "float", "export": "strings", "router-id": "str", "export-replicas": "int", "export-batch": "int",
    "hook": "str", "direction": "str", "backlog": "int", "vol-sample": "int", "pairing": "on-off",
    "pair-window": "float", "cap": "float",
    "mitigate": "str", "link-rate": "str", "boost-rate": "str", "boost-max": "float", "boost-share": "float",
    "boost-gap": "float",
    # process-wide
    "state-dir": "path", "run-dir": "path", "metrics-port": "int", "metrics-addr": "str",
    "daemon": "bool", "watchdog": "float", "log-level": "str", "log-format": "str", "group": "str",
}
#: keys of the whole process: only in [global]
PROCESS_KEYS = frozenset({"state-dir", "run-dir", "metrics-port", "metrics-addr", "daemon", "watchdog",
                          "log-level", "log-format", "group"})


class ConfigError(IqnError):
    """The config file is unusable; the message names the file and the key."""


@dataclass
class Resolved:
    """The settings of one run: the process's, and each interface's (key -> value,
    every key of :data:`KEYS`, defaults and flags included), in attach order."""

    process: dict[str, Any]
    interfaces: dict[str, dict[str, Any]]
    #: (interface -> key -> where its value came from): "flag", "default", or the
    #: file's "[global]" / "[interfaces.NAME]": for errors that name the key
    origin: dict[str, dict[str, str]]


def _type_problem(kind: str, v: Any) -> str | None:
    if kind == "int":
        return None if isinstance(v, int) and not isinstance(v, bool) else "a whole number"
    if kind == "float":
        return None if isinstance(v, int | float) and not isinstance(v, bool) else "a number"
    if kind in ("str", "path"):
        return None if isinstance(v, str) else "a string"
    if kind == "bool":
        return None if isinstance(v, bool) else "true or false"
    if kind == "on-off":
        return None if isinstance(v, bool) or v in ("on", "off") else '"on" or "off" (or true/false)'
    if kind == "strings":
        ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        return None if ok else "a string or a list of strings"
    raise AssertionError(kind)


def _value(kind: str, v: Any) -> Any:
    """A checked TOML value as the flag's value."""
    if kind == "float":
        return float(v)
    if kind == "path":
        return Path(v)
    if kind == "on-off":
        return ("on" if v else "off") if isinstance(v, bool) else v
    if kind == "strings":
        return [v] if isinstance(v, str) else list(v)
    return v


def read(path: Path) -> dict[str, dict[str, Any]]:
    """The file's sections, checked: ``{"global": {key: value}, "eth0": {...}, ...}``
    (values as the flags take them)."""
    where = str(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError(f"{where}: not a regular file")
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{where}: permission denied") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not valid TOML: not UTF-8 text") from None
    out: dict[str, dict[str, Any]] = {"global": {}}
    for name, body in doc.items():
        if name == "global":
            out["global"] = _section(where, "global", body, process=True)
        elif name == "interfaces":
            if not isinstance(body, dict):
                raise ConfigError(f"{where}: interfaces: must be sections [interfaces.NAME]")
            for iface, sect in body.items():
                try:
                    check_iface_name(iface)
                except IqnError as e:
                    raise ConfigError(f"{where}: [interfaces.{iface}]: {e}") from None
                out[iface] = _section(where, f"interfaces.{iface}", sect, process=False)
        elif isinstance(body, dict):
            raise ConfigError(f"{where}: [{name}]: unknown section (sections: [global], [interfaces.NAME])")
        else:
            raise ConfigError(f"{where}: {name}: a key outside any section; put it under [global]")
    return out


def _section(where: str, name: str, body: Any, process: bool) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: {name}: must be a section [{name}]")
    out = {}
    for key, v in body.items():
        kind = KEYS.get(key)
        if kind is None:
            near = key.replace("_", "-")
            hint = f" (did you mean {near}?)" if near in KEYS else ""
            raise ConfigError(f"{where}: [{name}] {key}: unknown key{hint}")
        if key in PROCESS_KEYS and not process:
            raise ConfigError(f"{where}: [{name}] {key}: a setting of the whole process: put it in [global]")
        problem = _type_problem(kind, v)
        if problem:
            raise ConfigError(f"{where}: [{name}] {key}: must be {problem}, got {v!r}")
        out[key] = _value(kind, v)
    return out


def resolve(path: Path | None, ifaces: list[str], values: Mapping[str, Any], explicit: set[str]) -> Resolved:
    """Merge defaults, the file and the flags. ``values``: every key's value as
    the command line has it (its default when not given); ``explicit``: the keys
    given on the command line (or by environment variable)."""
    twice = sorted({i for i in ifaces if ifaces.count(i) > 1})
    if twice:
        raise ConfigError(f"interface {twice[0]} named twice")
    sections = read(path) if path is not None else {"global": {}}
    glob = sections.pop("global")
    if not ifaces:
        if path is None:
            raise ConfigError("no interface: name one (iqn-ctl attach IFACE ...) or give --config FILE")
        ifaces = list(sections)
        if not ifaces:
            raise ConfigError(f"{path}: no [interfaces.NAME] section: name an interface on the command "
                              "line or add a section for it")
    gname = "[global]"
    process: dict[str, Any] = {}
    origin: dict[str, dict[str, str]] = {}
    for key in PROCESS_KEYS:
        if key in explicit or key not in glob:
            process[key] = values[key]
        else:
            process[key] = glob[key]
    out: dict[str, dict[str, Any]] = {}
    for iface in ifaces:
        own = sections.get(iface, {})
        opts, src = {}, {}
        for key in KEYS:
            if key in PROCESS_KEYS:
                continue
            if key in explicit:
                opts[key], src[key] = values[key], "flag"
            elif key in own:
                opts[key], src[key] = own[key], f"[interfaces.{iface}]"
            elif key in glob:
                opts[key], src[key] = glob[key], gname
            else:
                opts[key], src[key] = values[key], "default"
        out[iface] = opts
        origin[iface] = src
    origin[""] = {k: ("flag" if k in explicit else gname if k in glob else "default") for k in PROCESS_KEYS}
    return Resolved(process, out, origin)


def blame(path: Path | None, src: Mapping[str, str], merged: Mapping[str, Any], base: Mapping[str, Any],
          build: Callable[[dict[str, Any]], object], err: Exception) -> ConfigError | None:
    """Which key of the file made ``build(merged)`` fail with ``err``: each value
    the file gave (``src``: key -> where it came from) is tried alone on ``base``
    (the command line's values); the first that fails alone is named, else the
    sections involved. None when the file is not to blame (a flag is)."""
    if path is None:
        return None
    from_file = [k for k, where in src.items() if where not in ("flag", "default")]
    if not from_file:
        return None
    for key in from_file:
        try:
            build({**base, key: merged[key]})
        except IqnError as e:
            return ConfigError(f"{path}: {src[key]} {key}: {e}")
    sections = sorted({src[k] for k in from_file})
    return ConfigError(f"{path}: {', '.join(sections)}: {err}")


def mitigate_config(o: Mapping[str, Any]) -> MitigateConfig | None:
    """The --mitigate settings (None without it); a bad value is a one-line error."""
    if o["mitigate"] is None:
        if o["link-rate"] is not None:
            raise ConfigError("--link-rate needs --mitigate EGRESS_IFACE")
        return None
    from iqn_ctl.live.mitigate import MitigateConfig, MitigateError, parse_rate

    try:
        link = parse_rate(o["link-rate"], "--link-rate") if o["link-rate"] else None
        rate = parse_rate(o["boost-rate"], "--boost-rate")
        cfg = MitigateConfig(o["mitigate"], link, rate, o["boost-share"], o["boost-max"], o["boost-gap"])
    except MitigateError as e:
        raise ConfigError(str(e)) from None
    problem = cfg.problem()
    if problem:
        raise ConfigError(problem)
    return cfg


def agent_config(iface: str, o: Mapping[str, Any], state_dir: Path, group: str | None = None) -> AgentConfig:
    """One interface's :class:`AgentConfig` from its keys, validated (IqnError naming the flag)."""
    if o["pairing"] not in ("on", "off"):
        raise ConfigError(f"--pairing must be on or off, got {o['pairing']!r}")
    cfg = AgentConfig(
        iface=iface, params=SignalParams(o["p"], o["n"]),
        filt=CandidateFilter(o["port"], o["min-size"], o["max-size"]),
        estimator=o["estimator"], key_mode=o["key"], max_flows=o["max-flows"], xdp_mode=o["xdp-mode"],
        force=o["force"], state_dir=state_dir, ring_pages=o["ring-pages"], bulk_ratio=o["bulk-ratio"],
        redact=o["redact"], source_rate=o["source-rate"], slot=o["slot"], export=tuple(o["export"] or ()),
        router_id=o["router-id"], export_replicas=o["export-replicas"], export_batch=o["export-batch"],
        hook=o["hook"], direction=o["direction"], backlog=o["backlog"], vol_sample=o["vol-sample"],
        pairing=o["pairing"] == "on",
        pair_window=o["pair-window"], cap=o["cap"], group=group, mitigate=mitigate_config(o),
    )
    cfg.validate()
    return cfg


def shared_settings(o: Mapping[str, Any]) -> Shared:
    """The process's settings from its keys, validated."""
    from iqn_common.logsetup import check as check_log

    check_log(o["log-level"], o["log-format"], ConfigError)
    sh = Shared(metrics_port=o["metrics-port"], metrics_addr=o["metrics-addr"], run_dir=Path(o["run-dir"]),
                watchdog=o["watchdog"])
    sh.validate()
    return sh


def load(path: Path | None, ifaces: list[str], values: Mapping[str, Any],
         explicit: set[str]) -> tuple[Shared, list[AgentConfig], dict[str, Any]]:
    """Everything ``attach`` runs with: the process's settings, one AgentConfig per
    interface (attach order), and the process keys (``daemon``, ``state-dir``...).
    An error caused by the file names the file and the key (:class:`ConfigError`)."""
    res = resolve(path, ifaces, values, explicit)
    base = {k: v for k, v in values.items() if k not in PROCESS_KEYS}
    try:
        shared = shared_settings(res.process)
    except IqnError as e:
        raise blame(path, res.origin[""], res.process, values, shared_settings, e) or e from None
    state_dir, group = Path(res.process["state-dir"]), res.process["group"]
    cfgs = []
    for iface, opts in res.interfaces.items():
        try:
            cfgs.append(agent_config(iface, opts, state_dir, group))
        except IqnError as e:
            def build(o: dict[str, Any], iface: str = iface) -> object:
                return agent_config(iface, o, state_dir, group)

            raise blame(path, res.origin[iface], opts, base, build, e) or e from None
    return shared, cfgs, res.process
