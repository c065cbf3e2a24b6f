"""Player profiles (``user_agent.profiles``) and the switch guard
(``user_agent.switch``), without a screen: loading and validation (a bad
file is one line), the page answer turned into a layout for a switch in the
player's control bar, and the restore decision after a lost click."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from user_agent.errors import AgentError
from user_agent.layout import Layout, Point, Rect
from user_agent.locate import layout_from_page
from user_agent.profiles import DEFAULT_PROFILE, SHIPPED, load_profile
from user_agent.switch import SwitchGuard


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "XAUTHORITY")}
    return subprocess.run([sys.executable, "-m", "user_agent.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip


def one_error_line(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iqn-agent: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_shipped_profiles() -> None:
    assert DEFAULT_PROFILE == "youtube" and set(SHIPPED) == {"youtube", "lab"}
    yt = load_profile("youtube")
    assert yt.player == "#movie_player"
    assert yt.switch == 'button.ytp-button[data-tooltip-target-id="ytp-autonav-toggle-button"]'
    assert (yt.state, yt.attribute, yt.on) == (".ytp-autonav-toggle-button", "aria-checked", "true")
    assert yt.in_controls and yt.spinner == ".ytp-spinner"
    assert ".ad-showing" in yt.ad and yt.controls_hidden == ".ytp-autohide"
    lab = load_profile("lab")
    assert lab.switch == "#autoplay-toggle" and not lab.in_controls and lab.state == ""


def test_a_user_profile_file(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text('name = "mine"\n[player]\nselector = ".player"\nad = ".ad"\n'
                 '[switch]\nselector = "#auto"\nattribute = "aria-pressed"\n')  # fmt: skip
    p = load_profile(str(f))
    got = (p.name, p.player, p.switch, p.attribute, p.on, p.ad)
    assert got == ("mine", ".player", "#auto", "aria-pressed", "true", ".ad")
    assert not p.in_controls and p.spinner == ".ytp-spinner"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('name = "x\n', "not valid TOML"),
        ('name = "x"\n[switch]\nselector = "#a"\n', "missing player.selector"),
        ('name = "x"\n[player]\nselector = "#p"\n', "missing switch.selector"),
        ('[player]\nselector = "#p"\n[switch]\nselector = "#a"\n', "missing name"),
        ('name = "x"\n[player]\nselector = 3\n[switch]\nselector = "#a"\n', "player.selector must be"),
        ('name = "x"\n[player]\nselector = "#p"\nsize = 1\n[switch]\nselector = "#a"\n',
         "unknown key player.size"),
        ('name = "x"\ncolour = 1\n[player]\nselector = "#p"\n[switch]\nselector = "#a"\n',
         "unknown key colour"),
        ('name = "x"\n[player]\nselector = "#p"\n[switch]\nselector = "#a"\nin_controls = "yes"\n',
         "in_controls must be"),
        ('name = "x"\nplayer = "#p"\n[switch]\nselector = "#a"\n', "[player] must be a table"),
    ],
)
def test_bad_profile_files_are_one_line(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(AgentError, match=None) as e:
        load_profile(str(f))
    assert needle in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


def test_cli_profile_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [\n")
    one_error_line(agent("run", "--profile", str(bad), "--url", "http://127.0.0.1:9/"), str(bad), "TOML")
    one_error_line(agent("run", "--profile", "vimeo", "--url", "http://127.0.0.1:9/"), "unknown profile")
    one_error_line(agent("profiles", "--check", str(tmp_path / "none.toml")), "cannot read")
    ok = agent("profiles")
    assert ok.returncode == 0 and ok.stdout.count("\n") == 2 and "youtube" in ok.stdout, ok.stderr


def answer(**over: object) -> dict[str, object]:
    """A page answer: a 640x360 player at (24, 16) in a 900x557 viewport at the screen's origin."""
    info: dict[str, object] = {
        "win": [0, 0, 900, 557, 900, 557, 1], "player": [24, 16, 640, 360], "switch": [590, 328, 60, 48],
        "truth": [], "state": True, "ad": False, "hidden": False, "page": "http://x/watch?v=1",
    }  # fmt: skip
    info.update(over)
    return info


def test_switch_in_the_control_bar() -> None:
    loc = layout_from_page(answer(), in_controls=True)
    assert loc.layout == Layout(Rect(24, 16, 640, 360), Point(620, 352))
    assert (loc.state, loc.ad, loc.hidden, loc.page) == (True, False, False, "http://x/watch?v=1")
    # the same place for a profile whose switch lives outside the player: covered (fullscreen)
    covered = layout_from_page(answer(), in_controls=False)
    assert covered.layout is None and "covered" in covered.why
    # a control-bar switch above the bottom strip would be in the picture
    high = layout_from_page(answer(switch=[590, 200, 60, 48]), in_controls=True)
    assert high.layout is None and "control bar" in high.why
    # taken out of the layout while the controls are hidden: its last place, if the player stayed
    gone = answer(switch=[0, 0, 0, 0], hidden=True)
    assert layout_from_page(gone, in_controls=True).layout is None
    kept = layout_from_page(gone, in_controls=True, remembered=Point(620, 352))
    assert kept.layout == Layout(Rect(24, 16, 640, 360), Point(620, 352)) and kept.remembered and kept.hidden
    assert layout_from_page(answer(state=None), in_controls=True).state is None
    assert layout_from_page(answer(ad=True), in_controls=True).ad


def test_calibrated_switch_may_sit_in_the_control_bar(tmp_path: Path) -> None:
    pl = Rect(0, 0, 640, 360)
    assert Layout(pl, Point(600, 340)).check()  # bottom strip: YouTube's control bar
    with pytest.raises(AgentError, match="above its control bar"):
        Layout(pl, Point(600, 300)).check()


def test_guard_restores_only_a_lost_click() -> None:
    g = SwitchGuard(settle=0.05)
    assert not g.reading(0.0, True)  # first reading: the user's state
    g.clicked(1.0)  # an even burst
    assert not g.reading(1.01, False)  # too soon after our clicks to judge
    assert not g.reading(1.2, True)  # all landed
    g.clicked(2.0)
    assert g.reading(2.2, False)  # one was lost: click once
    assert g.restores == 1
    g.clicked(2.21)  # the restore click
    assert not g.reading(2.4, True) and not g.pending
    assert not g.reading(3.0, False)  # no click of ours outstanding: the user flipped it
    assert g.user_state is False
    g.clicked(4.0)
    g.user_pressed()  # the user pressed on the switch meanwhile: their choice wins
    assert not g.reading(4.2, True) and g.user_state is True
    assert not g.reading(5.0, None)  # unknown state: nothing to decide
    g.forget()  # a new page
    assert not g.reading(6.0, False) and g.user_state is False and g.restores == 1
