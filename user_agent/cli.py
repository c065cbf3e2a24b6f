"""The ``iqn-agent`` command line: run the agent, calibrate it, record ground truth.

Every expected failure ends as one ``iqn-agent: error: ...`` line and exit
status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer

from .errors import AgentError
from .profiles import DEFAULT_PROFILE
from .protocol import DEFAULT_N, DEFAULT_P, DEFAULT_PROTOCOL

app = typer.Typer(
    name="iqn-agent",
    help="IQN end-user agent: see video stalls on screen and signal them in band (autoplay toggles).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def _show_version(value: bool) -> None:
    if value:
        from .version import version_line

        typer.echo(version_line("iqn-agent"))
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_show_version,
        help="print the version (and the git commit when run from a checkout) and exit",
    ),
) -> None:
    pass


def say(msg: str) -> None:
    typer.echo(f"iqn-agent: {msg}", err=True)


def friendly(fn: F) -> F:
    """Expected errors become one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AgentError as e:
            typer.echo(f"iqn-agent: error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM, so the loop ends cleanly and files are complete."""
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _timer(stop: threading.Event, duration: float | None) -> None:
    if duration is not None:
        if duration <= 0:
            raise AgentError(f"--duration must be positive, got {duration}")
        t = threading.Timer(duration, stop.set)
        t.daemon = True
        t.start()


def _writer(path: Path | None) -> Any:
    from .truth import open_output

    return open_output(path) if path else contextlib.nullcontext(None)


@app.command()
@friendly
def run(
    p: float = typer.Option(
        DEFAULT_P, "--p", help="seconds between screen grabs (and signals during a stall)"
    ),
    n: int = typer.Option(DEFAULT_N, "--n", help="toggles per signal (even, so the switch ends as it was)"),
    url: str | None = typer.Option(None, "--url", help="open this player page in a new Chromium"),
    calibration: Path | None = typer.Option(
        None, "--calibration", help="use positions from 'iqn-agent calibrate' (a browser you started)"
    ),
    attach: str | None = typer.Option(
        None, "--attach", help="use a Chromium you started with --remote-debugging-port (HOST:PORT)"
    ),
    log: Path | None = typer.Option(None, "--log", help="write the Detected_clicks log here"),
    truth: Path | None = typer.Option(None, "--truth", help="also record spinner ground truth (Real_stalls)"),
    chrome_arg: list[str] = typer.Option([], "--chrome-arg", help="extra Chromium flag (repeatable)"),
    duration: float | None = typer.Option(None, "--duration", help="stop after this many seconds"),
    grabber: str = typer.Option("mss", "--grabber", help="screen grabber: mss or pillow"),
    profile: str = typer.Option(
        DEFAULT_PROFILE, "--profile",
        help="player profile: youtube, lab, or a .toml file naming the player, switch and spinner",
    ),
    protocol: str = typer.Option(
        DEFAULT_PROTOCOL, "--protocol",
        help="signal protocol: edges (look every p/5, the toggle count carries the stall's duration) "
        "or tick (the paper's: look every p, n toggles per look in a stall)",
    ),
) -> None:
    """Watch the player and signal stalls until Ctrl-C (or --duration)."""
    from .agent import run_agent
    from .capture import make_grabber
    from .layout import load_calibration
    from .locate import FixedLocator, Locator, SeleniumLocator
    from .profiles import load_profile
    from .protocol import check_n, check_p, check_protocol, look_interval
    from .signaler import Signaler
    from .truth import TruthRecorder

    check_n(n)
    check_p(p)
    check_protocol(protocol)
    prof = load_profile(profile)  # a bad profile is one line before anything starts
    if sum(x is not None for x in (url, calibration, attach)) != 1:
        raise AgentError("give exactly one of --url, --calibration or --attach")
    if calibration is not None and truth is not None:
        raise AgentError("--truth needs the page (use --url or --attach, not --calibration)")
    driver = None
    locator: Locator
    if calibration is not None:
        locator = FixedLocator(load_calibration(calibration))
    with contextlib.ExitStack() as stack:
        log_f = stack.enter_context(_writer(log))
        truth_f = stack.enter_context(_writer(truth))
        if calibration is None:
            from .browser import start_chromium

            driver = start_chromium(url, chrome_arg, attach)
            # our browser goes with us; an attached one stays, only our chromedriver stops
            stack.callback(driver.quit if attach is None else driver.service.stop)
            locator = SeleniumLocator(driver, truth=truth is not None, profile=prof)
        sig = Signaler(n)
        grab = stack.enter_context(contextlib.closing(make_grabber(grabber)))
        stop = stack.enter_context(stop_on_signals())
        _timer(stop, duration)
        say(f"watching the player every {look_interval(p, protocol):g} s; a stall sends {n} toggles "
            f"per {p:g} s (protocol {protocol}; Ctrl-C stops)")
        stats = run_agent(
            locator,
            stop,
            p=p,
            n=n,
            log=log_f,
            truth=TruthRecorder(truth_f) if truth_f else None,
            grabber=grab,
            signaler=sig,
            protocol=protocol,
        )
    filtered = ", ".join(f"{k} {v}" for k, v in sorted(stats.filtered.items())) or "none"
    say(
        f"{stats.frames} grabs, {stats.signals} signals ({stats.toggles} toggles), filtered: {filtered}, "
        f"grabs lost: {stats.grab_failures} (retried {stats.grab_retries}), "
        f"no player in view: {stats.no_layout}, switch restores: {stats.restores}, "
        f"navigations: {stats.navigations}"
    )


@app.command()
@friendly
def calibrate(
    out: Path = typer.Option(Path("iqn-agent.json"), "--out", help="where to save the positions"),
    still: float = typer.Option(1.5, "--still", help="seconds the pointer must rest to record a position"),
    timeout: float = typer.Option(120.0, "--timeout", help="give up after this many seconds"),
) -> None:
    """Record where the player and the autoplay switch are, by hovering over them."""
    from .calibrate import calibrate as do_calibrate
    from .layout import save_calibration

    if still <= 0 or timeout <= 0:
        raise AgentError("--still and --timeout must be positive")
    if not os.environ.get("DISPLAY"):
        raise AgentError("no X display: set DISPLAY to the screen the browser is on")
    layout = do_calibrate(say, still, timeout)
    save_calibration(layout, out, os.environ.get("DISPLAY", ""))
    pl = layout.player
    say(f"player {pl.width}x{pl.height} at {pl.left},{pl.top}; switch at {layout.switch.x},{layout.switch.y}")
    say(f"saved {out}; run: iqn-agent run --calibration {out}")


@app.command()
@friendly
def truth(
    out: Path = typer.Option(Path("Real_stalls.txt"), "--out", help="Real_stalls file to write"),
    url: str | None = typer.Option(None, "--url", help="open this player page in a new Chromium"),
    attach: str | None = typer.Option(
        None, "--attach", help="record from a Chromium started with --remote-debugging-port (HOST:PORT)"
    ),
    chrome_arg: list[str] = typer.Option([], "--chrome-arg", help="extra Chromium flag (repeatable)"),
    duration: float | None = typer.Option(None, "--duration", help="stop after this many seconds"),
    poll: float = typer.Option(0.2, "--poll", help="seconds between collections (times are exact anyway)"),
    profile: str = typer.Option(
        DEFAULT_PROFILE, "--profile", help="player profile (its spinner is recorded)"
    ),
) -> None:
    """Record when the page's spinner is shown and hidden (paper's Real_stalls.txt format)."""
    from .browser import start_chromium
    from .profiles import load_profile
    from .truth import open_output, record_truth

    prof = load_profile(profile)
    if (url is None) == (attach is None):
        raise AgentError("give exactly one of --url or --attach")
    if poll <= 0:
        raise AgentError("--poll must be positive")
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open_output(out))
        driver = start_chromium(url, chrome_arg, attach)
        stack.callback(driver.quit if attach is None else driver.service.stop)
        stop = stack.enter_context(stop_on_signals())
        _timer(stop, duration)
        say(f"recording spinner times to {out} (Ctrl-C stops)")
        rec = record_truth(driver, f, stop, poll, prof.spinner)
    say(f"{rec.stalls} stalls recorded")


@app.command()
@friendly
def profiles(
    check: Path | None = typer.Option(None, "--check", help="validate this profile file and show it"),
) -> None:
    """List the shipped player profiles (or check a profile file)."""
    from .profiles import SHIPPED, load_profile

    for spec in [str(check)] if check is not None else list(SHIPPED):
        prof = load_profile(spec)
        typer.echo(f"{prof.name}: player {prof.player}; switch {prof.switch}"
                   f"{' (in the control bar)' if prof.in_controls else ''}; spinner {prof.spinner}"
                   f"{'; ads ' + prof.ad if prof.ad else ''} - {prof.description}")


#: what the end-user agent needs beyond the base install: the 'user' role
USER_MODULES = ("selenium", "pyautogui", "mss", "PIL")


def main() -> None:
    import importlib.util
    import sys

    if sys.argv[1:] == ["--version"]:  # on any install, before the role's modules are needed
        from .version import version_line

        print(version_line("iqn-agent"))
        raise SystemExit(0)
    for m in USER_MODULES:  # one line naming the extra, not a traceback from deep inside
        if importlib.util.find_spec(m) is None:
            print(f"iqn-agent: error: {m} is missing: install the 'user' role: pip install 'iqn[user]' "
                  "(or bash scripts/setup.sh)", file=sys.stderr)
            raise SystemExit(2)
    app(prog_name="iqn-agent")


if __name__ == "__main__":
    main()
