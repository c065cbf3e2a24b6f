"""The demo's result: paper-format files, scores through ``iqn-ctl evaluate``,
a per-stall table and ``report.json``.

Three views of the same stalls are compared:

- *actual*: the page's spinner as painted (``Real_stalls.txt``, the ground
  truth: what the viewer sees); every change's stamps, the DOM change's among
  them, are in ``truth_stamps.tsv``, and the same stalls timed at the DOM
  change (the truth before issue 15's paint stamps) in ``Real_stalls_dom.txt``,
  so the report gives the scores against both and the paint lag at each edge;
- *signalled*: what the end-user agent told the network: its clicks, fed
  through the same inference engine the ISP uses, as if the path were ideal
  (every click arriving the moment it was made) - so it measures the user
  agent alone;
- *inferred*: what the ISP agent on the router concluded from the packets it
  saw on the page's connection.

Scoring is delegated to ``iqn-ctl evaluate`` (the paper's method) so the demo
reports exactly what a user re-running the command on the saved files gets.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iqn_ctl.engine.params import SignalParams
from iqn_ctl.errors import IqnError
from iqn_ctl.evaluate.replay import infer_times
from iqn_ctl.evaluate.scoring import SIGNIFICANT, score
from iqn_ctl.evaluate.traces import Stall, read_real_stalls, stall_to_json

FILES = {
    "truth": "Real_stalls.txt",
    "truth_dom": "Real_stalls_dom.txt",
    "stamps": "truth_stamps.tsv",
    "candidates": "timestamp_of_candidate.txt",
    "clicks": "clicks.txt",
    "signalled": "signalled.jsonl",
    "inferred": "inferred.jsonl",
    "plot_isp": "isp_agent.png",
    "plot_user": "user_agent.png",
    "table": "report.txt",
    "report": "report.json",
}


class ReportError(IqnError):
    """Scoring failed (``iqn-ctl evaluate`` refused a file); the message is for the user."""


def detected_clicks_name(p: float) -> str:
    return f"Detected_clicks_{p:g}.txt"


def signalled_stalls(clicks: Sequence[float], p: float, n: int) -> list[Stall]:
    """The user agent's clicks through the ISP's engine on an ideal path."""
    ended = infer_times(np.sort(np.asarray(clicks, dtype=np.float64)), SignalParams(p, n), "count", "user")
    return [Stall(e.start, e.end, "user-agent", "user-agent") for e in ended]


def write_stalls(stalls: Sequence[Stall], path: Path) -> None:
    path.write_text("".join(stall_to_json(s) + "\n" for s in stalls))


def write_times(times: Sequence[float], path: Path) -> None:
    path.write_text("".join(f"{t:.6f}\n" for t in sorted(times)))


def evaluate(out: Path, inferred: str, plot: str, candidates: str) -> dict[str, Any]:
    """``iqn-ctl evaluate --json --plot`` on files in ``out``; its JSON result."""
    argv = [
        sys.executable,
        "-m",
        "iqn_ctl",
        "evaluate",
        "--truth",
        str(out / FILES["truth"]),
        str(out / inferred),
        "--json",
        "--plot",
        str(out / plot),
        "--candidates",
        str(out / candidates),
    ]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise ReportError((r.stderr.strip() or f"iqn-ctl evaluate exited {r.returncode}").splitlines()[-1])
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def _matched(real: Sequence[Stall], other: Sequence[Stall]) -> dict[Stall, Stall]:
    return {pair.real: pair.inferred for pair in score(list(real), list(other)).pairs}


def mean_error(real: Sequence[Stall], other: Sequence[Stall]) -> float:
    """Mean signed duration error (other minus real, s) over matched pairs: the
    bias the MAE hides; the detection lag of the user agent shows up here."""
    errs = [pair.error for pair in score(list(real), list(other)).pairs]
    return sum(errs) / len(errs) if errs else math.nan


def dom_truth(stamps: Path, out: Path) -> list[Stall]:
    """The stalls timed at the spinner's DOM change, from the stamps file,
    written to ``out`` in ``Real_stalls.txt`` format (for ``iqn-ctl evaluate``)."""
    from user_agent.truth import read_stamps

    lines = [f"{kind}-{dom:.6f}\n" for kind, dom, _paint, _video in read_stamps(stamps)]
    out.write_text("".join(lines))
    return read_real_stalls(out)


def edge_lags(stamps: Path) -> dict[str, dict[str, float | int | None]]:
    """Per edge (S, E): how much later the paint stamp is than the DOM stamp,
    and how the video's frames lie against the DOM stamp (at S, the last frame
    shown before the spinner: negative = the picture froze earlier; at E the
    first frame after it went), in ms: mean, median, max and count."""
    from user_agent.truth import read_stamps

    rows = read_stamps(stamps)

    def stats(xs: list[float]) -> dict[str, float | int | None]:
        if not xs:
            return {"mean": None, "median": None, "max": None, "n": 0}
        a = np.asarray(xs) * 1000
        return {"mean": round(float(a.mean()), 2), "median": round(float(np.median(a)), 2),
                "max": round(float(a.max()), 2), "n": len(xs)}  # fmt: skip

    res: dict[str, dict[str, float | int | None]] = {}
    for kind in ("S", "E"):
        mine = [r for r in rows if r[0] == kind]
        res[f"paint_{kind}"] = stats([p - d for _k, d, p, _v in mine if p is not None])
        res[f"video_{kind}"] = stats([v - d for _k, d, _p, v in mine if v is not None])
    return res


def scores_against(
    real: Sequence[Stall], signalled: Sequence[Stall], inferred: Sequence[Stall]
) -> dict[str, Any]:
    """MAE, RMSE and bias (ms) of the ISP's and the user agent's stalls against one truth."""
    isp, user = score(list(real), list(inferred)), score(list(real), list(signalled))
    return {
        "matched": isp.matched, "false_positives": isp.false_positives,
        "mae_ms": _num(isp.mae * 1000), "rmse_ms": _num(isp.rmse * 1000),
        "bias_ms": _num(mean_error(real, inferred) * 1000),
        "user_mae_ms": _num(user.mae * 1000), "user_rmse_ms": _num(user.rmse * 1000),
        "user_bias_ms": _num(mean_error(real, signalled) * 1000),
    }  # fmt: skip


def recall_of_signalled(
    real: Sequence[Stall], signalled: Sequence[Stall], inferred: Sequence[Stall]
) -> float:
    """Of the significant stalls the user agent signalled, the share the ISP matched:
    the network's part of the job, apart from stalls the user agent never reported."""
    by_user = _matched(real, signalled)
    by_isp = _matched(real, inferred)
    if not by_user:
        return math.nan
    return sum(1 for r in by_user if r in by_isp) / len(by_user)


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def build_report(
    out: Path,
    signalled: Sequence[Stall],
    inferred: Sequence[Stall],
    ev_user: dict[str, Any],
    ev_isp: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    real = read_real_stalls(out / FILES["truth"])
    rep: dict[str, Any] = {
        "stalls_actual": len(real),
        "stalls_significant": sum(1 for r in real if r.duration >= SIGNIFICANT),
        "signalled": len(signalled),
        "inferred": len(inferred),
        "matched": ev_isp["matched"],
        "precision_user": ev_user["precision"],
        "recall_user": ev_user["recall"],
        "precision_isp": ev_isp["precision"],
        "recall_isp": ev_isp["recall"],
        "recall_isp_of_signalled": _num(recall_of_signalled(real, signalled, inferred)),
        "mae_ms": ev_isp["mae_ms"],
        "rmse_ms": ev_isp["rmse_ms"],
        "false_positives_user": ev_user["false_positives"],
        "false_positives_isp": ev_isp["false_positives"],
        "user_mae_ms": ev_user["mae_ms"],
        "user_rmse_ms": ev_user["rmse_ms"],
        "evaluate_user": ev_user,
        "evaluate_isp": ev_isp,
    }
    rep.update(extra)
    return rep


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def stall_table(out: Path, signalled: Sequence[Stall], inferred: Sequence[Stall], rep: dict[str, Any]) -> str:
    """One row per actual stall (durations in s), then the scores."""
    real = read_real_stalls(out / FILES["truth"])
    by_user = _matched(real, signalled)
    by_isp = _matched(real, inferred)
    t0 = real[0].start if real else 0.0
    lines = [f"{'#':>3} {'at (s)':>7} {'actual':>7} {'signalled':>9} {'inferred':>8} {'error (ms)':>10}"]
    for i, r in enumerate(real, 1):
        u, s = by_user.get(r), by_isp.get(r)
        miss = "missed" if r.duration >= SIGNIFICANT else ""
        err = f"{(s.duration - r.duration) * 1000:+.0f}" if s else miss
        ud = _f(u.duration if u else None, "9.2f")
        sd = _f(s.duration if s else None, "8.2f")
        lines.append(f"{i:>3} {r.start - t0:>7.1f} {r.duration:>7.2f} {ud:>9} {sd:>8} {err:>10}")
    lines += [
        "",
        f"{'':<24} {'actual':>7} {'signalled':>9} {'inferred':>8}",
        f"{'stalls':<24} {rep['stalls_actual']:>7} {rep['signalled']:>9} {rep['inferred']:>8}",
        f"{'significant (>= 0.4 s)':<24} {rep['stalls_significant']:>7}",
        f"{'matched significant':<24} {'':>7} {rep['evaluate_user']['matched']:>9} {rep['matched']:>8}",
        f"{'false positives':<24} {'':>7} {rep['false_positives_user']:>9} {rep['false_positives_isp']:>8}",
        f"{'precision':<24} {'':>7} {_f(rep['precision_user'], '9.3f'):>9} "
        f"{_f(rep['precision_isp'], '8.3f'):>8}",
        f"{'recall':<24} {'':>7} {_f(rep['recall_user'], '9.3f'):>9} {_f(rep['recall_isp'], '8.3f'):>8}",
        f"{'MAE (ms)':<24} {'':>7} {_f(rep['user_mae_ms'], '9.1f'):>9} {_f(rep['mae_ms'], '8.1f'):>8}",
        f"{'RMSE (ms)':<24} {'':>7} {_f(rep['user_rmse_ms'], '9.1f'):>9} {_f(rep['rmse_ms'], '8.1f'):>8}",
        f"ISP matched {_f(rep['recall_isp_of_signalled'], '.3f')} of the significant stalls the user agent "
        "signalled",
    ]
    return "\n".join(lines) + "\n"
