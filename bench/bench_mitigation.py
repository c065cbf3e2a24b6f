"""What acting on stalls saves (issue 14): the mitigation lab run without and with
``iqn-ctl attach --mitigate``, the same viewers, the same congestion plan, the same seed.

Runs ``iqn-lab demo --mitigation`` once per seed (iqn_lab/mitigation/demo.py: headless
signal players and real TCP bulk downloads through one HTB bottleneck at the router's
egress toward them) and writes the ``## Mitigation`` section of bench/RESULTS.md: per
seed, total stall time and stalls without and with, the cross traffic's throughput
both ways, the largest share of the link the boosted clients took (overall, and while
the rest of the traffic was queued), viewers without stalls made worse; the ratio is
stall time with over stall time without, measured in the same run.

    sudo .venv/bin/python bench/bench_mitigation.py [--seeds 1 2] [--link 8mbit] [--viewers 6]
        [--duration 90] [--boost-gap 5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._results import write_section  # noqa: E402
from iqn_lab.mitigation.demo import MitigationConfig, check, run_mitigation  # noqa: E402
from iqn_lab.shaping import parse_rate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--link", default="8mbit")
    ap.add_argument("--viewers", type=int, default=6)
    ap.add_argument("--downloaders", type=int, default=8)
    ap.add_argument("--duration", type=float, default=90.0)
    ap.add_argument("--share", type=float, default=0.3)
    ap.add_argument("--boost-rate", default="600kbit")
    ap.add_argument("--boost-max", type=float, default=10.0)
    ap.add_argument("--boost-gap", type=float, default=5.0)
    ap.add_argument("--control", action="store_true",
                    help="A/A control: both runs without mitigation (the noise of one comparison); "
                         "writes the '## Mitigation: A/A control' section")
    a = ap.parse_args()
    link = parse_rate(a.link)
    assert link is not None, "--link must be a rate"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results = []
    for seed in a.seeds:
        out = ROOT / "results" / f"mitigation-{stamp}-seed{seed}"
        cfg = MitigationConfig(out=out, link_bps=link, viewers=a.viewers, downloaders=a.downloaders,
                               duration=a.duration, seed=seed, share=a.share, boost_rate=a.boost_rate,
                               boost_max=a.boost_max, boost_gap=a.boost_gap, control=a.control)
        check(cfg)
        results.append((seed, out, run_mitigation(cfg, say=print)))
    if a.control:
        control(a, results)
        return
    plot = ROOT / "bench" / "mitigation.png"
    shutil.copy(results[0][1] / "mitigation.png", plot)
    cmd = (f"sudo .venv/bin/python bench/bench_mitigation.py --seeds {' '.join(map(str, a.seeds))} "
           f"--link {a.link} --viewers {a.viewers} --downloaders {a.downloaders} --duration {a.duration:g} "
           f"--share {a.share} --boost-rate {a.boost_rate} --boost-max {a.boost_max:g} "
           f"--boost-gap {a.boost_gap:g}")
    lines = [
        "## Mitigation",
        "",
        "Issue 14: the router boosts a stalling viewer's traffic (`iqn-ctl attach --mitigate`);",
        f"{a.viewers} headless signal players (500 kbit/s clip) and real TCP bulk downloads (waves of 2..",
        f"{a.downloaders} parallel downloads, seeded) share one HTB bottleneck of {a.link} (queue 500",
        "packets) at the router's egress toward them; each seed runs without and with mitigation, each",
        f"in a fresh lab, the same plan. Boost: share {a.share}, {a.boost_rate} per slot, at most",
        f"{a.boost_max:g} s per episode, episodes {a.boost_gap:g} s apart.",
        f"Re-run: `{cmd}` (about 5 min per seed).",
        "Stall time counts every stalled second the players logged (startup included); `ratio` is",
        "with / without. `share max` is the largest share of the link the boosted clients took in",
        "a 1 s window; `contended max` the same over windows in which the link was busy (95 %) and the",
        "rest of the traffic had a real queue (45 kB at both ends), and `rest min` the smallest share",
        "the rest got in those windows (the cap promises it 1 - share; a boost may borrow what the",
        "rest leaves idle).",
        "`first`: which run went first (alternated by seed, so that the order biases neither).",
        "",
        "| seed | first | stall s without | stall s with | ratio | after startup without "
        "| after startup with | stalls without | stalls with | boosts | cross Mbit/s without "
        "| cross Mbit/s with | cross lost (share of link) | share max | contended max "
        "| rest min (contended) | viewers made worse |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for seed, _out, r in results:
        ratio = r["stall_s_with"] / r["stall_s_without"] if r["stall_s_without"] else float("nan")
        lines.append(
            f"| {seed} | {r['order']['first']} | {r['stall_s_without']:.1f} | {r['stall_s_with']:.1f} "
            f"| {ratio:.2f} "
            f"| {r['stall_s_after_startup_without']:.1f} | {r['stall_s_after_startup_with']:.1f} "
            f"| {r['stalls_without']} | {r['stalls_with']} | {(r['boost'] or {}).get('total')} "
            f"| {r['cross_mbps_without']:.2f} "
            f"| {r['cross_mbps_with']:.2f} | {r['cross_loss_share']:.3f} | {r['boost_share_max']:.3f} "
            f"| {r['boost_share_max_contended']:.3f} | {_fmt(r['rest_share_min_contended'])} "
            f"| {', '.join(r['viewers_without_stalls_made_worse']) or 'none'} |")
    lines += ["", f"Per viewer, seed {results[0][0]} (stall s (stalls)):", "", "```",
              (results[0][1] / "mitigation.txt").read_text().rstrip(), "```", "",
              "![boosted share, cross traffic, stall time per viewer](mitigation.png)", ""]
    write_section("## Mitigation", "\n".join(lines))


def control(a: argparse.Namespace, results: list[tuple[int, Path, dict[str, Any]]]) -> None:
    lines = ["## Mitigation: A/A control", "",
             "The same experiment with both runs *without* mitigation (`--control`): how far two runs of",
             "one seed differ by chance (CPU contention on the shared 2-core box, TCP and QUIC timing).",
             f"Re-run: `sudo .venv/bin/python bench/bench_mitigation.py --control --seeds "
             f"{' '.join(str(s) for s, _, _ in results)} --link {a.link}`.", "",
             "| seed | stall s, run A | stall s, run B | B / A | stalls A | stalls B | cross Mbit/s A "
             "| cross Mbit/s B |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for seed, _out, r in results:
        first, second = ("without", "with") if r["order"]["first"] == "without" else ("with", "without")
        sa, sb = r[f"stall_s_{first}"], r[f"stall_s_{second}"]
        lines.append(f"| {seed} | {sa:.1f} | {sb:.1f} | {sb / sa if sa else float('nan'):.2f} "
                     f"| {r[f'stalls_{first}']} | {r[f'stalls_{second}']} | {r[f'cross_mbps_{first}']:.2f} "
                     f"| {r[f'cross_mbps_{second}']:.2f} |")
    write_section("## Mitigation: A/A control", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
