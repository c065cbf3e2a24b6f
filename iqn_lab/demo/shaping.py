"""The demo's bottleneck: the media host's path, squeezed and released on a timetable.

Why not the lab's client-link tbf: during a stall the end-user agent makes the
server send 4 answers every 0.2 s (about 200 kbit/s of 1.2 kB packets). On the
client link those answers share one FIFO, inside one OpenVPN flow, with the
media connection, whose loss-based QUIC congestion control keeps the queue
full. The emulator's page connection then loses answers, falls to its minimum
congestion window and sends about one answer per round trip: measured, 5
candidates/s instead of 20 at 800 kbit/s - the ISP sees the stall start, then
a trickle, and underestimates every stall. Squeezing only the media host's
traffic (as when the path to a video CDN node is congested while the web
front end is not) starves the player just the same while the signal reaches
the router intact, so the demo measures IQN rather than the emulator's
congestion control.

An htb on the OTT namespace's interface: class 1:10 (media host's packets,
matched by source address) at the schedule's rate, everything else in 1:20
unshaped. "none" is a rate far above the link's.
"""

from __future__ import annotations

import subprocess
import threading
import time

from iqn_lab import topology as T
from iqn_lab.demo.plan import Plan
from iqn_lab.lab import Lab, LabError
from iqn_lab.shaping import tbf_params

UNLIMITED = 10_000_000_000  # 10 Gbit/s: no limit on a veth


class MediaSqueeze:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.iface = lab.names.ott_if
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _tc(self, *args: str) -> None:
        r = self.lab.exec("ott", ["tc", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise LabError(f"tc {' '.join(args)}: {r.stderr.strip()}")

    def install(self) -> None:
        burst, _latency = tbf_params()
        dev = ("dev", self.iface)
        self._tc("qdisc", "replace", *dev, "root", "handle", "1:", "htb", "default", "20")
        top = f"{UNLIMITED}bit"
        self._tc(
            "class",
            "replace",
            *dev,
            "parent",
            "1:",
            "classid",
            "1:10",
            "htb",
            "rate",
            top,
            "burst",
            str(burst),
        )
        self._tc("class", "replace", *dev, "parent", "1:", "classid", "1:20", "htb", "rate", top)
        self._tc("qdisc", "replace", *dev, "parent", "1:10", "handle", "10:", "pfifo", "limit", "10")
        self._tc("filter", "replace", *dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                 "match", "ip", "src", f"{T.OTT_MEDIA}/32", "flowid", "1:10")  # fmt: skip

    def set_rate(self, bits: int | None) -> None:
        burst, _latency = tbf_params()
        self._tc("class", "change", "dev", self.iface, "parent", "1:", "classid", "1:10", "htb",
                 "rate", f"{bits or UNLIMITED}bit", "burst", str(burst))  # fmt: skip

    def run(self, plan: Plan) -> None:
        """Play ``plan`` from now in a background thread (stopped by :meth:`stop`)."""
        t0 = time.monotonic()

        def body() -> None:
            for step in plan.steps:
                if self._stop.wait(max(0.0, t0 + step.at - time.monotonic())):
                    return
                try:
                    self.set_rate(step.rate)
                except (LabError, OSError, subprocess.SubprocessError):
                    return  # the lab is going away

        self._thread = threading.Thread(target=body, name="media-squeeze", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
