"""The lab's own attack surface on the host (issue 10, part C): the chromedriver
relay, the Xvfb screen, the private keys, the state dir and the media cache's
temp dir, each tried by the local user ``nobody`` or by a planted file."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need, need_root

from iqn_lab import netns
from iqn_lab.browser import NetnsForwarder
from iqn_lab.certs import make_cert
from iqn_lab.lab import Lab
from iqn_lab.ott.media import MediaSpec, ensure_media
from iqn_lab.testbed import run_prefix, sh

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
PRECIOUS = b"precious: must never be overwritten\n"
GREETING = b"chromedriver stand-in\n"
#: connect to the relay, send a request, print what came back (b'' when closed)
CLIENT = (
    "import socket, sys\n"
    "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)\n"
    "s.sendall(b'GET /status HTTP/1.1\\r\\n\\r\\n')\n"
    "buf = b''\n"
    "while True:\n"
    "    try:\n"
    "        chunk = s.recv(4096)\n"
    "    except ConnectionResetError:\n"
    "        break\n"
    "    if not chunk:\n"
    "        break\n"
    "    buf += chunk\n"
    "print(repr(buf))\n"
)


@pytest.fixture
def namespace() -> Iterator[str]:
    need_root()
    ns = f"{run_prefix()}r"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns
    finally:
        sh("ip", "netns", "del", ns, check=False)


def test_chromedriver_relay_serves_only_its_own_user(namespace: str) -> None:
    """A stand-in for the root chromedriver listens inside the namespace; the
    relay on the host's loopback passes root's connection and closes nobody's
    before it reaches the driver."""
    need(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    driver = netns.ns_socket(namespace, socket.AF_INET, socket.SOCK_STREAM)
    driver.bind(("127.0.0.1", 0))
    driver.listen(8)
    driver.settimeout(0.2)
    reached: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = driver.accept()
            except TimeoutError:
                continue
            reached.append(1)
            conn.recv(4096)
            conn.sendall(GREETING)
            conn.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    fwd = NetnsForwarder(namespace, driver.getsockname()[1])
    try:
        def client(*prefix: str) -> str:
            r = subprocess.run([*prefix, sys.executable, "-c", CLIENT, str(fwd.port)],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            return r.stdout.strip()

        assert client() == repr(GREETING)
        assert reached == [1]
        assert client(*NOBODY) == repr(b"")
        assert client() == repr(GREETING)  # still serving root after refusing nobody
        assert reached == [1, 1], "nobody's connection reached the root chromedriver"
    finally:
        fwd.close()
        stop.set()
        server.join(2)
        driver.close()


XLIB = "import Xlib.display; Xlib.display.Display(); print('connected')"


def test_xvfb_admits_only_cookie_holders(tmp_path: Path) -> None:
    need(shutil.which("Xvfb") is not None, "needs Xvfb (sudo bash scripts/setup.sh)")
    from iqn_lab.xvfb import xvfb

    empty = tmp_path / "no-cookie"
    empty.touch()
    with xvfb() as display:
        auth = Path(os.environ["XAUTHORITY"])
        assert auth.stat().st_mode & 0o777 == 0o600
        assert (auth.parent.stat().st_mode & 0o777) == 0o700
        ok = subprocess.run([sys.executable, "-c", XLIB], capture_output=True, text=True, timeout=30)
        assert ok.stdout.strip() == "connected", ok.stderr
        env = dict(os.environ, XAUTHORITY=str(empty), DISPLAY=display)
        no = subprocess.run([sys.executable, "-c", XLIB], capture_output=True, text=True, timeout=30,
                            env=env)
        assert no.returncode != 0 and "connected" not in no.stdout
        assert "Authorization required" in no.stderr or "authoriz" in no.stderr.lower(), no.stderr


def test_private_key_is_a_new_0600_file_of_root(tmp_path: Path) -> None:
    """A planted symlink (to a root file) and a planted file of nobody's (0644,
    which nobody could read later) at the key's path are both replaced by a new
    root-owned 0600 file, under a lax umask too; the symlink's target is untouched."""
    need_root()
    victim = tmp_path / "victim"
    victim.write_bytes(PRECIOUS)
    (tmp_path / "a.key").symlink_to(victim)
    (tmp_path / "b.key").write_bytes(b"")
    (tmp_path / "b.key").chmod(0o644)
    shutil.chown(tmp_path / "b.key", "nobody", "nogroup")
    old = os.umask(0)
    try:
        make_cert(tmp_path / "a.crt", tmp_path / "a.key", "a")
        make_cert(tmp_path / "b.crt", tmp_path / "b.key", "b")
    finally:
        os.umask(old)
    assert victim.read_bytes() == PRECIOUS
    for key in ("a.key", "b.key"):
        st = (tmp_path / key).lstat()
        assert (oct(st.st_mode), st.st_uid) == (oct(0o100600), 0), key
        assert (tmp_path / key).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_lab_state_dir_is_0700(tmp_path: Path) -> None:
    lab = Lab("iqnsec", state_root=tmp_path)
    lab.state.mkdir(mode=0o755)  # left by an older lab
    lab.state.chmod(0o755)
    lab.make_state_dir()
    assert lab.state.stat().st_mode & 0o777 == 0o700
    fresh = Lab("iqnsec2", state_root=tmp_path / "deeper")
    old = os.umask(0)
    try:
        fresh.make_state_dir()
    finally:
        os.umask(old)
    assert fresh.state.stat().st_mode & 0o777 == 0o700


def test_media_temp_dir_cannot_be_planted(tmp_path: Path) -> None:
    """The clip used to be built in ``<cache>/.tmp-<key>-<pid>``: a symlink (to a
    dir of someone else's) planted under that name made the build fail or land
    there. With mkdtemp the build goes on in a fresh dir and the plant is untouched."""
    need(shutil.which("ffmpeg") is not None, "needs ffmpeg (sudo bash scripts/setup.sh)")
    spec = MediaSpec(seconds=2, kbit=200, width=160, height=90, fps=10)
    cache = tmp_path / "cache"
    cache.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(PRECIOUS)
    planted = cache / f".tmp-{spec.key()}-{os.getpid()}"
    planted.symlink_to(elsewhere)
    out = ensure_media(spec, cache)
    assert (out / "media.json").is_file() and list(out.glob("seg-*.m4s"))
    assert out.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep"]
    assert (elsewhere / "keep").read_bytes() == PRECIOUS
    assert planted.is_symlink()
    assert sorted(p.name for p in cache.iterdir()) == sorted([out.name, planted.name])
