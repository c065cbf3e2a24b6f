"""iqn_ctl.live.tc on a real veth: IQN's classifiers attach, replace themselves,
and detach without touching a foreign classifier on the same hook."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import need_root

NAME = f"iqtc{os.getpid() % 100000}"


@pytest.fixture
def veth() -> Iterator[str]:
    need_root()
    subprocess.run(["ip", "link", "add", NAME, "type", "veth", "peer", "name", NAME + "p"],
                   check=True)
    subprocess.run(["ip", "link", "set", NAME, "up"], check=True)
    try:
        yield NAME
    finally:
        subprocess.run(["ip", "link", "del", NAME], check=False)


def _tc_show(iface: str, direction: str) -> str:
    return subprocess.run(["tc", "filter", "show", "dev", iface, direction],
                          capture_output=True, text=True, check=True).stdout


def test_attach_replace_detach_keeps_foreign(veth: str) -> None:
    from bcc import BPF

    from iqn_ctl.live import tc

    b = BPF(text="int iqn_tc_t(struct __sk_buff *skb) { return 0; }\n"
                 "int foreign(struct __sk_buff *skb) { return 0; }\n")
    ours = b.load_func("iqn_tc_t", BPF.SCHED_CLS)
    theirs = b.load_func("foreign", BPF.SCHED_CLS)
    tc.attach(veth, ours.fd, ours.name, "ingress")
    tc.attach(veth, ours.fd, ours.name, "ingress")  # a restart replaces, never stacks
    tc.attach(veth, ours.fd, ours.name, "egress", prio=5)
    assert _tc_show(veth, "ingress").count("iqn_tc_t") == 2  # "iqn_tc_t ... name iqn_tc_t": one filter
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=veth)[0]
        ipr.tc("add-filter", "bpf", idx, ":1", fd=theirs.fd, name=theirs.name,
               parent="ffff:fff2", classid=1, direct_action=True, prio=3)
    assert [(f.name, f.prio) for f in tc.filters(veth, "ingress")] == [
        ("foreign", 3), ("iqn_tc_t", tc.DEFAULT_PRIO)]
    assert [(f.name, f.prio) for f in tc.filters(veth, "egress")] == [("iqn_tc_t", 5)]

    removed = tc.detach(veth)
    assert sorted(f.direction for f in removed) == ["egress", "ingress"]
    assert "iqn_tc_t" not in _tc_show(veth, "ingress") + _tc_show(veth, "egress")
    assert "foreign" in _tc_show(veth, "ingress")
    assert tc.detach(veth) == []


def test_detach_removes_qdisc_when_only_ours(veth: str) -> None:
    from bcc import BPF

    from iqn_ctl.live import tc

    b = BPF(text="int iqn_tc_t(struct __sk_buff *skb) { return 0; }\n")
    fn = b.load_func("iqn_tc_t", BPF.SCHED_CLS)
    tc.attach(veth, fn.fd, fn.name, "egress")
    assert "clsact" in subprocess.run(["tc", "qdisc", "show", "dev", veth],
                                      capture_output=True, text=True).stdout
    tc.detach(veth)
    assert "clsact" not in subprocess.run(["tc", "qdisc", "show", "dev", veth],
                                          capture_output=True, text=True).stdout


def test_bad_names_and_interfaces() -> None:
    from iqn_ctl.live import tc

    with pytest.raises(tc.TcError, match="no such network interface"):
        tc.filters("iqn-no-such-if", "ingress")
    with pytest.raises(tc.TcError, match="must start with"):
        tc.attach("lo", 0, "other", "ingress")
    assert tc.detach("iqn-no-such-if") == []
