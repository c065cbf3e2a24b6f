"""Player profiles: where a service's player puts the things the agent needs.

A profile names the player element, the autoplay switch and how to read its
state, the spinner (for ground truth), and the service's quirks: whether the
switch lives in the player's control bar (which fades out during playback),
and which class marks an ad. It is data, not code, so a user can describe
another service in a small TOML file (``--profile FILE``) without touching
the agent; ``youtube`` (the default) and ``lab`` ship in ``profiles/``.

Why the state matters: the agent's bursts are even so the switch ends as the
user left it; reading the state before and after lets it notice a lost click
and put the switch back (:mod:`user_agent.switch`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import AgentError

DEFAULT_PROFILE = "youtube"
SHIPPED = ("youtube", "lab")

#: keys a profile file may hold, per table, and whether each is required
_SCHEMA: dict[str, dict[str, bool]] = {
    "": {"name": True, "description": False},
    "player": {"selector": True, "ad": False, "controls_hidden": False},
    "switch": {"selector": True, "state": False, "attribute": False, "on": False, "in_controls": False},
    "spinner": {"selector": False},
}


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    player: str
    switch: str
    #: element holding the state, relative to the switch ("" = the switch itself)
    state: str = ""
    attribute: str = "aria-checked"
    on: str = "true"
    #: the switch sits in the player's bottom control strip (YouTube), not outside the player
    in_controls: bool = False
    spinner: str = ".ytp-spinner"
    ad: str = ""
    controls_hidden: str = ""
    description: str = ""

    def page_args(self) -> dict[str, str]:
        """What the page-side script needs (passed as an argument, never spliced into code)."""
        return {
            "player": self.player, "switch": self.switch, "state": self.state,
            "attribute": self.attribute, "on": self.on, "ad": self.ad, "hidden": self.controls_hidden,
        }  # fmt: skip


def _text(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}{key} must be a non-empty string")
    return value.strip()


def profile_from_dict(data: dict[str, Any]) -> Profile:
    """A :class:`Profile` from parsed TOML; ValueError names the first bad key."""
    for table, keys in _SCHEMA.items():
        section = data if not table else data.get(table, {})
        if table and not isinstance(section, dict):
            raise ValueError(f"[{table}] must be a table")
        for key in section:
            if not table and key in _SCHEMA:
                continue
            if key not in keys:
                raise ValueError(f"unknown key {(table + '.') if table else ''}{key}")
        for key, required in keys.items():
            if required and key not in section:
                raise ValueError(f"missing {(table + '.') if table else ''}{key}")
    player, switch, spinner = data["player"], data["switch"], data.get("spinner", {})
    in_controls = switch.get("in_controls", False)
    if not isinstance(in_controls, bool):
        raise ValueError("switch.in_controls must be true or false")
    opt = {}
    for where, section, key, field in (
        ("switch.", switch, "state", "state"), ("switch.", switch, "attribute", "attribute"),
        ("switch.", switch, "on", "on"), ("spinner.", spinner, "selector", "spinner"),
        ("player.", player, "ad", "ad"), ("player.", player, "controls_hidden", "controls_hidden"),
    ):  # fmt: skip
        if key in section:
            opt[field] = _text(where, key, section[key])
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise ValueError("description must be a string")
    return Profile(
        name=_text("", "name", data["name"]),
        player=_text("player.", "selector", player["selector"]),
        switch=_text("switch.", "selector", switch["selector"]),
        in_controls=in_controls,
        description=desc,
        **opt,
    )


def load_profile(spec: str | Path = DEFAULT_PROFILE) -> Profile:
    """A shipped profile by name, or a TOML file by path; one-line AgentError otherwise."""
    text_spec = str(spec)
    if text_spec in SHIPPED:
        path = Path(str(resources.files("user_agent") / "profiles" / f"{text_spec}.toml"))
    elif text_spec.endswith(".toml") or "/" in text_spec or Path(text_spec).exists():
        path = Path(text_spec)
    else:
        raise AgentError(
            f"unknown profile {text_spec!r}: give one of {', '.join(SHIPPED)} or a .toml file"
        )
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise AgentError(f"profile {path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise AgentError(f"profile {path}: not valid TOML: {e}") from None
    try:
        return profile_from_dict(data)
    except (ValueError, KeyError, TypeError) as e:
        raise AgentError(f"profile {path}: {e}") from None
