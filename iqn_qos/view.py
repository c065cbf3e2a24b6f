"""What the running service shows, as plain data (sans-I/O): the latest slots'
estimates, the components table (worst first, with each one's time series),
the Prometheus families and the counters.  ``iqn-qos serve``'s NATS loop builds
a new :class:`View` after every stored batch or inference and swaps it in; the
HTTP threads only read the current one, so they never touch the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .mle import Estimate

#: upper bounds (s) of the delay histogram: record written at the router -> stored here
DELAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def name_of(c: str | tuple[str, ...]) -> str:
    return c if isinstance(c, str) else "+".join(c)


@dataclass
class Counters:
    """Ingest counters (monotonic) and the consumer's state; owned by the NATS loop."""

    records: dict[str, int] = field(default_factory=lambda: {"session": 0, "stall": 0})
    lines: int = 0
    empty: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    inferences: int = 0
    lag: int = 0  # messages the durable consumer has not delivered yet
    ack_pending: int = 0  # delivered, not acknowledged (re-delivered after the ack wait)
    last_slot: float | None = None  # start of the latest slot inferred
    delay_counts: np.ndarray = field(default_factory=lambda: np.zeros(len(DELAY_BUCKETS) + 1, np.int64))
    delay_sum: float = 0.0

    def observe_delays(self, delays: np.ndarray) -> None:
        """Record-written-at-router to stored-here delays (s) of one batch (negative: clock skew, 0)."""
        d = np.maximum(delays, 0.0)
        self.delay_counts += np.bincount(np.searchsorted(DELAY_BUCKETS, d, side="left"),
                                         minlength=len(DELAY_BUCKETS) + 1)
        self.delay_sum += float(d.sum())

    def copy(self) -> Counters:
        return Counters(dict(self.records), self.lines, self.empty, self.duplicates, self.rejected,
                        self.batches, self.inferences, self.lag, self.ack_pending, self.last_slot,
                        self.delay_counts.copy(), self.delay_sum)


@dataclass(frozen=True)
class View:
    """One consistent picture of the service, for the web page, the JSON API and /metrics."""

    version: int
    slot_s: float
    threshold: float
    history: Sequence[tuple[float, Sequence[Estimate]]]  # (slot start, estimates worst first), oldest first
    kinds: dict[str, str]  # component id -> kind, from the topology
    counters: Counters

    def kind_of(self, c: str | tuple[str, ...]) -> str:
        if isinstance(c, str):
            return self.kinds.get(c, "?")
        ks = {self.kinds.get(x, "?") for x in c}
        return ks.pop() if len(ks) == 1 else "group"

    def components(self) -> list[dict[str, Any]]:
        """Every component (or group) with an estimate in the kept slots: those of the latest
        slot first, worst first, then the others by their own latest estimate."""
        series: dict[str, list[list[float]]] = {}
        latest: dict[str, tuple[float, Estimate]] = {}
        for start, ests in self.history:
            for e in ests:
                key = name_of(e.component)
                series.setdefault(key, []).append([start, e.p, e.lo, e.hi])
                latest[key] = (start, e)
        last = self.history[-1][0] if self.history else None
        order = sorted(latest.items(), key=lambda kv: (kv[1][0] != last, -kv[1][1].p, kv[0]))
        out = []
        for key, (start, e) in order:
            out.append({
                "component": e.component if isinstance(e.component, str) else list(e.component),
                "name": key, "kind": self.kind_of(e.component), "slot": start, "p": e.p, "lo": e.lo,
                "hi": e.hi, "lines": e.lines, "faulty": e.faulty, "series": series[key],
            })
        return out

    def api(self) -> dict[str, Any]:
        """The body of ``GET /api/components``."""
        return {
            "version": self.version,
            "slot_s": self.slot_s,
            "last_slot": self.counters.last_slot,
            "slots": [s for s, _ in self.history],
            "components": self.components(),
            "ingest": {"records": dict(self.counters.records), "lines": self.counters.lines,
                       "duplicates": self.counters.duplicates, "rejected": self.counters.rejected,
                       "lag": self.counters.lag, "ack_pending": self.counters.ack_pending},
        }
