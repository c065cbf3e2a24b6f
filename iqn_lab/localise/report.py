"""The localisation report: what the service said per slot against what the players lived (sans-I/O).

Inputs are plain data: per-slot estimates as ``iqn-qos infer --json`` prints them
(``slot``, ``component`` (an id, or a list for a group the measurements cannot
split), ``p``, ``lo``, ``hi``, ``lines``, ``faulty``) and the players' JSONL logs
(:mod:`iqn_lab.player`). The ground truth per component and slot is the stall
fraction of the players whose media path crosses it: stalled seconds over
watched seconds inside the slot, leaving out each player's startup stall (the
ISP agent does not count a client's first stall either: it is what selects the
client).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


def name(component: Any) -> str:
    """A component id, or ``a+b`` for a group."""
    return component if isinstance(component, str) else "+".join(component)


def per_slot(estimates: Iterable[Mapping[str, Any]], first: float, slots: int, slot_s: float
             ) -> dict[float, list[dict[str, Any]]]:
    """Estimates of the slots ``first``, ``first + slot_s``, ... (``slots`` of them), worst first."""
    want = {first + k * slot_s for k in range(slots)}
    out: dict[float, list[dict[str, Any]]] = {s: [] for s in sorted(want)}
    for e in estimates:
        s = float(e["slot"])
        key = min(want, key=lambda w: abs(w - s))
        if abs(key - s) < 1e-6:
            out[key].append(dict(e))
    for s in out:
        out[s].sort(key=lambda e: (-float(e["p"]), name(e["component"])))
    return out


def members(component: Any) -> list[str]:
    return [component] if isinstance(component, str) else list(component)


def actual_fractions(logs: Mapping[str, Sequence[Mapping[str, Any]]],
                     path_of: Callable[[str, str], list[str]], slot: float,
                     slot_s: float) -> dict[str, dict[str, float]]:
    """Per component: ``watched_s``, ``stalled_s`` and ``fraction`` of the players behind it
    in ``[slot, slot + slot_s)``."""
    acc: dict[str, list[float]] = {}
    lo, hi = slot, slot + slot_s
    for events in logs.values():
        start = next((e for e in events if e.get("event") == "start"), None)
        end = next((e for e in events if e.get("event") == "end"), None)
        if start is None:
            continue
        t1 = float(end["t"]) if end is not None else max(
            (float(e.get("t", e.get("end", 0))) for e in events), default=float(start["t"]))
        watched = max(0.0, min(t1, hi) - max(float(start["t"]), lo))
        if watched <= 0:
            continue
        stalled = 0.0
        for e in events:
            if e.get("event") == "stall" and not e.get("startup"):
                stalled += max(0.0, min(float(e["end"]), hi) - max(float(e["start"]), lo))
        for c in path_of(str(start["client"]), str(start["media"])):
            a = acc.setdefault(c, [0.0, 0.0])
            a[0] += watched
            a[1] += stalled
    return {c: {"watched_s": round(w, 3), "stalled_s": round(s, 3), "fraction": (s / w if w else 0.0)}
            for c, (w, s) in acc.items()}


def _lines(ests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {name(e["component"]): e.get("lines") for e in ests}


def build(fault: str, slot_s: float, slots: Mapping[float, list[dict[str, Any]]],
          logs: Mapping[str, Sequence[Mapping[str, Any]]], path_of: Callable[[str, str], list[str]],
          components: Iterable[str], at_close: Mapping[float, list[dict[str, Any]]] | None = None
          ) -> dict[str, Any]:
    """The report's core: ``fault``, ``slots`` (ranking, flagged, estimates, actual), the injected
    component against its players' stall fraction, the healthy components, and the target.
    ``slots`` are the final estimates (every record stored); ``at_close``, when given, what the
    service showed when it first closed each slot: a row's ``at_close`` holds that ranking and
    its lines per component, and ``revised`` says whether records that came after the close
    changed the estimate (a node kill can hold an agent's last records past the close)."""
    rows: list[dict[str, Any]] = []
    injected: list[dict[str, Any]] = []
    healthy: dict[str, list[float | None]] = {c: [] for c in components if c != fault}
    for start, ests in sorted(slots.items()):
        actual = actual_fractions(logs, path_of, start, slot_s)
        rows.append({
            "slot": start,
            "ranking": [name(e["component"]) for e in ests],
            "flagged": [name(e["component"]) for e in ests if e.get("faulty")],
            "estimates": {name(e["component"]): {k: e.get(k) for k in ("p", "lo", "hi", "lines", "faulty")}
                          for e in ests},
            "actual": actual,
        })
        if at_close is not None:
            shown = at_close.get(start, [])
            rows[-1]["at_close"] = {"ranking": [name(e["component"]) for e in shown], "lines": _lines(shown)}
            rows[-1]["revised"] = (rows[-1]["at_close"]["ranking"] != rows[-1]["ranking"]
                                   or rows[-1]["at_close"]["lines"] != _lines(ests))
        mine = next((e for e in ests if fault in members(e["component"])), None)
        injected.append({
            "slot": start,
            "estimate": None if mine is None else mine["p"],
            "lo": None if mine is None else mine["lo"],
            "hi": None if mine is None else mine["hi"],
            "actual": actual.get(fault, {}).get("fraction"),
            "rank": next((i + 1 for i, e in enumerate(ests) if fault in members(e["component"])), None),
        })
        for c in healthy:
            e = next((x for x in ests if c in members(x["component"])), None)
            healthy[c].append(None if e is None else e["p"])
    after_first = rows[1:]
    first_ok = all(bool(r["ranking"]) and fault in str(r["ranking"][0]).split("+") for r in after_first)
    wrong = sorted({str(f) for r in rows for f in r["flagged"] if fault not in str(f).split("+")})
    return {
        "fault": fault,
        "slot_s": slot_s,
        "slots": rows,
        "injected": injected,
        "healthy": healthy,
        "target": {
            "ranked_first_after_first": bool(after_first) and first_ok,
            "healthy_flagged": wrong,
            "met": bool(after_first) and first_ok and not wrong,
        },
    }


def summary(report: Mapping[str, Any]) -> str:
    """The report as a few lines of text."""
    out = [f"fault: {report['fault']} ({report.get('fault_kind', '?')}, "
           f"{report.get('rate_bit', '?')} bit/s), "
           f"{report.get('players', '?')} players, slots of {report['slot_s']:g} s, "
           f"pipeline {report.get('pipeline', '?')}"]
    out.append(f"  {'slot':>12} {'rank':>4} {'estimate':>9} {'actual':>7}  ranking (worst first) / flagged")
    for row, inj in zip(report["slots"], report["injected"], strict=True):
        est = "-" if inj["estimate"] is None else f"{inj['estimate']:.4f}"
        act = "-" if inj["actual"] is None else f"{inj['actual']:.4f}"
        out.append(f"  {row['slot']:>12.0f} {inj['rank'] or '-':>4} {est:>9} {act:>7}  "
                   f"{', '.join(row['ranking'][:4])} / {', '.join(row['flagged']) or 'none'}")
        if row.get("revised"):
            out.append(f"  {'':>12} at close: {', '.join(row['at_close']['ranking'][:4]) or 'no estimate'} "
                       f"(revised by records stored after the close)")
    t = report["target"]
    out.append(f"target: injected component first in every slot after the first: "
               f"{'yes' if t['ranked_first_after_first'] else 'NO'}; healthy flagged: "
               f"{', '.join(t['healthy_flagged']) or 'none'}")
    return "\n".join(out)
