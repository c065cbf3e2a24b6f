"""``iqn-lab demo --mitigation``: the same viewers and the same bulk downloads through the
same bottleneck, once without and once with ``iqn-ctl attach --mitigate``; what it saves.

1. the lab (:class:`~iqn_lab.mitigation.lab.MitigationLab`): an OTT server and a bulk
   TCP server, a router with the ISP agent, viewers (headless signal players) and
   downloaders behind an HTB bottleneck at the router's egress toward them;
2. the congestion schedule (:func:`congestion_plan`, from ``--seed``): waves of parallel
   TCP downloads that come and go; the same plan, the same viewers, the same seed in both runs;
3. run 1 without mitigation (the lab's HTB at ``--link``), run 2 with it (the agent's HTB
   at the same rate, and its boost classes); the bottleneck's class counters sampled
   every :data:`SAMPLE` s;
4. ``results/<run>/``: ``mitigation.json`` (the totals of issue 14 and every detail),
   ``mitigation.png`` (boosted share over time, cross traffic, stall time per viewer),
   ``mitigation.txt`` (the table), the players', downloads' and agents' logs.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from iqn_lab import procs
from iqn_lab.errors import LabError
from iqn_lab.player import read_log

from .lab import MitigationLab

Say = Callable[[str], None]
#: seconds between samples of the bottleneck's class counters
SAMPLE = 0.5
#: a window in which at least this share of the link was sent counts as a busy link
BUSY = 0.95
#: bytes queued in the rest's class at both ends of a window for it to count as wanting
#: more than it got (30 full packets: a packet or two waiting is just a burst arriving)
QUEUED = 45_000
#: seconds after the players start before the first download (their startup is not congested)
QUIET = 8.0


@dataclass(frozen=True)
class MitigationConfig:
    out: Path
    prefix: str = "iqnmit"
    link_bps: int = 4_000_000
    viewers: int = 6
    downloaders: int = 8
    duration: float = 90.0
    seed: int = 1
    share: float = 0.3
    boost_rate: str = "600kbit"
    boost_max: float = 10.0
    boost_gap: float = 5.0
    #: an A/A control: the second run ("with") also runs without mitigation, to measure the noise
    control: bool = False


def congestion_plan(seed: int, duration: float, downloaders: int) -> list[dict[str, Any]]:
    """Waves of parallel TCP downloads (sans-I/O, from ``seed``): each wave 2..``downloaders``
    downloads for 6-20 s, 2-8 s apart, from :data:`QUIET` s until 5 s before the end;
    ``downloader`` is the index of the client address a download comes from."""
    rng = random.Random(seed)
    plan: list[dict[str, Any]] = []
    t = QUIET
    while True:
        k = rng.randint(2, downloaders)
        length = rng.uniform(6.0, 20.0)
        if t + length > duration - 5.0:
            break
        for i in range(k):
            plan.append({"at": round(t + rng.uniform(0.0, 1.0), 3), "for": round(length, 3),
                         "downloader": i})
        t += length + rng.uniform(2.0, 8.0)
    return plan


def run_mitigation(cfg: MitigationConfig, say: Say) -> dict[str, Any]:
    plan = congestion_plan(cfg.seed, cfg.duration, cfg.downloaders)
    cfg.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    order = ("without", "with") if cfg.seed % 2 else ("with", "without")  # alternate: no order bias
    runs["order"] = {"first": order[0]}
    for mode in order:
        # A lab of its own for each run: nothing one run leaves (the kernel's TCP metrics cache
        # per destination, which made a second run's downloads start gentler, sockets, server
        # state) reaches the other.
        lab = MitigationLab(cfg.prefix)
        try:
            lab.up(cfg.viewers, cfg.downloaders)
            say(f"{mode} mitigation: lab up: {cfg.viewers} viewers, {cfg.downloaders} downloaders, "
                f"bottleneck {cfg.link_bps} bit/s at {lab.down_if}; {len(plan)} downloads in the plan")
            runs[mode] = _run_one(lab, cfg, plan, mode, say)
        finally:
            for name in (f"agent-{mode}.log", "ott-www.log", "ott-media.log"):
                src = lab.state / name
                if src.exists():
                    shutil.copy(src, cfg.out / f"{mode}-{name}")
            lab.down()
        s = runs[mode]["summary"]
        say(f"{mode:>7} mitigation: stall {s['stall_s']:.1f} s in {s['stalls']} stalls, "
            f"cross traffic {s['cross_mbps']:.2f} Mbit/s")
    result = report(cfg, plan, runs)
    (cfg.out / "mitigation.json").write_text(json.dumps(result, indent=1))
    (cfg.out / "mitigation.txt").write_text(table(result) + "\n")
    plot(result, cfg.out / "mitigation.png")
    say(table(result))
    return result


def _run_one(lab: MitigationLab, cfg: MitigationConfig, plan: list[dict[str, Any]], mode: str,
             say: Say) -> dict[str, Any]:
    extra: list[str] = []
    if mode == "with" and not cfg.control:
        extra = ["--mitigate", lab.down_if, "--link-rate", f"{cfg.link_bps}bit",
                 "--boost-share", str(cfg.share), "--boost-rate", cfg.boost_rate,
                 "--boost-max", str(cfg.boost_max),
                 "--boost-gap", str(cfg.boost_gap)]
    else:
        lab.shape(cfg.link_bps)
    agent = lab.start_agent(mode, extra)
    out = cfg.out / mode
    samples: list[tuple[float, dict[str, list[int]]]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.time(), lab.class_bytes()))
            stop.wait(SAMPLE)

    try:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.time()
        players = lab.start_players(cfg.viewers, cfg.duration, out / "players", cfg.seed)
        bulk = lab.start_bulk([{**e, "source": lab.downloader(e["downloader"])} for e in plan], start,
                              out / "bulk.json")
        say(f"{mode} mitigation: playing {cfg.duration:.0f} s")
        deadline = time.monotonic() + cfg.duration + 60
        while any(procs.alive(p) for p in (players, bulk)):
            if time.monotonic() > deadline:
                procs.stop([players, bulk], grace=10.0)
                break
            time.sleep(0.5)
        stop.set()
        sampler.join()
        status = lab.agent_status(agent)
    finally:
        stop.set()
        lab.stop_agent(agent)
        if mode == "without":
            lab.unshape()
    time.sleep(3.0)  # the queue drains before the next run
    viewers = _viewers(out / "players")
    bulk_log = json.loads((out / "bulk.json").read_text())
    return {"start": start, "viewers": viewers, "bulk": bulk_log, "samples": samples, "status": status,
            "summary": summarise(viewers, bulk_log, cfg.duration)}


def _viewers(log_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(log_dir.glob("*.jsonl")):
        recs = read_log(path)
        end = next((r for r in recs if r.get("event") == "end"), None)
        stalls = [r for r in recs if r.get("event") == "stall"]
        out[path.stem] = {
            "stall_s": float(end["stalled_s"]) if end else sum(float(s["duration"]) for s in stalls),
            "stalls": len(stalls),
            "startup_s": sum(float(s["duration"]) for s in stalls if s.get("startup")),
            "watched_s": float(end["watched_s"]) if end else None,
            "segments": int(end["segments"]) if end else None,
        }
    return out


def summarise(viewers: dict[str, dict[str, Any]], bulk: dict[str, Any], duration: float) -> dict[str, Any]:
    """Totals of one run (sans-I/O): stall seconds and stalls over all viewers, the cross
    traffic's mean throughput over the run."""
    total_bytes = sum(sum(row) for row in bulk["bins"])
    return {
        "stall_s": round(sum(v["stall_s"] for v in viewers.values()), 3),
        "stalls": sum(v["stalls"] for v in viewers.values()),
        "stall_s_after_startup": round(sum(v["stall_s"] - v["startup_s"] for v in viewers.values()), 3),
        "cross_mbps": round(8 * total_bytes / duration / 1e6, 3),
    }


def share_series(samples: list[tuple[float, dict[str, list[int]]]], link_bps: int, start: float,
                 boost_class: str = "4951:10", rest_class: str = "4951:20", link_class: str = "4951:1",
                 window: float = 1.0) -> list[tuple[float, float, float, bool]]:
    """(seconds after start, share of the link the boost class took, share the rest took,
    contended) per ``window`` s. Contended: the link was busy (at least :data:`BUSY` of it
    sent) and the rest had a queue at both ends of the window, so it wanted more than it
    got (at least :data:`QUEUED` bytes waiting at both ends): the share cap is a promise
    about those windows (the rest keeps 1 - share)."""
    out = []
    i = 0

    def sent(x: dict[str, list[int]], y: dict[str, list[int]], c: str) -> int:
        return y.get(c, [0, 0])[0] - x.get(c, [0, 0])[0]

    for j in range(1, len(samples)):
        t0, a = samples[i]
        t1, b = samples[j]
        if t1 - t0 < window:
            continue
        per = 8 / (t1 - t0) / link_bps
        boost, rest, link = (sent(a, b, c) * per for c in (boost_class, rest_class, link_class))
        queued = a.get(rest_class, [0, 0])[1] >= QUEUED and b.get(rest_class, [0, 0])[1] >= QUEUED
        out.append((round(t1 - start, 2), round(boost, 4), round(rest, 4), queued and link >= BUSY))
        i = j
    return out


def cross_series(bulk: dict[str, Any], start: float) -> list[tuple[float, float]]:
    """(seconds after start, Mbit/s of all downloads) per bin."""
    width = float(bulk["bin"])
    n = max((len(r) for r in bulk["bins"]), default=0)
    off = float(bulk["start"]) - start
    return [(round(off + k * width, 2),
             round(8 * sum(r[k] for r in bulk["bins"] if k < len(r)) / width / 1e6, 3)) for k in range(n)]


def report(cfg: MitigationConfig, plan: list[dict[str, Any]],
           runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    wo, wi = runs["without"], runs["with"]
    shares = share_series(wi["samples"], cfg.link_bps, wi["start"])
    viewers = sorted(set(wo["viewers"]) | set(wi["viewers"]))
    per_viewer = {v: {"without": wo["viewers"].get(v), "with": wi["viewers"].get(v)} for v in viewers}
    worse = [v for v, d in per_viewer.items() if d["without"] and d["with"]
             and d["without"]["stalls"] == 0 and d["with"]["stall_s"] > d["without"]["stall_s"]]
    s_wo, s_wi = wo["summary"], wi["summary"]
    return {
        "stall_s_without": s_wo["stall_s"], "stall_s_with": s_wi["stall_s"],
        "stalls_without": s_wo["stalls"], "stalls_with": s_wi["stalls"],
        "cross_mbps_without": s_wo["cross_mbps"], "cross_mbps_with": s_wi["cross_mbps"],
        "boost_share_max": max((s for _, s, _, _ in shares), default=0.0),
        "boost_share_max_contended": max((s for _, s, _, c in shares if c), default=0.0),
        "rest_share_min_contended": min((r for _, _, r, c in shares if c), default=None),
        "contended_windows": sum(1 for *_, c in shares if c),
        "order": runs["order"],
        "samples": {"without": wo["samples"], "with": wi["samples"]},
        "stall_reduction": round(1 - s_wi["stall_s"] / s_wo["stall_s"], 4) if s_wo["stall_s"] else None,
        "cross_loss_share": round((s_wo["cross_mbps"] - s_wi["cross_mbps"]) * 1e6 / cfg.link_bps, 4),
        "stall_s_after_startup_without": s_wo["stall_s_after_startup"],
        "stall_s_after_startup_with": s_wi["stall_s_after_startup"],
        "viewers_without_stalls_made_worse": worse,
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "plan": plan,
        "per_viewer": per_viewer,
        "boost": wi["status"].get("boost"),
        "agent_stalls": {"without": wo["status"].get("stalls_ended"),
                         "with": wi["status"].get("stalls_ended")},
        "boost_share_series": shares,
        "cross_series": {"without": cross_series(wo["bulk"], wo["start"]),
                         "with": cross_series(wi["bulk"], wi["start"])},
    }


def table(r: dict[str, Any]) -> str:
    rows = [("total stall time (s)", r["stall_s_without"], r["stall_s_with"]),
            ("  of which after startup (s)", r["stall_s_after_startup_without"],
             r["stall_s_after_startup_with"]),
            ("stalls", r["stalls_without"], r["stalls_with"]),
            ("cross traffic (Mbit/s)", r["cross_mbps_without"], r["cross_mbps_with"])]
    lines = [f"| {'':<30} | {'without':>9} | {'with':>9} |", f"|{'-' * 32}|{'-' * 11}|{'-' * 11}|"]
    lines += [f"| {a:<30} | {b:>9} | {c:>9} |" for a, b, c in rows]
    for v, d in r["per_viewer"].items():
        wo, wi = d["without"] or {}, d["with"] or {}
        lines.append(f"| {v + ' stall s (stalls)':<30} "
                     f"| {wo.get('stall_s', 0):>5.1f} ({wo.get('stalls', 0)}) "
                     f"| {wi.get('stall_s', 0):>5.1f} ({wi.get('stalls', 0)}) |")
    red = r["stall_reduction"]
    lines.append(f"stall time {'-' if red is None else f'{-100 * red:+.0f} %'}; boosted share max "
                 f"{r['boost_share_max']:.3f}, {r['boost_share_max_contended']:.3f} while the link was busy "
                 f"and the rest queued (cap {r['config']['share']}; the rest got at least "
                 f"{r['rest_share_min_contended'] if r['rest_share_min_contended'] is not None else '-'} "
                 f"then); boosts {(r['boost'] or {}).get('total')}; cross traffic lost "
                 f"{100 * r['cross_loss_share']:.1f} % of the link; viewers without stalls made worse: "
                 f"{r['viewers_without_stalls_made_worse'] or 'none'}")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 1, figsize=(9, 9))
    sh = r["boost_share_series"]
    ax[0].plot([t for t, *_ in sh], [s for _, s, _, _ in sh], label="boosted share of the link (with)")
    ax[0].plot([t for t, *_ in sh], [r for _, _, r, _ in sh], color="grey", lw=0.8, label="the rest's share")
    ax[0].scatter([t for t, _, _, c in sh if c], [s for _, s, _, c in sh if c], s=8, color="black",
                  label="boosted, link busy and the rest queued")
    ax[0].axhline(r["config"]["share"], color="red", ls="--", label="--boost-share cap")
    ax[0].set_ylabel("share")
    ax[0].legend(loc="upper right")
    for mode in ("without", "with"):
        cs = r["cross_series"][mode]
        ax[1].plot([t for t, _ in cs], [m for _, m in cs], label=f"cross traffic, {mode}")
    ax[1].set_ylabel("Mbit/s")
    ax[1].set_xlabel("seconds")
    ax[1].legend(loc="upper right")
    names = list(r["per_viewer"])
    xs = range(len(names))
    ax[2].bar([x - 0.2 for x in xs], [(r["per_viewer"][n]["without"] or {}).get("stall_s", 0) for n in names],
              0.4, label="without")
    ax[2].bar([x + 0.2 for x in xs], [(r["per_viewer"][n]["with"] or {}).get("stall_s", 0) for n in names],
              0.4, label="with")
    ax[2].set_xticks(list(xs), names, rotation=30)
    ax[2].set_ylabel("stall s")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def check(cfg: MitigationConfig) -> None:
    if cfg.viewers < 1 or cfg.downloaders < 2 or cfg.duration < 40:
        raise LabError("--viewers must be >= 1, --downloaders >= 2 and --duration >= 40 s")
