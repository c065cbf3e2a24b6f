"""The mitigation experiment's sans-I/O parts (iqn_lab/mitigation/demo.py): the
congestion plan is a function of the seed (both runs get the same one), the
boosted-share series tells contended windows from idle ones, and the totals
add up what the players and the downloads logged."""

from __future__ import annotations

from iqn_lab.mitigation.demo import congestion_plan, share_series, summarise


def test_same_seed_same_plan_other_seed_other_plan() -> None:
    a, b = congestion_plan(3, 90, 8), congestion_plan(3, 90, 8)
    assert a == b and a != congestion_plan(4, 90, 8)
    assert all(8.0 <= e["at"] and e["at"] + e["for"] <= 90 - 5 + 1.0 for e in a)
    assert {e["downloader"] for e in a} <= set(range(8))


def test_share_series_marks_contended_windows() -> None:
    link = 8_000_000
    samples = [
        (100.0, {"4951:1": [0, 0], "4951:10": [0, 0], "4951:20": [0, 50_000]}),
        # link busy, rest queued: contended
        (101.0, {"4951:1": [1_000_000, 0], "4951:10": [300_000, 0], "4951:20": [700_000, 60_000]}),
        # rest idle: the boost borrowed
        (102.0, {"4951:1": [1_800_000, 0], "4951:10": [1_000_000, 0], "4951:20": [800_000, 0]}),
        # a packet of the rest waiting at each end, the link busy: a burst arriving, not a want
        (103.0, {"4951:1": [2_800_000, 0], "4951:10": [2_000_000, 0], "4951:20": [800_000, 1514]}),
        # rest queued but the link not busy: nobody was kept waiting by the boost
        (104.0, {"4951:1": [2_900_000, 0], "4951:10": [2_050_000, 0], "4951:20": [850_000, 90_000]}),
        (105.0, {"4951:1": [3_000_000, 0], "4951:10": [2_100_000, 0], "4951:20": [900_000, 90_000]}),
    ]
    s = share_series(samples, link, start=100.0)
    assert s == [(1.0, 0.3, 0.7, True), (2.0, 0.7, 0.1, False), (3.0, 1.0, 0.0, False),
                 (4.0, 0.05, 0.05, False), (5.0, 0.05, 0.05, False)]


def test_summarise_totals() -> None:
    viewers = {"v0": {"stall_s": 3.0, "stalls": 2, "startup_s": 1.0},
               "v1": {"stall_s": 0.0, "stalls": 0, "startup_s": 0.0}}
    bulk = {"bin": 0.5, "bins": [[1_000_000, 1_000_000], [500_000]]}
    assert summarise(viewers, bulk, duration=10.0) == {
        "stall_s": 3.0, "stalls": 2, "stall_s_after_startup": 2.0, "cross_mbps": 2.0}
