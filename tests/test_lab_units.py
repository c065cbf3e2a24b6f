"""Lab pieces that need no root: rates, schedules, names, templates, certificates,
frame parsing, and the CLI's one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from iqn_ctl.capture.frames import udp_frame
from iqn_lab import capture
from iqn_lab.certs import fingerprint, make_cert, spki_hash
from iqn_lab.shaping import RateError, Step, format_rate, parse_rate, parse_schedule, tbf_params
from iqn_lab.templates import TEMPLATE_DIR, TemplateError, render
from iqn_lab.topology import Names, PrefixError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "text,bits",
    [("1mbit", 1_000_000), ("300kbit", 300_000), ("1.5mbit", 1_500_000), ("64000", 64_000), ("none", None)],
)
def test_parse_rate(text: str, bits: int | None) -> None:
    assert parse_rate(text) == bits
    assert parse_rate(format_rate(bits)) == bits


@pytest.mark.parametrize("bad", ["fast", "1mbps", "-3kbit", "1 000kbit", "1kbit"])
def test_parse_rate_rejects(bad: str) -> None:
    with pytest.raises(RateError):
        parse_rate(bad)


def test_schedule_sorted_and_validated() -> None:
    assert parse_schedule("20:300kbit, 0:none,40:1mbit") == [
        Step(0.0, None),
        Step(20.0, 300_000),
        Step(40.0, 1_000_000),
    ]
    for bad in ("", "300kbit", "x:1mbit", "-1:1mbit", "5:warp"):
        with pytest.raises(RateError):
            parse_schedule(bad)


def test_names_fit_interface_limits() -> None:
    n = Names("abcdefghijkl")
    assert all(len(i) <= 15 for i in [*n.all_ifnames(), n.client_tun, n.router_tun])
    assert n.ns("router") == "abcdefghijkl-router"
    for bad in ("", "Lab", "abcdefghijklm", "a-b", "1lab"):
        with pytest.raises(PrefixError):
            Names(bad)
    with pytest.raises(PrefixError):
        n.ns("isp")


def test_templates_render_completely_and_refuse_gaps() -> None:
    text = render("nat.nft", TUN_DEV="x-tr", WAN_IF="x-r1", TUN_NET="198.18.8.0")
    assert 'iifname "x-tr" oifname "x-r1" accept' in text and "198.18.8.0/24 masquerade" in text
    assert "@" not in text
    with pytest.raises(TemplateError, match="@WAN_IF@"):
        render("nat.nft", TUN_DEV="x", TUN_NET="y")
    assert tbf_params() == (8000, 300)


def test_vm_render_matches_lab_render(tmp_path: Path) -> None:
    """vagrant/lib.sh fills the templates exactly as the lab does."""
    values = {
        "TUN_NET": "198.18.8.0", "TUN_DEV": "tun0", "PORT": "1194", "CERT": "/e/s.crt",
        "KEY": "/e/s.key", "CLIENT_FP": "AB:CD",
    }  # fmt: skip
    args = " ".join(f"'{k}={v}'" for k, v in values.items())
    script = f". {ROOT}/vagrant/lib.sh && render {TEMPLATE_DIR}/openvpn-server.conf {args}"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out == render("openvpn-server.conf", **values)
    bad = subprocess.run(
        ["bash", "-c", f". {ROOT}/vagrant/lib.sh && render {TEMPLATE_DIR}/nat.nft TUN_DEV=x"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0 and "unfilled placeholder" in bad.stderr


def test_certificates_agree_with_openssl(tmp_path: Path) -> None:
    crt, key = tmp_path / "s.crt", tmp_path / "s.key"
    make_cert(crt, key, "www.iqn.test", ("www.iqn.test", "media.iqn.test"))
    fp = subprocess.run(
        ["openssl", "x509", "-in", str(crt), "-noout", "-fingerprint", "-sha256"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert fp.split("=", 1)[1] == fingerprint(crt)
    b64 = subprocess.run(
        f"openssl x509 -in {crt} -noout -pubkey | openssl pkey -pubin -outform DER"
        " | openssl dgst -sha256 -binary | base64",
        shell=True, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert b64 == spki_hash(crt)
    assert key.stat().st_mode & 0o077 == 0


def test_capture_parses_frame_length_and_ports() -> None:
    raw = udp_frame("198.19.0.2", "198.19.0.1", 443, 51000, frame_len=1234)
    f = capture.parse(raw, 1.0, False)
    assert f is not None
    assert (f.length, f.proto, f.src, f.sport, f.dst, f.dport) == (
        1234, capture.UDP, "198.19.0.2", 443, "198.19.0.1", 51000
    )  # fmt: skip
    assert capture.parse(raw[:30], 1.0, False) is None
    assert capture.parse(raw[:12] + b"\x86\xdd" + raw[14:], 1.0, False) is None  # not IPv4


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["up", "--rate", "fast"], "bad rate"),
        (["up", "--prefix", "Bad-Prefix"], "bad lab prefix"),
        (["exec", "isp", "true"], "unknown role"),
    ],
)
def test_cli_errors_are_one_line(argv: list[str], msg: str) -> None:
    r = subprocess.run([sys.executable, "-m", "iqn_lab.cli", *argv], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("iqn-lab: error: ") and msg in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
