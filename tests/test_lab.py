"""The lab for real: namespaces, OpenVPN, nftables NAT, tbf, aioquic HTTP/3 and
headless Chromium in the client namespace. One lab (and one browser) serves
the whole module; both are always torn down."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import need, need_root

CANDIDATE = (1180, 1288)


def lab_prefix(tag: str) -> str:
    return f"{tag}{os.getpid() % 10000:04d}{random.SystemRandom().randrange(256):02x}"


def need_lab_tools() -> None:
    need_root()
    for tool in ("openvpn", "nft", "ffmpeg"):
        need(shutil.which(tool) is not None, f"needs {tool} (scripts/setup.sh installs it)")
    need(os.path.exists("/dev/net/tun"), "needs /dev/net/tun for OpenVPN")


def wait_for(check: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    """Poll until ``check()`` is truthy (a readiness wait, not a timing assert)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting {timeout:.0f} s for {what}")
        time.sleep(step)


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    need_lab_tools()
    from iqn_lab.lab import Lab

    lab = Lab(lab_prefix("lt"))
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def browser(lab: Any) -> Iterator[Any]:
    need(os.path.exists("/usr/bin/chromium"), "needs Debian's chromium")
    need(os.path.exists("/usr/bin/chromedriver"), "needs Debian's chromium-driver")
    from iqn_lab.browser import client_webdriver

    with client_webdriver(lab) as driver:
        driver.get(lab.player_url)
        yield driver


PLAYER_STATE = """
const v = document.querySelector('#movie_player video');
const s = document.querySelector('#movie_player .ytp-spinner');
return {t: v.currentTime, spinner: getComputedStyle(s).display, stalls: window.iqnPlayer.stalls,
        ok: window.iqnPlayer.autoplayOk, errors: window.iqnPlayer.errors};
"""


def state(driver: Any) -> dict[str, Any]:
    return dict(driver.execute_script(PLAYER_STATE))


def test_up_is_idempotent_and_status_reports_it(lab: Any) -> None:
    before = lab.health()
    assert before.up and before.tunnel
    lab.up()  # again: nothing is rebuilt
    after = lab.health()
    assert after.daemons == before.daemons
    r = subprocess.run(
        [sys.executable, "-m", "iqn_lab.cli", "status", "--prefix", lab.prefix, "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    st = json.loads(r.stdout)
    assert st["up"] and st["router_ott_iface"] == f"{lab.prefix}-r1" and st["rate"] == "none"
    assert set(st["namespaces"].values()) == {
        f"{lab.prefix}-client",
        f"{lab.prefix}-router",
        f"{lab.prefix}-ott",
    }
    assert any(a.startswith("--ignore-certificate-errors-spki-list=") for a in st["chrome_args"])


def test_bottleneck_rate_and_schedule(lab: Any) -> None:
    lab.set_rate("300kbit")
    assert lab.rate() == 300_000
    tc = lab.exec(
        "router", ["tc", "qdisc", "show", "dev", f"{lab.prefix}-r0"], capture_output=True, text=True
    )
    assert "tbf" in tc.stdout and "300Kbit" in tc.stdout
    lab.set_rate(None)
    assert lab.rate() is None
    try:
        lab.run_schedule("0:500kbit,1.5:2mbit")
        wait_for(lambda: lab.rate() == 500_000, 5, "the schedule's first step")
        wait_for(lambda: lab.rate() == 2_000_000, 10, "the schedule's second step")
    finally:
        lab.stop_schedule()
        lab.set_rate(None)


def test_vm_shaping_script_sets_the_same_bottleneck(lab: Any) -> None:
    """The router VM's shape.sh (tc) and the lab (pyroute2) share shaping.env."""
    from iqn_lab.templates import TEMPLATE_DIR

    iface = f"{lab.prefix}-r0"
    try:
        r = lab.exec(
            "router", ["sh", str(TEMPLATE_DIR / "shape.sh"), iface, "700kbit"], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        assert lab.rate() == 700_000
        tc = lab.exec("router", ["tc", "qdisc", "show", "dev", iface], capture_output=True, text=True).stdout
        lab.set_rate("700kbit")
        assert (
            lab.exec("router", ["tc", "qdisc", "show", "dev", iface], capture_output=True, text=True).stdout
            == tc
        )
        assert lab.exec("router", ["sh", str(TEMPLATE_DIR / "shape.sh"), iface, "none"]).returncode == 0
        assert lab.rate() is None
    finally:
        lab.set_rate(None)


def test_chromium_plays_over_h3_stalls_under_300kbit_and_recovers(lab: Any, browser: Any) -> None:
    wait_for(lambda: state(browser)["t"] > 1.0, 30, "the video to play")
    protos = browser.execute_script(
        "return [performance.getEntriesByType('navigation')[0].nextHopProtocol,"
        " ...performance.getEntriesByType('resource').filter(e => e.name.includes('.m4s'))"
        ".map(e => e.nextHopProtocol)]"
    )
    assert protos[0] == "h3" and len(protos) > 1 and set(protos[1:]) == {"h3"}
    assert state(browser)["spinner"] == "none"

    lab.set_rate("300kbit")
    try:
        stalled = wait_for(lambda: (s := state(browser))["spinner"] == "block" and s, 40, "a stall (spinner)")
        assert stalled["stalls"][-1][1] is None  # the open stall is recorded
        # Starve the player (the token bucket's 8 kB burst cannot finish a segment), so
        # a stall holds until its picture has been checked; should the segment in flight
        # have been about done, the next stall is the one checked.
        lab.set_rate("8kbit")

        def a_second_of_stall() -> tuple[dict[str, Any], dict[str, Any]] | None:
            first = wait_for(lambda: (s := state(browser))["spinner"] == "block" and s, 40, "a stall")
            time.sleep(1.0)  # the user waits a second; the check below does not depend on how long
            later = state(browser)
            same = later["spinner"] == "block" and later["stalls"] == first["stalls"]
            return (first, later) if same else None

        first, later = wait_for(a_second_of_stall, 60, "a stall that lasts a second under starvation")
        assert later["t"] == pytest.approx(first["t"], abs=0.05)  # waiting: the picture does not move
    finally:
        lab.set_rate(None)
    t0 = state(browser)["t"]
    wait_for(lambda: state(browser)["t"] > t0 + 3.0, 30, "playback to recover once the bottleneck is lifted")
    end = state(browser)
    assert end["spinner"] == "none" and all(s[1] is not None for s in end["stalls"])
    log = [json.loads(line) for line in lab.request_log.read_text().splitlines()]
    assert any(e["host"] == "media.iqn.test" and e["path"].startswith("/seg-") for e in log)


def test_autoplay_toggles_give_candidate_packets_on_router_ott_side(lab: Any, browser: Any) -> None:
    from iqn_lab import topology as T
    from iqn_lab.capture import Capture

    wait_for(lambda: state(browser)["t"] > 0.5, 30, "the video to play")
    rounds = 3
    ok0 = state(browser)["ok"]
    with Capture(lab.router_ns, lab.router_ott_iface) as cap:
        for i in range(rounds):  # n = 4 toggles, < 5 ms apart, as the end-user agent sends them
            browser.execute_script(
                "const b = document.getElementById('autoplay-toggle'); for (let i = 0; i < 4; i++) b.click();"
            )
            wait_for(lambda i=i: state(browser)["ok"] >= ok0 + 4 * (i + 1), 10, "four 200 OK answers")
            time.sleep(1.1)  # next round in another second: new Date header, other QPACK state
        time.sleep(0.3)
    www = [f.length for f in cap.frames if (f.src, f.sport) == (T.OTT_WWW, 443)]
    candidates = [n for n in www if CANDIDATE[0] <= n <= CANDIDATE[1]]
    assert len(candidates) == 4 * rounds, www
    assert len(set(candidates)) > 1  # sizes vary like a real service's
    media = Counter(f.length for f in cap.frames if (f.src, f.sport) == (T.OTT_MEDIA, 443))
    assert media.most_common(1)[0][0] == 1292 and max(media) == 1292, media
    log = [json.loads(line) for line in lab.request_log.read_text().splitlines()]
    posts = [e for e in log if e["path"] == "/api/autoplay"]
    assert len(posts) >= 4 * rounds and all(e["status"] == 200 for e in posts)
    assert sorted(e["frame"] for e in posts[-4 * rounds :]) == sorted(candidates)


def test_xdp_agent_on_the_router_counts_the_autoplay_candidates(
    lab: Any, browser: Any, tmp_path: Any
) -> None:
    """The ISP agent (``iqn-ctl attach``, real XDP) on the router's OTT-facing
    interface sees each round of toggles as n candidates of the page's flow."""
    from iqn_lab import topology as T

    iqn_ctl = shutil.which("iqn-ctl", path=os.path.dirname(sys.executable))
    need(iqn_ctl is not None, "needs the iqn-ctl console script")
    assert iqn_ctl is not None
    env = dict(os.environ, IQN_RUN_DIR=str(tmp_path / "run"), IQN_STATE_DIR=str(tmp_path / "state"))

    def ctl(*args: str) -> Any:
        r = subprocess.run([iqn_ctl, *args, "--json"], capture_output=True, text=True, env=env)
        return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None

    agent = lab.popen("router", [iqn_ctl, "attach", lab.router_ott_iface], env=env,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_for(
            lambda: agent.poll() is not None or (ctl("status") or [{}])[0].get("running"), 60, "the agent"
        )
        assert agent.poll() is None, agent.stdout.read() if agent.stdout else ""
        wait_for(lambda: state(browser)["t"] > 0.5, 30, "the video to play")
        ok0 = state(browser)["ok"]
        browser.execute_script(
            "const b = document.getElementById('autoplay-toggle'); for (let i = 0; i < 4; i++) b.click();"
        )
        wait_for(lambda: state(browser)["ok"] >= ok0 + 4, 10, "four 200 OK answers")

        def www_flow() -> Any:
            return next((f for f in ctl("flows") or [] if f["server"] == T.OTT_WWW), None)

        flow = wait_for(lambda: (f := www_flow()) and f["candidates"] >= 4 and f, 10, "the agent's flow")
        assert flow["candidates"] == 4 and flow["flow"].startswith(f"{T.OTT_WWW}:443>{T.OTT_NET_ROUTER}:")
        assert ctl("status")[0]["packets"] > flow["candidates"]  # it saw the video too
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def test_ott_answers_bad_requests_with_errors_not_crashes(lab: Any, browser: Any) -> None:
    codes = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const st = (p) => p.then((r) => r.status, (e) => String(e));
        Promise.all([
          st(fetch('/no-such-page')),
          st(fetch('/api/autoplay', {method: 'POST', body: '{not json'})),
          st(fetch('/media.json', {method: 'DELETE'})),
          st(fetch('https://media.iqn.test/../../etc/passwd')),
          st(fetch('https://media.iqn.test/seg-99999.m4s')),
          st(fetch('/media.json')),
        ]).then(done);
        """
    )
    assert codes == [404, 400, 405, 404, 404, 200]
    assert lab.health().daemons["ott"] is not None


def test_jitter_delays_the_server_to_client_path(lab: Any) -> None:
    """`iqn-lab jitter` puts the delay line on the OTT's egress: every answer
    to the client leaves at least the configured delay late (a lower bound the
    delay line guarantees, whatever the load); `off` takes it away again.
    The distribution itself is measured in tests/test_lab_jitter.py."""
    from iqn_lab import topology as T

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "iqn_lab.cli", "jitter", *args, "--prefix", lab.prefix],
                              capture_output=True, text=True, timeout=180)  # fmt: skip

    def filters() -> str:
        return lab.exec("ott", ["tc", "filter", "show", "dev", f"{lab.prefix}-o0", "egress"],
                        capture_output=True, text=True).stdout  # fmt: skip

    on = cli("0.3", "--dist", "constant")
    assert on.returncode == 0, on.stderr
    try:
        assert "iqn_jitter" in filters()
        ping = lab.exec("client", ["ping", "-n", "-c", "4", "-i", "0.2", "-W", "10", T.OTT_WWW],
                        capture_output=True, text=True, timeout=60)  # fmt: skip
        rtts = [float(x.split("time=")[1].split()[0]) for x in ping.stdout.splitlines() if "time=" in x]
        assert len(rtts) == 4 and min(rtts) >= 300.0, ping.stdout
    finally:
        off = cli("off")
    assert off.returncode == 0 and "jitter off" in off.stdout, off.stderr
    assert "iqn_jitter" not in filters()
